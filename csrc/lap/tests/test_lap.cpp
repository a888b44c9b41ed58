// C++ tests of starfast::lap without Python: the solver's objective is compared with brute force
// (n <= 7) and with an independent textbook O(n^3) Hungarian method on random problems of the
// kinds weight matching meets (iid, integer ties, all-equal, rank-1, weight-matching-like, huge
// and tiny magnitudes), and on matrices whose entries reach the largest float64 / float32 (whose
// sums overflow double: the solver aborted the process on them); every answer must be a
// permutation.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../lap.hpp"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// Hungarian method with row/column potentials (minimisation), 1-based as usually written.
double hungarian_min(int n, const std::vector<double>& a) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(n + 1, 0.0), v(n + 1, 0.0), minv(n + 1);
  std::vector<int> p(n + 1, 0), way(n + 1, 0);
  std::vector<char> used(n + 1);
  for (int i = 1; i <= n; ++i) {
    p[0] = i;
    int j0 = 0;
    std::fill(minv.begin(), minv.end(), inf);
    std::fill(used.begin(), used.end(), 0);
    do {
      used[j0] = 1;
      const int i0 = p[j0];
      double delta = inf;
      int j1 = 0;
      for (int j = 1; j <= n; ++j) {
        if (used[j]) continue;
        const double cur = a[(i0 - 1) * n + (j - 1)] - u[i0] - v[j];
        if (cur < minv[j]) {
          minv[j] = cur;
          way[j] = j0;
        }
        if (minv[j] < delta) {
          delta = minv[j];
          j1 = j;
        }
      }
      for (int j = 0; j <= n; ++j) {
        if (used[j]) {
          u[p[j]] += delta;
          v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (p[j0] != 0);
    do {
      const int j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0);
  }
  double total = 0.0;
  for (int j = 1; j <= n; ++j) total += a[(p[j] - 1) * n + (j - 1)];
  return total;
}

double brute_force_min(int n, const std::vector<double>& a) {
  std::vector<int> perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  double best = std::numeric_limits<double>::infinity();
  do {
    double total = 0.0;
    for (int i = 0; i < n; ++i) total += a[i * n + perm[i]];
    best = std::min(best, total);
  } while (std::next_permutation(perm.begin(), perm.end()));
  return n == 0 ? 0.0 : best;
}

bool is_permutation(int n, const std::vector<int64_t>& x) {
  std::vector<char> seen(n, 0);
  for (int i = 0; i < n; ++i) {
    if (x[i] < 0 || x[i] >= n || seen[x[i]]) return false;
    seen[x[i]] = 1;
  }
  return true;
}

std::vector<double> make_problem(const std::string& kind, int n, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> a(static_cast<size_t>(n) * n);
  if (kind == "iid") {
    for (auto& e : a) e = normal(rng);
  } else if (kind == "ties") {
    std::uniform_int_distribution<int> small(0, 3);
    for (auto& e : a) e = small(rng);
  } else if (kind == "equal") {
    for (auto& e : a) e = 2.5;
  } else if (kind == "rank1") {
    std::vector<double> r(n), s(n);
    for (auto& e : r) e = normal(rng);
    for (auto& e : s) e = normal(rng);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) a[i * n + j] = r[i] * s[j];
  } else if (kind == "wm" || kind == "huge" || kind == "tiny") {
    // A = W (P W + 0.5 noise)^T with W of shape n x 4n: what weight matching produces.
    const int m = 4 * n;
    std::vector<double> w(static_cast<size_t>(n) * m), b(static_cast<size_t>(n) * m);
    for (auto& e : w) e = normal(rng);
    std::vector<int> perm(n);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < m; ++k) b[i * m + k] = w[perm[i] * m + k] + 0.5 * normal(rng);
    const double scale = kind == "huge" ? 1e12 : kind == "tiny" ? 1e-12 : 1.0;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        double dot = 0.0;
        for (int k = 0; k < m; ++k) dot += w[i * m + k] * b[j * m + k];
        a[i * n + j] = scale * dot;
      }
  } else {
    throw std::runtime_error("unknown kind " + kind);
  }
  return a;
}

void check_case(const std::string& kind, int n, bool maximize, std::mt19937_64& rng) {
  const std::vector<double> a = make_problem(kind, n, rng);
  std::vector<int64_t> x(n);
  const double got = starfast::lap::solve<double>(n, a.data(), maximize, x.data());
  const std::string name = kind + " n=" + std::to_string(n) + (maximize ? " max" : " min");
  expect(is_permutation(n, x), name + ": not a permutation");
  std::vector<double> signed_a(a);
  if (maximize)
    for (auto& e : signed_a) e = -e;
  const double want = (maximize ? -1.0 : 1.0) *
                      (n <= 7 ? brute_force_min(n, signed_a) : hungarian_min(n, signed_a));
  const double tol = 1e-9 * std::max(1.0, std::fabs(want));
  expect(std::fabs(got - want) <= tol, name + ": objective " + std::to_string(got) +
                                           " != reference " + std::to_string(want));
  // The float32 path must agree with a float64 solve of the same (rounded) entries.
  std::vector<float> af(a.begin(), a.end());
  std::vector<double> rounded(af.begin(), af.end());
  std::vector<int64_t> xf(n), xd(n);
  const double got_f = starfast::lap::solve<float>(n, af.data(), maximize, xf.data());
  const double got_d = starfast::lap::solve<double>(n, rounded.data(), maximize, xd.data());
  expect(is_permutation(n, xf), name + " float32: not a permutation");
  expect(std::fabs(got_f - got_d) <= 1e-9 * std::max(1.0, std::fabs(got_d)),
         name + " float32: objective differs from float64 solve");
}

// Entries up to the type's largest finite value: uniform in [-max, max], only -max, 0 and max
// (every sum of two overflows float64, and ties abound), or max everywhere except one small
// entry per row (the answer hinges on entries 300 orders of magnitude below the rest).
template <typename T>
std::vector<T> make_extreme(const std::string& kind, int n, std::mt19937_64& rng) {
  const double top = std::numeric_limits<T>::max();
  std::uniform_real_distribution<double> unit(-1.0, 1.0);
  std::uniform_int_distribution<int> sign(-1, 1), column(0, n - 1);
  std::vector<T> a(static_cast<size_t>(n) * n);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      double e = kind == "extreme" ? top * unit(rng) : kind == "extreme-signs" ? top * sign(rng) : top;
      a[i * n + j] = static_cast<T>(e);
    }
    if (kind == "extreme-rows") a[i * n + column(rng)] = static_cast<T>(unit(rng));
  }
  return a;
}

template <typename T>
void check_extreme_case(const std::string& kind, int n, bool maximize, std::mt19937_64& rng) {
  const std::vector<T> a = make_extreme<T>(kind, n, rng);
  const std::string name = kind + (sizeof(T) == 4 ? " float32" : " float64") + " n=" + std::to_string(n) +
                           (maximize ? " max" : " min");
  std::vector<int64_t> x(n);
  try {
    starfast::lap::solve<T>(n, a.data(), maximize, x.data());
  } catch (const std::exception& error) {
    expect(false, name + ": threw " + error.what());
    return;
  }
  expect(is_permutation(n, x), name + ": not a permutation");
  if (!is_permutation(n, x)) return;
  // Objectives compared on the entries times 2^-64 (exact here), where no sum overflows.
  std::vector<double> scaled(a.size());
  for (size_t k = 0; k < a.size(); ++k) scaled[k] = std::ldexp(static_cast<double>(a[k]), -64) * (maximize ? -1 : 1);
  double got = 0.0, largest = 0.0;
  for (int i = 0; i < n; ++i) got += scaled[i * n + x[i]];
  for (double e : scaled) largest = std::max(largest, std::fabs(e));
  const double want = n <= 7 ? brute_force_min(n, scaled) : hungarian_min(n, scaled);
  // Sums of n entries of up to `largest` are exact to n ulps of it; the small entries of
  // "extreme-rows" are below that resolution, so there only the large-entry part is compared.
  const double tol = 4.0 * n * largest * std::numeric_limits<double>::epsilon();
  char numbers[96];
  std::snprintf(numbers, sizeof(numbers), "%.17g != reference %.17g", got, want);
  expect(std::fabs(got - want) <= tol, name + ": objective (x 2^-64) " + numbers);
  if (kind == "extreme-rows" && !maximize) {  // the optimum avoids every max entry when it can
    bool avoided = true;
    for (int i = 0; i < n; ++i) avoided &= static_cast<double>(a[i * n + x[i]]) != static_cast<double>(std::numeric_limits<T>::max());
    std::vector<int> columns;  // a permutation through the small entries exists if their columns differ
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j)
        if (static_cast<double>(a[i * n + j]) != static_cast<double>(std::numeric_limits<T>::max())) columns.push_back(j);
    std::sort(columns.begin(), columns.end());
    const bool possible = std::adjacent_find(columns.begin(), columns.end()) == columns.end();
    expect(!possible || avoided, name + ": took a max entry although the small ones form a permutation");
  }
}

void check_errors() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> a = {1.0, nan, 0.0, 2.0};
  std::vector<int64_t> x(2);
  bool threw = false;
  try {
    starfast::lap::solve<double>(2, a.data(), false, x.data());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  expect(threw, "NaN entry must throw invalid_argument");
  a[1] = std::numeric_limits<double>::infinity();
  threw = false;
  try {
    starfast::lap::solve<double>(2, a.data(), true, x.data());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  expect(threw, "infinite entry must throw invalid_argument");
  expect(starfast::lap::solve<double>(0, a.data(), false, x.data()) == 0.0, "n = 0 gives 0");
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261123);
  int cases = 0;
  const char* kinds[] = {"iid", "ties", "equal", "rank1", "wm", "huge", "tiny"};
  for (const char* kind : kinds) {
    for (int n = 1; n <= 7; ++n)
      for (int rep = 0; rep < 20; ++rep, ++cases) check_case(kind, n, rep % 2 == 1, rng);
    for (int n : {8, 17, 33, 64, 100, 150})
      for (int rep = 0; rep < 4; ++rep, ++cases) check_case(kind, n, rep % 2 == 1, rng);
  }
  for (const char* kind : {"extreme", "extreme-signs", "extreme-rows"}) {
    for (int n : {1, 2, 3, 5, 7, 12, 40, 150}) {
      for (int rep = 0; rep < 6; ++rep, cases += 2) {
        check_extreme_case<double>(kind, n, rep % 2 == 1, rng);
        check_extreme_case<float>(kind, n, rep % 2 == 1, rng);
      }
    }
  }
  check_errors();
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
