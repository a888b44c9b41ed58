// CPU kernels of the flat-row gathers: starfast::permute / permute_out (rows[..., index]) and
// starfast::lerp_gather ((1 - t) * theta + t * bank[n][index], read once, written once).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../gather_common.h"

namespace starfast {
namespace {

constexpr int64_t kGrain = 1 << 15;

void permute_into(const at::Tensor& rows, const at::Tensor& index, at::Tensor& out) {
  at::Tensor src, idx;
  std::tie(src, idx) = permute_operands(rows, index, out);
  const int64_t length = src.size(1), num_rows = src.size(0);
  const bool shared = idx.size(0) == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "permute", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "permute_index", [&] {
      const scalar_t* in = src.data_ptr<scalar_t>();
      const index_t* ix = idx.data_ptr<index_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, num_rows * length, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t r = k / length, p = k - r * length;
          o[k] = in[r * length + ix[(shared ? 0 : r) * length + p]];
        }
      });
    });
  });
}

void lerp_gather_cpu(const LerpGatherOperands& operands, at::Tensor& out) {
  const at::Tensor& th = operands.theta;
  const at::Tensor& idx = operands.index;
  const int64_t length = th.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, th.scalar_type(), "lerp_gather", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = th.data_ptr<scalar_t>();
    const scalar_t* b = operands.source.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t w = static_cast<acc_t>(operands.t);
    if (!idx.defined()) {
      at::parallel_for(0, length, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) o[p] = static_cast<scalar_t>(lerp_like_torch<acc_t>(a[p], b[p], w));
      });
      return;
    }
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "lerp_gather_index", [&] {
      const index_t* ix = idx.data_ptr<index_t>();
      at::parallel_for(0, length, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) o[p] = static_cast<scalar_t>(lerp_like_torch<acc_t>(a[p], b[ix[p]], w));
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(starfast, CPU, m) {
  m.impl("permute", &permute_functional<permute_into>);
  m.impl("permute_out", &permute_out_form<permute_into>);
  m.impl("lerp_gather", &lerp_gather_op<lerp_gather_cpu>);
}

}  // namespace starfast
