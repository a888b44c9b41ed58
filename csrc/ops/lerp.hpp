// torch.lerp's arithmetic, shared by the CPU and CUDA kernels so that lerp_gather rounds exactly
// as torch.lerp(theta, source[index], t) does.
#pragma once

#include <cmath>

#include "host_device.hpp"

namespace starfast {
namespace ops {

// torch computes |w| < 0.5 ? a + w (b - a) : b - (b - a)(1 - w) in the rows' "op math" type
// (float for float32 and the 16-bit types). Its vectorised CPU kernels evaluate that with one
// fused multiply-add (fmadd(w, b - a, a), fmadd(w - 1, b - a, b)) and nvcc contracts the scalar
// form into the same fma, so the fma is what matches it bit for bit; two roundings would not.
template <typename acc_t>
STARFAST_HOST_DEVICE inline acc_t lerp_like_torch(acc_t a, acc_t b, acc_t w) {
  return std::fabs(w) < acc_t(0.5) ? std::fma(w, b - a, a) : std::fma(w - acc_t(1), b - a, b);
}

}  // namespace ops
}  // namespace starfast
