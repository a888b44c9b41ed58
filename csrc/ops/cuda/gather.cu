// CUDA kernels of the flat-row gathers (contracts in ../kernels.hpp): permute and lerp_gather,
// one launch each on the stream torch passes (its current stream). Grid-stride loops: a grid of
// at most kMaxBlocks blocks of kThreads threads, each thread taking every (grid size)-th element.
// No torch headers: plain pointers, and the CUDA runtime linked statically, so the device is set
// here (on this runtime's own per-thread state) rather than inherited from torch. Index values are
// checked by index.hpp's checked_position, as on the CPU; each thread lowers the op's bad-position
// slot once, at its end, if it met an out-of-range value.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../dispatch.hpp"
#include "../index.hpp"
#include "../kernels.hpp"
#include "../lerp.hpp"

namespace starfast {
namespace ops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

int blocks_for(int64_t count) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// Lowers the op's slot to a thread's lowest bad position (none: nothing to do; no slot: the
// caller did not ask, as for index maps starfast built itself).
__device__ void report_bad_index(uint64_t* first_bad, uint64_t thread_bad) {
  static_assert(sizeof(unsigned long long) == sizeof(uint64_t), "atomicMin on 64 bits");
  if (thread_bad != kNoBadIndex && first_bad != nullptr) {
    atomicMin(reinterpret_cast<unsigned long long*>(first_bad), static_cast<unsigned long long>(thread_bad));
  }
}

template <typename T, typename I>
__global__ void permute_kernel(const T* __restrict__ rows, const I* __restrict__ index, T* __restrict__ out,
                               int64_t length, int64_t total, bool shared, uint64_t* first_bad) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint64_t thread_bad = kNoBadIndex;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total; k += stride) {
    const int64_t first = k / length * length, p = k - first, at = shared ? p : k;
    out[k] = rows[first + checked_position(index[at], length, p, at, thread_bad)];
  }
  report_bad_index(first_bad, thread_bad);
}

// How lerp_gather reads and writes an element of each row type (torch's conversions: round to
// nearest even), and the type it computes in.
template <typename T>
struct Element {
  using acc_t = T;  // float, double
  __device__ static T load(T value) { return value; }
  __device__ static T store(T value) { return value; }
};
template <>
struct Element<__nv_bfloat16> {
  using acc_t = float;
  __device__ static float load(__nv_bfloat16 value) { return __bfloat162float(value); }
  __device__ static __nv_bfloat16 store(float value) { return __float2bfloat16_rn(value); }
};
template <>
struct Element<__half> {
  using acc_t = float;
  __device__ static float load(__half value) { return __half2float(value); }
  __device__ static __half store(float value) { return __float2half_rn(value); }
};

template <typename T, typename I>
__global__ void lerp_gather_kernel(const T* __restrict__ theta, const T* __restrict__ source,
                                   const void* __restrict__ index, T* __restrict__ out, int64_t length, double t,
                                   uint64_t* first_bad) {
  using E = Element<T>;
  using acc_t = typename E::acc_t;
  const acc_t w = static_cast<acc_t>(t);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint64_t thread_bad = kNoBadIndex;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < length; p += stride) {
    int64_t j = p;
    if constexpr (!std::is_same<I, NoIndex>::value) {
      j = checked_position(static_cast<const I*>(index)[p], length, p, p, thread_bad);
    }
    out[p] = E::store(lerp_like_torch<acc_t>(E::load(theta[p]), E::load(source[j]), w));
  }
  report_bad_index(first_bad, thread_bad);
}

// Makes `device` current for this runtime during a launch, and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) {
      status_ = cudaSetDevice(device);
      changed_ = status_ == cudaSuccess;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  bool changed_ = false;
  cudaError_t status_ = cudaSuccess;
};

std::string launch_result(const char* op, cudaError_t status) {
  if (status == cudaSuccess) status = cudaGetLastError();
  if (status == cudaSuccess) return {};
  return std::string(op) + ": CUDA error: " + cudaGetErrorString(status);
}

template <typename T, typename I>
void launch_permute(const PermuteArgs& args, uint64_t* first_bad, cudaStream_t stream) {
  const int64_t total = args.num_rows * args.length;
  permute_kernel<T, I><<<blocks_for(total), kThreads, 0, stream>>>(
      static_cast<const T*>(args.rows), static_cast<const I*>(args.index), static_cast<T*>(args.out), args.length, total,
      args.shared_index, first_bad);
}

template <typename T>
void launch_lerp_gather(const LerpGatherArgs& args, uint64_t* first_bad, cudaStream_t stream) {
  with_optional_index_type(args.index, args.index_type, [&](auto index) {
    lerp_gather_kernel<T, decltype(index)><<<blocks_for(args.length), kThreads, 0, stream>>>(
        static_cast<const T*>(args.theta), static_cast<const T*>(args.source), args.index, static_cast<T*>(args.out),
        args.length, args.t, first_bad);
  });
}

}  // namespace

std::string permute_cuda(const PermuteArgs& args, uint64_t* first_bad, int device, void* stream) {
  if (args.num_rows * args.length == 0) return {};
  const DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return launch_result("permute", guard.status());
  with_index_type(args.index_type, [&](auto index) {
    with_element_type(args.element_size, [&](auto element) {
      launch_permute<decltype(element), decltype(index)>(args, first_bad, static_cast<cudaStream_t>(stream));
    });
  });
  return launch_result("permute", cudaSuccess);
}

std::string lerp_gather_cuda(const LerpGatherArgs& args, uint64_t* first_bad, int device, void* stream) {
  if (args.length == 0) return {};
  const DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return launch_result("lerp_gather", guard.status());
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case FloatType::kFloat32: launch_lerp_gather<float>(args, first_bad, cuda_stream); break;
    case FloatType::kFloat64: launch_lerp_gather<double>(args, first_bad, cuda_stream); break;
    case FloatType::kBFloat16: launch_lerp_gather<__nv_bfloat16>(args, first_bad, cuda_stream); break;
    case FloatType::kFloat16: launch_lerp_gather<__half>(args, first_bad, cuda_stream); break;
  }
  return launch_result("lerp_gather", cudaSuccess);
}

}  // namespace ops
}  // namespace starfast
