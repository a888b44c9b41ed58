// CUDA kernels of the flat-row gathers (see csrc/ops/cpu/gather.cpp for the contract):
// starfast::permute / permute_out and starfast::lerp_gather, one launch each, grid-stride loops
// with several elements in flight per thread. Argument checks mirror the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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
                                   float weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t w = static_cast<acc_t>(weight);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < length; p += stride) {
    const acc_t a = static_cast<acc_t>(theta[p]);
    const acc_t b = static_cast<acc_t>(source[index == nullptr ? p : static_cast<int64_t>(index[p])]);
    // torch.lerp's formula, so CPU, CUDA and the reference agree to rounding.
    out[p] = static_cast<scalar_t>(w < acc_t(0.5) ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w));
  }
}

void permute_into_cuda(const at::Tensor& rows, const at::Tensor& index, at::Tensor& out) {
  const int64_t length = rows.size(-1);
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "permute: index must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(index.size(-1) == length, "permute: index has length ", index.size(-1), " but rows have ", length);
  TORCH_CHECK(index.device() == rows.device(), "permute: index and rows are on different devices");
  const at::Tensor src = rows.contiguous().view({-1, length});
  const at::Tensor idx = index.contiguous().view({-1, length});
  TORCH_CHECK(idx.size(0) == 1 || idx.size(0) == src.size(0), "permute: index must be [P] or [", src.size(0),
              ", P], got ", index.sizes());
  TORCH_CHECK(out.is_contiguous() && out.sizes() == rows.sizes() && out.dtype() == rows.dtype(),
              "permute: out must be a contiguous tensor shaped and typed like rows");
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

at::Tensor permute_cuda(const at::Tensor& rows, const at::Tensor& index) {
  at::Tensor out = at::empty_like(rows, at::MemoryFormat::Contiguous);
  permute_into_cuda(rows, index, out);
  return out;
}

void permute_out_cuda(const at::Tensor& rows, const at::Tensor& index, at::Tensor out) {
  TORCH_CHECK(!out.is_same(rows), "permute: out must not alias rows");
  permute_into_cuda(rows, index, out);
}

at::Tensor lerp_gather_cuda(const at::Tensor& theta, const at::Tensor& bank, int64_t n,
                            const c10::optional<at::Tensor>& index, double t) {
  TORCH_CHECK(theta.dim() == 1, "lerp_gather: theta must be [P], got ", theta.sizes());
  TORCH_CHECK(bank.dim() == 2 && bank.size(1) == theta.size(0), "lerp_gather: bank must be [N, ", theta.size(0),
              "], got ", bank.sizes());
  TORCH_CHECK(bank.scalar_type() == theta.scalar_type(), "lerp_gather: bank and theta dtypes differ");
  TORCH_CHECK(n >= 0 && n < bank.size(0), "lerp_gather: n = ", n, " is outside the bank of ", bank.size(0));
  const int64_t length = theta.size(0);
  const at::Tensor th = theta.contiguous();
  const at::Tensor source = bank.select(0, n).contiguous();
  at::Tensor out = at::empty_like(th);
  if (length == 0) return out;
  at::Tensor idx;
  if (index.has_value()) {
    idx = index->contiguous();
    TORCH_CHECK(idx.dim() == 1 && idx.size(0) == length, "lerp_gather: index must be [", length, "], got ",
                idx.sizes());
    TORCH_CHECK(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt,
                "lerp_gather: index must be int64 or int32, got ", idx.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(theta.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, th.scalar_type(), "lerp_gather_cuda", [&] {
    if (!idx.defined()) {
      lerp_gather_kernel<scalar_t, int64_t><<<blocks_for(length), kThreads, 0, stream>>>(
          th.data_ptr<scalar_t>(), source.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), length,
          static_cast<float>(t));
      return;
    }
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "lerp_gather_cuda_index", [&] {
      lerp_gather_kernel<scalar_t, index_t><<<blocks_for(length), kThreads, 0, stream>>>(
          th.data_ptr<scalar_t>(), source.data_ptr<scalar_t>(), idx.data_ptr<index_t>(), out.data_ptr<scalar_t>(),
          length, static_cast<float>(t));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(starfast, CUDA, m) {
  m.impl("permute", &permute_cuda);
  m.impl("permute_out", &permute_out_cuda);
  m.impl("lerp_gather", &lerp_gather_cuda);
}

}  // namespace starfast
