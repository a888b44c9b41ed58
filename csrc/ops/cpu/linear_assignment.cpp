// CPU kernel of linear_assignment (contract in ../kernels.hpp): a batch of dense square problems
// solved by the torch-free JV solver of csrc/lap, in parallel over the batch; each thread keeps
// one workspace and takes the next unsolved problem when it finishes one.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../lap/lap.hpp"
#include "../kernels.hpp"

namespace starfast {
namespace ops {
namespace {

template <typename T>
std::string solve_batch(const T* cost, int64_t batch, int64_t n, bool maximize, int64_t* out, int threads) {
  std::vector<std::string> errors(batch);
  auto solve_one = [&](int64_t b, lap::Workspace& workspace) {
    try {
      lap::solve<T>(n, cost + b * n * n, maximize, out + b * n, workspace);
    } catch (const std::exception& error) {  // a NaN or infinite entry; bad_alloc
      errors[b] = error.what();
    }
  };
  const int team = static_cast<int>(std::min<int64_t>(threads, batch));
  if (team <= 1) {  // no thread team for one problem (or one thread)
    lap::Workspace workspace;
    for (int64_t b = 0; b < batch; ++b) solve_one(b, workspace);
  } else {
#pragma omp parallel num_threads(team)
    {
      lap::Workspace workspace;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < batch; ++b) solve_one(b, workspace);
    }
  }
  for (int64_t b = 0; b < batch; ++b) {
    if (!errors[b].empty()) return batch > 1 ? errors[b] + " (problem " + std::to_string(b) + " of the batch)" : errors[b];
  }
  return {};
}

}  // namespace

std::string linear_assignment_cpu(const void* cost, FloatType dtype, int64_t batch, int64_t n, bool maximize,
                                  int64_t* out, int threads) {
  if (dtype == FloatType::kFloat64) return solve_batch(static_cast<const double*>(cost), batch, n, maximize, out, threads);
  return solve_batch(static_cast<const float*>(cost), batch, n, maximize, out, threads);
}

}  // namespace ops
}  // namespace starfast
