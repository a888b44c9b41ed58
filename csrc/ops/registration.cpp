// Schemas of every starfast op. Kernels register per backend in csrc/ops/cpu/*.cpp and
// csrc/ops/cuda/*.cu; autograd, fake (meta) impls and pure-PyTorch references live in
// starfast/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(starfast, m) {
  // cost [n, n] or [B, n, n], float32/float64 -> int64 column assigned to each row.
  m.def("linear_assignment(Tensor cost, bool maximize) -> Tensor");
  // rows [..., P] gathered along the last axis by index [P] or [K, P] (int64).
  m.def("permute(Tensor rows, Tensor index) -> Tensor");
  m.def("permute_out(Tensor rows, Tensor index, Tensor(a!) out) -> ()");
  // (1 - t) * theta + t * bank[n][index]; index may be None (plain lerp with bank row n). n (int64)
  // and t (floating) are one-element tensors, read on the host, so vmap can batch several (n, t).
  m.def("lerp_gather(Tensor theta, Tensor bank, Tensor n, Tensor? index, Tensor t) -> Tensor");
}
