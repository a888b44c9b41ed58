// CPU kernels of the flat-row gathers (contracts in ../kernels.hpp): permute and lerp_gather,
// each one pass over its rows, parallel over contiguous chunks, checking every index value as it
// reads through it (index.hpp); each chunk keeps its lowest bad position, the call the lowest of all.
#include <algorithm>
#include <atomic>
#include <type_traits>

#include "../dispatch.hpp"
#include "../index.hpp"
#include "../kernels.hpp"
#include "../lerp.hpp"
#include "parallel.hpp"
#include "reduced_float.hpp"

namespace starfast {
namespace ops {
namespace {

// Lowers `shared` to `value` (chunks of a parallel loop report their lowest bad positions).
void lower_to(std::atomic<uint64_t>& shared, uint64_t value) {
  uint64_t seen = shared.load();
  while (value < seen && !shared.compare_exchange_weak(seen, value)) {
  }
}

template <typename T, typename I>
int64_t permute_typed(const PermuteArgs& args, int threads) {
  const T* rows = static_cast<const T*>(args.rows);
  const I* index = static_cast<const I*>(args.index);
  T* out = static_cast<T*>(args.out);
  const int64_t length = args.length;
  const bool shared = args.shared_index;
  std::atomic<uint64_t> first_bad{kNoBadIndex};
  parallel_for(args.num_rows * length, threads, [&](int64_t begin, int64_t end) {
    uint64_t chunk_bad = kNoBadIndex;
    for (int64_t k = begin; k < end;) {  // one row segment at a time
      const int64_t first = k / length * length, stop = std::min(end, first + length);
      const T* row = rows + first;
      const int64_t index_start = shared ? 0 : first;  // where this row's index values begin
      const I* row_index = index + index_start;
      for (; k < stop; ++k) {
        const int64_t p = k - first;
        out[k] = row[checked_position(row_index[p], length, p, index_start + p, chunk_bad)];
      }
    }
    if (chunk_bad != kNoBadIndex) lower_to(first_bad, chunk_bad);
  });
  return bad_index_result(first_bad.load());
}

// How lerp_gather reads and writes an element of each row type, and the type it computes in.
template <typename T>
struct Element {
  using acc_t = T;  // float, double
  static T load(T value) { return value; }
  static T store(T value) { return value; }
};
template <>
struct Element<BFloat16> {
  using acc_t = float;
  static float load(BFloat16 value) { return to_float(value); }
  static BFloat16 store(float value) { return to_bfloat16(value); }
};
template <>
struct Element<Float16> {
  using acc_t = float;
  static float load(Float16 value) { return to_float(value); }
  static Float16 store(float value) { return to_float16(value); }
};

// Returns the lowest position in [begin, end) whose index value is out of range (kNoBadIndex if none).
template <typename T, typename I>
inline __attribute__((always_inline)) uint64_t lerp_range(const LerpGatherArgs& args, int64_t begin, int64_t end) {
  using E = Element<T>;
  using acc_t = typename E::acc_t;
  const T* theta = static_cast<const T*>(args.theta);
  const T* source = static_cast<const T*>(args.source);
  T* out = static_cast<T*>(args.out);
  const acc_t w = static_cast<acc_t>(args.t);
  uint64_t first_bad = kNoBadIndex;
  if constexpr (std::is_same_v<I, NoIndex>) {
    for (int64_t p = begin; p < end; ++p) out[p] = E::store(lerp_like_torch<acc_t>(E::load(theta[p]), E::load(source[p]), w));
  } else {
    const I* index = static_cast<const I*>(args.index);
    const int64_t length = args.length;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t j = checked_position(index[p], length, p, p, first_bad);
      out[p] = E::store(lerp_like_torch<acc_t>(E::load(theta[p]), E::load(source[j]), w));
    }
  }
  return first_bad;
}

#if defined(__x86_64__)
// The fma must be an instruction, not a libm call: x86-64's baseline has no FMA, so the loop is
// also compiled for AVX2 + FMA (every x86 CPU since 2013) and chosen at run time.
template <typename T, typename I>
__attribute__((target("avx2,fma"))) uint64_t lerp_range_fma(const LerpGatherArgs& args, int64_t begin, int64_t end) {
  return lerp_range<T, I>(args, begin, end);
}

bool cpu_has_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename T, typename I>
int64_t lerp_typed(const LerpGatherArgs& args, int threads) {
  std::atomic<uint64_t> first_bad{kNoBadIndex};
  parallel_for(args.length, threads, [&](int64_t begin, int64_t end) {
    uint64_t chunk_bad;
#if defined(__x86_64__)
    if (cpu_has_fma()) {
      chunk_bad = lerp_range_fma<T, I>(args, begin, end);
    } else
#endif
    {
      chunk_bad = lerp_range<T, I>(args, begin, end);
    }
    if (chunk_bad != kNoBadIndex) lower_to(first_bad, chunk_bad);
  });
  return bad_index_result(first_bad.load());
}

}  // namespace

int64_t permute_cpu(const PermuteArgs& args, int threads) {
  int64_t bad = -1;
  with_index_type(args.index_type, [&](auto index) {
    with_element_type(args.element_size, [&](auto element) {
      bad = permute_typed<decltype(element), decltype(index)>(args, threads);
    });
  });
  return bad;
}

int64_t lerp_gather_cpu(const LerpGatherArgs& args, int threads) {
  int64_t bad = -1;
  with_optional_index_type(args.index, args.index_type, [&](auto index) {
    using I = decltype(index);
    switch (args.dtype) {
      case FloatType::kFloat32: bad = lerp_typed<float, I>(args, threads); break;
      case FloatType::kFloat64: bad = lerp_typed<double, I>(args, threads); break;
      case FloatType::kBFloat16: bad = lerp_typed<BFloat16, I>(args, threads); break;
      case FloatType::kFloat16: bad = lerp_typed<Float16, I>(args, threads); break;
    }
  });
  return bad;
}

}  // namespace ops
}  // namespace starfast
