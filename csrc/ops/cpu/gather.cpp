// CPU kernels of the flat-row gathers: starfast::permute / permute_out (rows[..., index]) and
// starfast::lerp_gather ((1 - t) * theta + t * bank[n][index], read once, written once).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace starfast {
namespace {

constexpr int64_t kGrain = 1 << 15;

void check_index(const at::Tensor& index, int64_t length, const char* op) {
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op,
              ": index must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(index.size(-1) == length, op, ": index has length ", index.size(-1), " but rows have ", length);
}

// Gathers each row of `rows` [R, P] through index [P] (shared) or [R, P] (one per row).
void permute_into(const at::Tensor& rows, const at::Tensor& index, at::Tensor& out) {
  const int64_t length = rows.size(-1);
  check_index(index, length, "permute");
  const at::Tensor src = rows.contiguous().view({-1, length});
  const at::Tensor idx = index.contiguous().view({-1, length});
  const int64_t num_rows = src.size(0);
  TORCH_CHECK(idx.size(0) == 1 || idx.size(0) == num_rows, "permute: index must be [P] or [",
              num_rows, ", P], got ", index.sizes());
  TORCH_CHECK(out.is_contiguous() && out.sizes() == rows.sizes() && out.dtype() == rows.dtype(),
              "permute: out must be a contiguous tensor shaped and typed like rows");
  TORCH_CHECK(!out.is_same(rows), "permute: out must not alias rows");
  const bool shared = idx.size(0) == 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "permute", [&] {
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "permute_index", [&] {
      const scalar_t* in = src.data_ptr<scalar_t>();
      const index_t* ix = idx.data_ptr<index_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      at::parallel_for(0, num_rows * length, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t r = k / length, p = k - r * length;
          const index_t j = ix[(shared ? 0 : r) * length + p];
          o[k] = in[r * length + j];
        }
      });
    });
  });
}

at::Tensor permute_cpu(const at::Tensor& rows, const at::Tensor& index) {
  at::Tensor out = at::empty_like(rows, at::MemoryFormat::Contiguous);
  permute_into(rows, index, out);
  return out;
}

void permute_out_cpu(const at::Tensor& rows, const at::Tensor& index, at::Tensor out) { permute_into(rows, index, out); }

at::Tensor lerp_gather_cpu(const at::Tensor& theta, const at::Tensor& bank, int64_t n,
                           const c10::optional<at::Tensor>& index, double t) {
  TORCH_CHECK(theta.dim() == 1, "lerp_gather: theta must be [P], got ", theta.sizes());
  TORCH_CHECK(bank.dim() == 2 && bank.size(1) == theta.size(0), "lerp_gather: bank must be [N, ",
              theta.size(0), "], got ", bank.sizes());
  TORCH_CHECK(bank.scalar_type() == theta.scalar_type(), "lerp_gather: bank and theta dtypes differ");
  TORCH_CHECK(n >= 0 && n < bank.size(0), "lerp_gather: n = ", n, " is outside the bank of ", bank.size(0));
  const int64_t length = theta.size(0);
  const at::Tensor th = theta.contiguous();
  const at::Tensor source = bank.select(0, n).contiguous();
  at::Tensor out = at::empty_like(th);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, th.scalar_type(), "lerp_gather", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = th.data_ptr<scalar_t>();
    const scalar_t* b = source.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t w = static_cast<acc_t>(t);
    // Same formula as torch.lerp, so the reference and the kernel agree to rounding.
    auto lerp = [w](acc_t x, acc_t y) { return w < acc_t(0.5) ? x + w * (y - x) : y - (y - x) * (acc_t(1) - w); };
    if (!index.has_value()) {
      at::parallel_for(0, length, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) o[p] = static_cast<scalar_t>(lerp(a[p], b[p]));
      });
      return;
    }
    const at::Tensor idx = index->contiguous();
    check_index(idx, length, "lerp_gather");
    TORCH_CHECK(idx.dim() == 1, "lerp_gather: index must be [P], got ", idx.sizes());
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "lerp_gather_index", [&] {
      const index_t* ix = idx.data_ptr<index_t>();
      at::parallel_for(0, length, kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) o[p] = static_cast<scalar_t>(lerp(a[p], b[ix[p]]));
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(starfast, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("permute_out", &permute_out_cpu);
  m.impl("lerp_gather", &lerp_gather_cpu);
}

}  // namespace starfast
