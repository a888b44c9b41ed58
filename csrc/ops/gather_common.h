// What the CPU and CUDA kernels of the gather ops share: argument checks (one set of messages)
// and torch.lerp's formula, so every backend and the reference agree to rounding.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <tuple>
#include <utility>

namespace starfast {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t lerp_like_torch(acc_t a, acc_t b, acc_t w) {
  return w < acc_t(0.5) ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w);
}

inline void check_index(const at::Tensor& index, int64_t length, const char* op) {
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op,
              ": index must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(index.size(-1) == length, op, ": index has length ", index.size(-1), " but rows have ", length);
}

// rows [..., P] and index [P] or [R, P] as [R, P] / [1 or R, P] contiguous views; checks out.
inline std::pair<at::Tensor, at::Tensor> permute_operands(const at::Tensor& rows, const at::Tensor& index,
                                                           const at::Tensor& out) {
  const int64_t length = rows.size(-1);
  check_index(index, length, "permute");
  TORCH_CHECK(index.device() == rows.device(), "permute: index and rows are on different devices");
  at::Tensor src = rows.contiguous().view({-1, length});
  at::Tensor idx = index.contiguous().view({-1, length});
  TORCH_CHECK(idx.size(0) == 1 || idx.size(0) == src.size(0), "permute: index must be [P] or [", src.size(0),
              ", P], got ", index.sizes());
  TORCH_CHECK(out.is_contiguous() && out.sizes() == rows.sizes() && out.dtype() == rows.dtype(),
              "permute: out must be a contiguous tensor shaped and typed like rows");
  TORCH_CHECK(!out.is_same(rows), "permute: out must not alias rows");
  return {src, idx};
}

// The operands of lerp_gather, checked: theta [P] and bank row n contiguous, the index contiguous
// (undefined when absent), and t read on the host (n and t are one-element tensors).
struct LerpGatherOperands {
  at::Tensor theta, source, index;
  double t;
};

inline LerpGatherOperands lerp_gather_operands(const at::Tensor& theta, const at::Tensor& bank, const at::Tensor& n,
                                               const c10::optional<at::Tensor>& index, const at::Tensor& t) {
  TORCH_CHECK(n.numel() == 1 && !c10::isFloatingType(n.scalar_type()) && n.scalar_type() != at::kBool,
              "lerp_gather: n must be one integer, got a tensor of ", n.scalar_type(), " with ", n.numel(), " elements");
  TORCH_CHECK(t.numel() == 1 && c10::isFloatingType(t.scalar_type()),
              "lerp_gather: t must be one floating-point number, got a tensor of ", t.scalar_type(), " with ",
              t.numel(), " elements");
  const int64_t row = n.item<int64_t>();
  TORCH_CHECK(theta.dim() == 1, "lerp_gather: theta must be [P], got ", theta.sizes());
  TORCH_CHECK(bank.dim() == 2 && bank.size(1) == theta.size(0), "lerp_gather: bank must be [N, ", theta.size(0),
              "], got ", bank.sizes());
  TORCH_CHECK(bank.scalar_type() == theta.scalar_type(), "lerp_gather: bank and theta dtypes differ");
  TORCH_CHECK(row >= 0 && row < bank.size(0), "lerp_gather: n = ", row, " is outside the bank of ", bank.size(0));
  at::Tensor contiguous_index;
  if (index.has_value()) {
    TORCH_CHECK(index->dim() == 1, "lerp_gather: index must be [P], got ", index->sizes());
    check_index(*index, theta.size(0), "lerp_gather");
    TORCH_CHECK(index->device() == theta.device(), "lerp_gather: index and theta are on different devices");
    contiguous_index = index->contiguous();
  }
  return {theta.contiguous(), bank.select(0, row).contiguous(), contiguous_index, t.item<double>()};
}

// The functional form of permute on any backend: a fresh contiguous output filled by `into`.
template <void (*Into)(const at::Tensor&, const at::Tensor&, at::Tensor&)>
at::Tensor permute_functional(const at::Tensor& rows, const at::Tensor& index) {
  at::Tensor out = at::empty_like(rows, at::MemoryFormat::Contiguous);
  Into(rows, index, out);
  return out;
}

template <void (*Into)(const at::Tensor&, const at::Tensor&, at::Tensor&)>
void permute_out_form(const at::Tensor& rows, const at::Tensor& index, at::Tensor out) {
  Into(rows, index, out);
}

// lerp_gather on any backend: checked operands and a fresh output for `Kernel(operands, out)`.
template <void (*Kernel)(const LerpGatherOperands&, at::Tensor&)>
at::Tensor lerp_gather_op(const at::Tensor& theta, const at::Tensor& bank, const at::Tensor& n,
                          const c10::optional<at::Tensor>& index, const at::Tensor& t) {
  const LerpGatherOperands operands = lerp_gather_operands(theta, bank, n, index, t);
  at::Tensor out = at::empty_like(operands.theta);
  if (out.numel() > 0) Kernel(operands, out);
  return out;
}

}  // namespace starfast
