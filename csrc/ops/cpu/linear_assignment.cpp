// CPU kernel of starfast::linear_assignment: a batch of dense square problems solved by the
// torch-free JV solver in csrc/lap, in parallel over the batch (each thread keeps one workspace).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <stdexcept>
#include <vector>

#include "../../lap/lap.hpp"

namespace starfast {
namespace {

at::Tensor linear_assignment_cpu(const at::Tensor& cost, bool maximize) {
  TORCH_CHECK(cost.dim() == 2 || cost.dim() == 3, "linear_assignment: cost must be [n, n] or [B, n, n], got ",
              cost.dim(), " dims");
  TORCH_CHECK(cost.size(-1) == cost.size(-2), "linear_assignment: cost must be square, got ", cost.sizes());
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "linear_assignment: cost must be float32 or float64, got ", cost.scalar_type());
  const at::Tensor c = (cost.dim() == 2 ? cost.unsqueeze(0) : cost).contiguous();
  const int64_t batch = c.size(0), n = c.size(2);
  at::Tensor out = at::empty({batch, n}, c.options().dtype(at::kLong));
  int64_t* out_data = out.data_ptr<int64_t>();
  std::vector<std::string> errors(batch);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "linear_assignment", [&] {
    const scalar_t* data = c.data_ptr<scalar_t>();
    // One problem per task: the solver is sequential, problems are independent.
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      lap::Workspace ws;
      for (int64_t b = begin; b < end; ++b) {
        try {
          lap::solve<scalar_t>(n, data + b * n * n, maximize, out_data + b * n, ws);
        } catch (const std::invalid_argument& e) {
          errors[b] = e.what();
        }
      }
    });
  });
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(errors[b].empty(), errors[b], batch > 1 ? " (problem " + std::to_string(b) + " of the batch)" : "");
  }
  return cost.dim() == 2 ? out.squeeze(0) : out;
}

}  // namespace

TORCH_LIBRARY_IMPL(starfast, CPU, m) { m.impl("linear_assignment", &linear_assignment_cpu); }

}  // namespace starfast
