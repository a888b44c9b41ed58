// STARFAST_HOST_DEVICE marks the functions the CPU and CUDA kernels share (lerp.hpp, index.hpp):
// compiled for both sides by nvcc, plain inline functions for the C++ compiler.
#pragma once

#if defined(__CUDACC__)
#define STARFAST_HOST_DEVICE __host__ __device__
#else
#define STARFAST_HOST_DEVICE
#endif
