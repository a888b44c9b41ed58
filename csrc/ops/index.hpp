// Index handling shared by the CPU and CUDA kernels: the index types as C++ types, and the bounds
// check of every index value a gather reads through. Only the CUDA launch is not in here, so the
// CPU kernels (and csrc/ops/tests/test_ops.cpp) exercise what the CUDA kernels do with an index.
//
// An index value outside [0, length) is never read through: that element reads its own position
// instead, and the kernel reports the lowest position of the index array holding such a value
// (starfast/ops.py raises an IndexError naming it). The check is one unsigned compare per element
// inside the gather's single pass, so no index is ever trusted blindly.
#pragma once

#include <cstdint>

#include "host_device.hpp"
#include "kernels.hpp"

namespace starfast {
namespace ops {

template <typename F>
void with_index_type(IndexType type, const F& f) {
  if (type == IndexType::kInt32) return f(int32_t{});
  f(int64_t{});
}

struct NoIndex {};  // lerp_gather without an index map: source[p]

template <typename F>
void with_optional_index_type(const void* index, IndexType type, const F& f) {
  if (index == nullptr) return f(NoIndex{});
  with_index_type(type, f);
}

// "No out-of-range value seen": the largest unsigned value, so that a minimum over positions
// (CUDA's atomicMin on unsigned long long, std::min on the CPU) keeps the lowest bad position.
constexpr uint64_t kNoBadIndex = ~uint64_t(0);

// True when `value` is a position in [0, length). Widened to int64 first (an int32 index keeps
// its sign), then one unsigned compare rejects negative values, which become huge.
template <typename I>
STARFAST_HOST_DEVICE inline bool index_in_bounds(I value, int64_t length) {
  return static_cast<uint64_t>(static_cast<int64_t>(value)) < static_cast<uint64_t>(length);
}

// The position element `p` of a row of `length` reads through index value `value`: the value
// itself when it is in bounds; otherwise `p` (in bounds: rows and out have the same length), with
// `at`, the value's place in the index array, lowered into `first_bad`.
template <typename I>
STARFAST_HOST_DEVICE inline int64_t checked_position(I value, int64_t length, int64_t p, int64_t at,
                                                     uint64_t& first_bad) {
  if (index_in_bounds(value, length)) return static_cast<int64_t>(value);
  if (static_cast<uint64_t>(at) < first_bad) first_bad = static_cast<uint64_t>(at);
  return p;
}

// The lowest bad position as the kernels return it to Python: -1 when there was none.
inline int64_t bad_index_result(uint64_t first_bad) {
  return first_bad == kNoBadIndex ? -1 : static_cast<int64_t>(first_bad);
}

}  // namespace ops
}  // namespace starfast
