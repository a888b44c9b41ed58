// CUDA kernels of the flat-row gathers (see csrc/ops/cpu/gather.cpp for the contract):
// starfast::permute / permute_out and starfast::lerp_gather, one launch each, grid-stride loops
// with several elements in flight per thread. Argument checks mirror the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gather_common.h"

namespace starfast {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

int blocks_for(int64_t count) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t blocks = (count + per_block - 1) / per_block;
  return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

template <typename scalar_t, typename index_t>
__global__ void permute_kernel(const scalar_t* __restrict__ in, const index_t* __restrict__ index,
                               scalar_t* __restrict__ out, int64_t length, int64_t total, bool shared) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total; k += stride) {
    const int64_t row = k / length;
    const int64_t p = k - row * length;
    const int64_t j = static_cast<int64_t>(index[shared ? p : k]);
    out[k] = in[row * length + j];
  }
}

template <typename scalar_t, typename index_t>
__global__ void lerp_gather_kernel(const scalar_t* __restrict__ theta, const scalar_t* __restrict__ source,
                                   const index_t* __restrict__ index, scalar_t* __restrict__ out, int64_t length,
                                   double weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t w = static_cast<acc_t>(weight);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < length; p += stride) {
    const acc_t a = static_cast<acc_t>(theta[p]);
    const acc_t b = static_cast<acc_t>(source[index == nullptr ? p : static_cast<int64_t>(index[p])]);
    out[p] = static_cast<scalar_t>(lerp_like_torch<acc_t>(a, b, w));
  }
}

void permute_into_cuda(const at::Tensor& rows, const at::Tensor& index, at::Tensor& out) {
  at::Tensor src, idx;
  std::tie(src, idx) = permute_operands(rows, index, out);
  const int64_t length = src.size(1);
  const int64_t total = src.numel();
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(rows.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "permute_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "permute_cuda_index", [&] {
      permute_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          src.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), out.data_ptr<scalar_t>(), length, total, idx.size(0) == 1);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lerp_gather_cuda(const LerpGatherOperands& operands, at::Tensor& out) {
  const at::Tensor& th = operands.theta;
  const at::Tensor& source = operands.source;
  const at::Tensor& idx = operands.index;
  const double t = operands.t;
  const int64_t length = th.size(0);
  const c10::cuda::CUDAGuard guard(th.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, th.scalar_type(), "lerp_gather_cuda", [&] {
    if (!idx.defined()) {
      lerp_gather_kernel<scalar_t, int64_t><<<blocks_for(length), kThreads, 0, stream>>>(
          th.data_ptr<scalar_t>(), source.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), length,
          t);
      return;
    }
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "lerp_gather_cuda_index", [&] {
      lerp_gather_kernel<scalar_t, index_t><<<blocks_for(length), kThreads, 0, stream>>>(
          th.data_ptr<scalar_t>(), source.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), out.data_ptr<scalar_t>(),
          length, t);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(starfast, CUDA, m) {
  m.impl("permute", &permute_functional<permute_into_cuda>);
  m.impl("permute_out", &permute_out_form<permute_into_cuda>);
  m.impl("lerp_gather", &lerp_gather_op<lerp_gather_cuda>);
}

}  // namespace starfast
