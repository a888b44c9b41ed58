// CPU kernels of the flat-row gathers (contracts in ../kernels.hpp): permute and lerp_gather,
// each one pass over its rows, parallel over contiguous chunks.
#include <algorithm>
#include <type_traits>

#include "../dispatch.hpp"
#include "../kernels.hpp"
#include "../lerp.hpp"
#include "parallel.hpp"
#include "reduced_float.hpp"

namespace starfast {
namespace ops {
namespace {

template <typename T, typename I>
void permute_typed(const PermuteArgs& args, int threads) {
  const T* rows = static_cast<const T*>(args.rows);
  const I* index = static_cast<const I*>(args.index);
  T* out = static_cast<T*>(args.out);
  const int64_t length = args.length;
  const bool shared = args.shared_index;
  parallel_for(args.num_rows * length, threads, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end;) {  // one row segment at a time
      const int64_t first = k / length * length, stop = std::min(end, first + length);
      const T* row = rows + first;
      const I* row_index = index + (shared ? 0 : first);
      for (; k < stop; ++k) out[k] = row[row_index[k - first]];
    }
  });
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

template <typename T, typename I>
inline __attribute__((always_inline)) void lerp_range(const LerpGatherArgs& args, int64_t begin, int64_t end) {
  using E = Element<T>;
  using acc_t = typename E::acc_t;
  const T* theta = static_cast<const T*>(args.theta);
  const T* source = static_cast<const T*>(args.source);
  T* out = static_cast<T*>(args.out);
  const acc_t w = static_cast<acc_t>(args.t);
  if constexpr (std::is_same_v<I, NoIndex>) {
    for (int64_t p = begin; p < end; ++p) out[p] = E::store(lerp_like_torch<acc_t>(E::load(theta[p]), E::load(source[p]), w));
  } else {
    const I* index = static_cast<const I*>(args.index);
    for (int64_t p = begin; p < end; ++p) {
      out[p] = E::store(lerp_like_torch<acc_t>(E::load(theta[p]), E::load(source[index[p]]), w));
    }
  }
}

#if defined(__x86_64__)
// The fma must be an instruction, not a libm call: x86-64's baseline has no FMA, so the loop is
// also compiled for AVX2 + FMA (every x86 CPU since 2013) and chosen at run time.
template <typename T, typename I>
__attribute__((target("avx2,fma"))) void lerp_range_fma(const LerpGatherArgs& args, int64_t begin, int64_t end) {
  lerp_range<T, I>(args, begin, end);
}

bool cpu_has_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename T, typename I>
void lerp_typed(const LerpGatherArgs& args, int threads) {
  parallel_for(args.length, threads, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    if (cpu_has_fma()) return lerp_range_fma<T, I>(args, begin, end);
#endif
    lerp_range<T, I>(args, begin, end);
  });
}

}  // namespace

void permute_cpu(const PermuteArgs& args, int threads) {
  with_index_type(args.index_type, [&](auto index) {
    with_element_type(args.element_size, [&](auto element) {
      permute_typed<decltype(element), decltype(index)>(args, threads);
    });
  });
}

void lerp_gather_cpu(const LerpGatherArgs& args, int threads) {
  with_optional_index_type(args.index, args.index_type, [&](auto index) {
    using I = decltype(index);
    switch (args.dtype) {
      case FloatType::kFloat32: return lerp_typed<float, I>(args, threads);
      case FloatType::kFloat64: return lerp_typed<double, I>(args, threads);
      case FloatType::kBFloat16: return lerp_typed<BFloat16, I>(args, threads);
      case FloatType::kFloat16: return lerp_typed<Float16, I>(args, threads);
    }
  });
}

}  // namespace ops
}  // namespace starfast
