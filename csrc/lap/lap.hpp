// starfast::lap — dense square linear assignment (Jonker–Volgenant), plain C++17, no torch.
//
// solve() finds the permutation row_to_col minimising (or, with maximize, maximising)
// sum_i cost[i * n + row_to_col[i]] for a row-major n x n matrix. It follows Jonker & Volgenant
// (1987): column reduction, reduction transfer, two rounds of augmenting row reduction, then
// Dijkstra-style shortest augmenting paths for the rows still free. The initialisation phases
// settle most rows of the "nearly a permutation" cost matrices that weight matching produces,
// which is where this beats a solver that only augments.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace starfast {
namespace lap {

// Solves one problem. Arithmetic is always in double (a float32 matrix is read as float32 and
// widened on the fly); any finite matrix is solved, those with entries near the largest double
// scaled by a power of two so that no intermediate overflows. Throws std::invalid_argument on a
// NaN or infinite entry or n < 0. Returns the optimal objective, summed in double from the
// original entries (so +-inf when that sum overflows double, as it may near the largest double).
template <typename T>
double solve(int64_t n, const T* cost, bool maximize, int64_t* row_to_col);

// Reusable scratch so a thread solving many problems allocates once.
struct Workspace {
  std::vector<double> v, d;
  std::vector<int64_t> col_to_row, pred, collist, free_rows, matches, col_argmin;
  void resize(int64_t n);
};

template <typename T>
double solve(int64_t n, const T* cost, bool maximize, int64_t* row_to_col, Workspace& ws);

}  // namespace lap
}  // namespace starfast
