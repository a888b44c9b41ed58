// Type dispatch shared by the CPU and CUDA kernels: a runtime element size or index code becomes
// a C++ type, handed to a generic lambda as a value of that type.
#pragma once

#include <cstdint>

#include "kernels.hpp"

namespace starfast {
namespace ops {

// permute only moves elements: the unsigned integer of their size stands for any dtype.
template <typename F>
void with_element_type(int element_size, const F& f) {
  switch (element_size) {
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    default: return f(uint64_t{});
  }
}

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

}  // namespace ops
}  // namespace starfast
