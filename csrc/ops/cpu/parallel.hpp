// The CPU kernels' parallel loop: [0, count) split into contiguous chunks, one per OpenMP thread,
// as torch's at::parallel_for splits it. The caller passes torch.get_num_threads(), so
// torch.set_num_threads governs the ops too (on Linux the extension shares torch's libgomp,
// which has the same soname, so there is one thread pool).
#pragma once

#include <algorithm>
#include <cstdint>

namespace starfast {
namespace ops {

// Below this many elements per thread, waking threads costs more than the loop.
constexpr int64_t kGrain = int64_t(1) << 15;

template <typename Body>
void parallel_for(int64_t count, int threads, const Body& body) {
  const int64_t chunks = std::min<int64_t>(std::max(threads, 1), (count + kGrain - 1) / kGrain);
  if (chunks <= 1) {
    if (count > 0) body(int64_t(0), count);
    return;
  }
#pragma omp parallel for num_threads(static_cast<int>(chunks)) schedule(static, 1)
  for (int64_t c = 0; c < chunks; ++c) body(count * c / chunks, count * (c + 1) / chunks);
}

}  // namespace ops
}  // namespace starfast
