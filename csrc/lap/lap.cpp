// Jonker–Volgenant linear assignment; see lap.hpp for the contract.
#include "lap.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace starfast {
namespace lap {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The solver's prices and path lengths are differences of costs and of earlier prices; they grow
// to a small multiple of the largest |cost| (reduced costs up to twice it, prices lowered by
// them), so a float64 matrix with entries near DBL_MAX (~2^1024) overflows to inf - inf = NaN, and
// the augmenting-path search then ran off its arrays. Such a matrix is solved scaled by a power
// of two (exact, and it changes no comparison) so that its largest |entry| lies just below
// 2^kLargestSolvedExponent, leaving 2^64 of headroom for that growth (a factor 2 sufficed in
// every trial). A float32 matrix never needs it: its entries are below 2^128.
constexpr int kLargestSolvedExponent = 1024 - 64;
constexpr double kLargestSolved = 0x1p960;  // 2^kLargestSolvedExponent

// Reads entry (i, j) as a cost to minimise: maximisation negates on the fly, and with Scaled the
// entry is multiplied by `scale` (a power of two), so no copy of the matrix is ever made.
template <typename T, bool Maximize, bool Scaled = false>
struct CostView {
  const T* data;
  int64_t n;
  double scale = 1.0;
  inline const T* row(int64_t i) const { return data + i * n; }
  inline double at(const T* row, int64_t j) const {
    const double h = Maximize ? -static_cast<double>(row[j]) : static_cast<double>(row[j]);
    if constexpr (Scaled) return h * scale;
    return h;
  }
};

template <typename T>
double largest_magnitude(int64_t n, const T* cost) {
  double largest = 0.0;
  for (int64_t k = 0; k < n * n; ++k) largest = std::max(largest, std::fabs(static_cast<double>(cost[k])));
  return largest;
}

template <typename T>
void throw_non_finite(int64_t n, const T* cost) {
  for (int64_t k = 0; k < n * n; ++k) {
    if (!std::isfinite(static_cast<double>(cost[k]))) {
      throw std::invalid_argument("linear_assignment: cost has a NaN or infinite entry at (" +
                                  std::to_string(k / n) + ", " + std::to_string(k % n) + ")");
    }
  }
}

// Solves the problem `c` into x. Returns false, having solved nothing, when `c` is unscaled and its
// largest |entry| needs scaling (see kLargestSolvedExponent); that magnitude is then in *peak.
template <typename T, bool Maximize, bool Scaled>
bool solve_impl(const CostView<T, Maximize, Scaled>& c, int64_t* x, Workspace& ws, double* peak) {
  const int64_t n = c.n;
  ws.resize(n);
  double* v = ws.v.data();
  double* d = ws.d.data();
  int64_t* y = ws.col_to_row.data();
  int64_t* pred = ws.pred.data();
  int64_t* collist = ws.collist.data();
  int64_t* free_rows = ws.free_rows.data();
  int64_t* matches = ws.matches.data();
  int64_t* argmin = ws.col_argmin.data();

  // Column reduction: v[j] = min_i c(i, j), computed row by row so memory is read in order.
  // The same pass screens the input: the sum of |h| is NaN or infinite when an entry is, and at
  // least the largest |h|, so only when it reaches 2^kLargestSolvedExponent is a closer look (and
  // perhaps scaling) needed.
  for (int64_t j = 0; j < n; ++j) {
    v[j] = kInf;
    argmin[j] = 0;
  }
  double magnitudes = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const T* row = c.row(i);
    for (int64_t j = 0; j < n; ++j) {
      const double h = c.at(row, j);
      magnitudes += std::fabs(h);
      if (h < v[j]) {
        v[j] = h;
        argmin[j] = i;
      }
    }
  }
  if (!(magnitudes < kLargestSolved)) {  // rare: a NaN, infinite or huge entry, or many large ones
    throw_non_finite(n, c.data);
    if (!Scaled) {  // (a scaled matrix is below kLargestSolved by construction)
      const double largest = largest_magnitude(n, c.data);
      if (largest >= kLargestSolved) {
        *peak = largest;
        return false;
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    x[i] = -1;
    matches[i] = 0;
  }
  // As in the original, columns are handed out last to first; a row that is the minimum of
  // several columns keeps the first it was given.
  for (int64_t j = n - 1; j >= 0; --j) {
    const int64_t i = argmin[j];
    if (matches[i]++ == 0) {
      x[i] = j;
      y[j] = i;
    } else {
      y[j] = -1;
    }
  }

  // Reduction transfer: a row that owns exactly one column moves its slack to that column, so
  // the column becomes less attractive to the free rows.
  int64_t num_free = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (matches[i] == 0) {
      free_rows[num_free++] = i;
    } else if (matches[i] == 1) {
      const int64_t j1 = x[i];
      const T* row = c.row(i);
      double second = kInf;
      for (int64_t j = 0; j < n; ++j) {
        if (j == j1) continue;
        const double h = c.at(row, j) - v[j];
        if (h < second) second = h;
      }
      if (second < kInf) v[j1] -= second - (c.at(row, j1) - v[j1]);
    }
  }

  // Augmenting row reduction, two rounds. A free row takes its cheapest column (lowering that
  // column's price to the row's second-best reduced cost) and evicts the previous owner, which is
  // retried at once when the price strictly fell, else in the next round or by augmentation. A
  // price that does not move in floating point, or an exhausted work budget, sends the evicted
  // row to the later list, so this phase always terminates.
  for (int round = 0; round < 2 && num_free > 0; ++round) {
    int64_t k = 0;
    const int64_t previous_free = num_free;
    num_free = 0;
    int64_t budget = 8 * n + 64;
    while (k < previous_free) {
      const int64_t i = free_rows[k++];
      const T* row = c.row(i);
      double u1 = c.at(row, 0) - v[0];
      double u2 = kInf;
      int64_t j1 = 0, j2 = -1;
      for (int64_t j = 1; j < n; ++j) {
        const double h = c.at(row, j) - v[j];
        if (h < u2) {
          if (h >= u1) {
            u2 = h;
            j2 = j;
          } else {
            u2 = u1;
            u1 = h;
            j2 = j1;
            j1 = j;
          }
        }
      }
      int64_t i0 = y[j1];
      bool retry_now = false;
      if (u1 < u2) {
        // Taking j1 keeps complementary slackness whether or not its price moves; lowering it
        // is what lets the evicted row be retried at once without cycling.
        const double lowered = v[j1] - (u2 - u1);
        if (u2 < kInf && lowered < v[j1] && budget > 0) {
          --budget;
          v[j1] = lowered;
          retry_now = true;
        }
      } else if (i0 >= 0 && j2 >= 0) {  // (no j2 only if reduced costs were not finite)
        j1 = j2;  // a tie: j2 is just as cheap, take it if it is free
        i0 = y[j1];
      }
      x[i] = j1;
      y[j1] = i;
      if (i0 >= 0) {
        x[i0] = -1;
        if (retry_now) {
          free_rows[--k] = i0;
        } else {
          free_rows[num_free++] = i0;
        }
      }
    }
  }

  // Shortest augmenting paths from each remaining free row (Dijkstra on reduced costs).
  // collist[0, low) are scanned columns, [low, up) sit at the current minimum distance, [up, n)
  // are the rest.
  for (int64_t f = 0; f < num_free; ++f) {
    const int64_t start = free_rows[f];
    const T* srow = c.row(start);
    for (int64_t j = 0; j < n; ++j) {
      d[j] = c.at(srow, j) - v[j];
      pred[j] = start;
      collist[j] = j;
    }
    int64_t low = 0, up = 0, last = 0, end_of_path = -1;
    double mind = 0.0;
    while (end_of_path < 0) {
      if (up == low) {
        // Every column scanned and none free cannot happen with finite reduced costs (scaling
        // keeps them finite); were it to, stop rather than read past the column list.
        if (up >= n) throw std::logic_error("linear_assignment: no augmenting path found (non-finite reduced costs)");
        last = low - 1;
        mind = d[collist[up++]];
        for (int64_t k = up; k < n; ++k) {
          const int64_t j = collist[k];
          const double h = d[j];
          if (h <= mind) {
            if (h < mind) {
              up = low;
              mind = h;
            }
            collist[k] = collist[up];
            collist[up++] = j;
          }
        }
        for (int64_t k = low; k < up; ++k) {
          if (y[collist[k]] < 0) {
            end_of_path = collist[k];
            break;
          }
        }
        if (end_of_path >= 0) break;
      }
      const int64_t j1 = collist[low++];
      const int64_t i = y[j1];
      const T* row = c.row(i);
      const double h = c.at(row, j1) - v[j1] - mind;
      for (int64_t k = up; k < n; ++k) {
        const int64_t j = collist[k];
        const double v2 = c.at(row, j) - v[j] - h;
        if (v2 < d[j]) {
          pred[j] = i;
          if (v2 == mind) {
            if (y[j] < 0) {
              end_of_path = j;
              break;
            }
            collist[k] = collist[up];
            collist[up++] = j;
          }
          d[j] = v2;
        }
      }
    }
    // Update the prices of the columns scanned before the final minimum was found.
    for (int64_t k = 0; k <= last; ++k) {
      const int64_t j = collist[k];
      v[j] += d[j] - mind;
    }
    // Flip the path.
    int64_t i;
    do {
      i = pred[end_of_path];
      y[end_of_path] = i;
      const int64_t previous = x[i];
      x[i] = end_of_path;
      end_of_path = previous;
    } while (i != start);
  }
  return true;
}

// Solves unscaled when the entries allow it, else scaled so that the largest |entry| lies in
// [2^(kLargestSolvedExponent - 1), 2^kLargestSolvedExponent).
template <typename T, bool Maximize>
void solve_scaled_if_needed(const T* cost, int64_t n, int64_t* x, Workspace& ws) {
  double peak = 0.0;
  if (solve_impl(CostView<T, Maximize>{cost, n}, x, ws, &peak)) return;
  int exponent;
  std::frexp(peak, &exponent);  // peak < 2^exponent
  const double scale = std::ldexp(1.0, kLargestSolvedExponent - exponent);
  solve_impl(CostView<T, Maximize, true>{cost, n, scale}, x, ws, nullptr);
}

}  // namespace

void Workspace::resize(int64_t n) {
  const size_t m = static_cast<size_t>(n);
  if (v.size() >= m) return;
  v.resize(m);
  d.resize(m);
  col_to_row.resize(m);
  pred.resize(m);
  collist.resize(m);
  free_rows.resize(m);
  matches.resize(m);
  col_argmin.resize(m);
}

template <typename T>
double solve(int64_t n, const T* cost, bool maximize, int64_t* row_to_col, Workspace& ws) {
  if (n < 0) throw std::invalid_argument("linear_assignment: negative size");
  if (n == 0) return 0.0;
  if (maximize) {
    solve_scaled_if_needed<T, true>(cost, n, row_to_col, ws);
  } else {
    solve_scaled_if_needed<T, false>(cost, n, row_to_col, ws);
  }
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(cost[i * n + row_to_col[i]]);
  return total;
}

template <typename T>
double solve(int64_t n, const T* cost, bool maximize, int64_t* row_to_col) {
  Workspace ws;
  return solve(n, cost, maximize, row_to_col, ws);
}

template double solve<float>(int64_t, const float*, bool, int64_t*, Workspace&);
template double solve<double>(int64_t, const double*, bool, int64_t*, Workspace&);
template double solve<float>(int64_t, const float*, bool, int64_t*);
template double solve<double>(int64_t, const double*, bool, int64_t*);

}  // namespace lap
}  // namespace starfast
