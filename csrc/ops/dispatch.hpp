// Element type dispatch shared by the CPU and CUDA kernels: a runtime element size becomes a C++
// type, handed to a generic lambda as a value of that type (index types: index.hpp).
#pragma once

#include <cstdint>

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

}  // namespace ops
}  // namespace starfast
