// C++ tests of the ops' index handling without Python or a GPU: index.hpp (shared with the CUDA
// kernels, so this is everything they do with an index but the launch) on its own, and through
// the CPU kernels permute_cpu and lerp_gather_cpu, against plain loops, for every index type,
// element size and kind of out-of-range value, on one thread and on two.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../index.hpp"
#include "../kernels.hpp"
#include "../lerp.hpp"

namespace {

using starfast::ops::IndexType;

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

void check_bounds() {
  using starfast::ops::index_in_bounds;
  constexpr int32_t i32_min = std::numeric_limits<int32_t>::min(), i32_max = std::numeric_limits<int32_t>::max();
  constexpr int64_t i64_min = std::numeric_limits<int64_t>::min(), i64_max = std::numeric_limits<int64_t>::max();
  expect(index_in_bounds(int32_t{0}, 1) && index_in_bounds(int32_t{6}, 7), "int32 in bounds");
  expect(!index_in_bounds(int32_t{7}, 7) && !index_in_bounds(int32_t{-1}, 7), "int32 at the ends");
  expect(!index_in_bounds(i32_min, 7) && !index_in_bounds(i32_max, 7), "int32 extremes");
  expect(index_in_bounds(i32_max, int64_t{1} << 32), "int32 max within a longer row");
  expect(!index_in_bounds(i32_min, i64_max), "a negative int32 is never in bounds (no sign loss)");
  expect(index_in_bounds(int64_t{0}, 1) && !index_in_bounds(int64_t{0}, 0), "int64 on rows of 1 and 0");
  expect(!index_in_bounds(int64_t{-1}, i64_max) && !index_in_bounds(i64_min, i64_max), "negative int64");
  expect(index_in_bounds(i64_max - 1, i64_max) && !index_in_bounds(i64_max, i64_max), "int64 near its max");

  uint64_t first_bad = starfast::ops::kNoBadIndex;
  expect(starfast::ops::checked_position(int64_t{4}, 9, 2, 2, first_bad) == 4, "in bounds: the value");
  expect(first_bad == starfast::ops::kNoBadIndex, "in bounds: nothing noted");
  expect(starfast::ops::checked_position(int32_t{9}, 9, 5, 14, first_bad) == 5, "out of range: own position");
  expect(first_bad == 14, "the bad value's place is noted");
  starfast::ops::checked_position(int32_t{-3}, 9, 8, 17, first_bad);
  expect(first_bad == 14, "a later bad place does not replace a lower one");
  starfast::ops::checked_position(int64_t{-3}, 9, 1, 10, first_bad);
  expect(first_bad == 10, "a lower bad place does");
  expect(starfast::ops::bad_index_result(first_bad) == 10, "reported as is");
  expect(starfast::ops::bad_index_result(starfast::ops::kNoBadIndex) == -1, "none reported as -1");

  int seen = 0;
  starfast::ops::with_index_type(IndexType::kInt32, [&](auto i) { seen = std::is_same<decltype(i), int32_t>::value; });
  expect(seen, "kInt32 is int32_t");
  starfast::ops::with_index_type(IndexType::kInt64, [&](auto i) { seen = std::is_same<decltype(i), int64_t>::value; });
  expect(seen, "kInt64 is int64_t");
  starfast::ops::with_optional_index_type(nullptr, IndexType::kInt64,
                                          [&](auto i) { seen = std::is_same<decltype(i), starfast::ops::NoIndex>::value; });
  expect(seen, "no index pointer is NoIndex");
}

// Out-of-range values of every kind for rows of `length`, as index type I.
template <typename I>
std::vector<I> bad_values(int64_t length) {
  std::vector<int64_t> wide = {length, length + 5, -1, -length, std::numeric_limits<I>::min(),
                               std::numeric_limits<I>::max()};
  std::vector<I> values;
  for (int64_t value : wide) values.push_back(static_cast<I>(value));  // exact: each fits I
  return values;
}

template <typename T, typename I>
void check_permute(int64_t num_rows, int64_t length, bool shared, int threads, std::mt19937_64& rng) {
  const std::string name = "permute " + std::to_string(sizeof(T)) + "-byte rows, int" + std::to_string(8 * sizeof(I)) +
                           (shared ? " shared" : " per-row") + " index, " + std::to_string(length) + " long, " +
                           std::to_string(threads) + " threads";
  std::vector<T> rows(num_rows * length), out(rows.size());
  for (auto& e : rows) e = static_cast<T>(rng());
  const int64_t index_rows = shared ? 1 : num_rows;
  std::vector<I> index(index_rows * length);
  for (int64_t r = 0; r < index_rows; ++r) {
    std::iota(index.begin() + r * length, index.begin() + (r + 1) * length, I{0});
    std::shuffle(index.begin() + r * length, index.begin() + (r + 1) * length, rng);
  }
  const auto run = [&](const std::vector<I>& map) {
    const starfast::ops::PermuteArgs args{rows.data(), map.data(), out.data(), num_rows, length, shared,
                                          static_cast<int>(sizeof(T)),
                                          sizeof(I) == 4 ? IndexType::kInt32 : IndexType::kInt64};
    return starfast::ops::permute_cpu(args, threads);
  };
  // What a plain loop reads, with an out-of-range value reading its own position.
  const auto expected = [&](const std::vector<I>& map) {
    std::vector<T> want(rows.size());
    for (int64_t r = 0; r < num_rows; ++r) {
      for (int64_t p = 0; p < length; ++p) {
        const int64_t v = static_cast<int64_t>(map[(shared ? 0 : r * length) + p]);
        want[r * length + p] = rows[r * length + (v >= 0 && v < length ? v : p)];
      }
    }
    return want;
  };
  expect(run(index) == -1 && out == expected(index), name + ": valid index");
  std::uniform_int_distribution<int64_t> place(0, static_cast<int64_t>(index.size()) - 1);
  for (I value : bad_values<I>(length)) {
    std::vector<I> spoiled(index);
    const int64_t a = place(rng), b = place(rng);
    spoiled[a] = spoiled[b] = value;
    const int64_t bad = run(spoiled);
    expect(bad == std::min(a, b), name + ": value " + std::to_string(static_cast<int64_t>(value)) + " reported at " +
                                      std::to_string(bad) + ", expected " + std::to_string(std::min(a, b)));
    expect(out == expected(spoiled), name + ": out-of-range values read their own position");
  }
}

template <typename T, typename I>
void check_lerp_gather(int64_t length, int threads, std::mt19937_64& rng) {
  const std::string name = std::string("lerp_gather ") + (sizeof(T) == 4 ? "float32" : "float64") + ", int" +
                           std::to_string(8 * sizeof(I)) + " index, " + std::to_string(threads) + " threads";
  std::normal_distribution<double> normal;
  std::vector<T> theta(length), source(length), out(length);
  for (auto& e : theta) e = static_cast<T>(normal(rng));
  for (auto& e : source) e = static_cast<T>(normal(rng));
  std::vector<I> index(length);
  std::iota(index.begin(), index.end(), I{0});
  std::shuffle(index.begin(), index.end(), rng);
  const double t = 0.3;
  const auto run = [&](const std::vector<I>& map) {
    const starfast::ops::LerpGatherArgs args{theta.data(), source.data(), map.data(), out.data(), length, t,
                                             sizeof(T) == 4 ? starfast::ops::FloatType::kFloat32
                                                            : starfast::ops::FloatType::kFloat64,
                                             sizeof(I) == 4 ? IndexType::kInt32 : IndexType::kInt64};
    return starfast::ops::lerp_gather_cpu(args, threads);
  };
  const auto expected = [&](const std::vector<I>& map) {
    std::vector<T> want(length);
    for (int64_t p = 0; p < length; ++p) {
      const int64_t v = static_cast<int64_t>(map[p]);
      want[p] = starfast::ops::lerp_like_torch<T>(theta[p], source[v >= 0 && v < length ? v : p], static_cast<T>(t));
    }
    return want;
  };
  expect(run(index) == -1 && out == expected(index), name + ": valid index");
  std::uniform_int_distribution<int64_t> place(0, length - 1);
  for (I value : bad_values<I>(length)) {
    std::vector<I> spoiled(index);
    const int64_t a = place(rng), b = place(rng);
    spoiled[a] = spoiled[b] = value;
    expect(run(spoiled) == std::min(a, b), name + ": value " + std::to_string(static_cast<int64_t>(value)) +
                                               " not reported at its lowest place");
    expect(out == expected(spoiled), name + ": out-of-range values read their own position");
  }
}

template <typename I>
void check_index_type(std::mt19937_64& rng) {
  for (int threads : {1, 2}) {
    // 150,001 elements: the parallel loops split them between two threads (grain 2^15).
    for (int64_t length : {int64_t{1}, int64_t{37}, int64_t{150001}}) {
      for (bool shared : {true, false}) {
        check_permute<uint16_t, I>(3, length, shared, threads, rng);
        check_permute<uint32_t, I>(3, length, shared, threads, rng);
        check_permute<uint64_t, I>(3, length, shared, threads, rng);
      }
      check_lerp_gather<float, I>(length, threads, rng);
      check_lerp_gather<double, I>(length, threads, rng);
    }
  }
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261202);
  check_bounds();
  check_index_type<int32_t>(rng);
  check_index_type<int64_t>(rng);
  std::printf("index handling: %d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
