// The compiled core of starfast's ops: kernels on plain pointers, sizes and type codes, with no
// torch (or Python) headers, so one build loads with any torch. starfast/ops.py registers the ops
// through torch.library and checks shapes, dtypes, devices and contiguity before calling these
// (through the bindings in module.cpp); the kernels trust their pointers, sizes and codes, but not
// the values of an index: an out-of-range value is never read through (index.hpp) but reported.
#pragma once

#include <cstdint>
#include <string>

namespace starfast {
namespace ops {

// Floating element types of lerp_gather's rows; the codes are exported to Python by module.cpp.
enum class FloatType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };
enum class IndexType : int { kInt32 = 0, kInt64 = 1 };

// out[r, p] = rows[r, index[shared_index ? p : r * length + p]] for r < num_rows, p < length;
// rows and out are contiguous [num_rows, length] of element_size bytes (2, 4 or 8: permute
// only moves elements, so their type does not matter). out must not overlap rows.
struct PermuteArgs {
  const void* rows;
  const void* index;
  void* out;
  int64_t num_rows;
  int64_t length;
  bool shared_index;
  int element_size;
  IndexType index_type;
};

// out[p] = torch.lerp(theta[p], source[index[p]], t) for p < length (source[p] when index is
// null), computed in float (double for float64 rows) and rounded as torch.lerp rounds.
struct LerpGatherArgs {
  const void* theta;
  const void* source;
  const void* index;
  void* out;
  int64_t length;
  double t;
  FloatType dtype;
  IndexType index_type;
};

// CPU kernels (cpu/*.cpp), parallel over at most `threads` OpenMP threads. An index value outside
// [0, length) reads the element's own position instead; each returns the lowest position in the
// index array ([length], or [num_rows, length] flat for a per-row permute index) holding such a
// value, or -1 when every value was in bounds.
int64_t permute_cpu(const PermuteArgs& args, int threads);
int64_t lerp_gather_cpu(const LerpGatherArgs& args, int threads);

// Solves `batch` dense [n, n] problems stored contiguously (float32 or float64) with the
// Jonker-Volgenant solver of csrc/lap, one problem per thread at a time; writes each row's column
// to out [batch, n]. Returns an empty string, or the first problem's error (a NaN or infinite
// entry), naming the problem when batch > 1.
std::string linear_assignment_cpu(const void* cost, FloatType dtype, int64_t batch, int64_t n, bool maximize,
                                  int64_t* out, int threads);

// CUDA kernels (cuda/gather.cu, built only where nvcc is found): launched on `stream` (a
// cudaStream_t: torch's current stream) of GPU `device`. Return an empty string or CUDA's error.
// Out-of-range index values are handled as on the CPU; the lowest bad position is lowered into
// `first_bad` (one uint64 in device memory, set to all ones by the caller) when it is not null.
std::string permute_cuda(const PermuteArgs& args, uint64_t* first_bad, int device, void* stream);
std::string lerp_gather_cuda(const LerpGatherArgs& args, uint64_t* first_bad, int device, void* stream);

}  // namespace ops
}  // namespace starfast
