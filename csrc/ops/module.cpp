// starfast._C: Python bindings of the compiled core (../kernels.hpp), on Python's limited API so
// one build serves every CPython >= 3.9, and with no torch headers so it serves every torch.
// Each function takes data pointers (tensor.data_ptr()), sizes and the type codes exported below,
// already checked by starfast/ops.py; the CPU kernels run with the GIL released and return the
// lowest position of an out-of-range index value (-1: none), which ops.py turns into an IndexError.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string>

#include "kernels.hpp"

namespace {

using starfast::ops::FloatType;
using starfast::ops::IndexType;
using starfast::ops::LerpGatherArgs;
using starfast::ops::PermuteArgs;

// The codes arrive from Python as ints; a wrong one is a bug in ops.py, reported, not trusted.
bool valid_codes(int index_type, int float_type, int element_size) {
  if (index_type < 0 || index_type > 1 || float_type < 0 || float_type > 3 ||
      (element_size != 2 && element_size != 4 && element_size != 8)) {
    PyErr_Format(PyExc_ValueError, "starfast._C: invalid type codes (index %d, float %d, element size %d)",
                 index_type, float_type, element_size);
    return false;
  }
  return true;
}

// Each op's CPU and CUDA forms share their leading arguments; then come the CPU's thread count,
// or for CUDA the kernel's bad-position slot (a device pointer, 0 for none), device and stream.
struct Trailing {
  int threads_or_device = 0;
  unsigned long long first_bad = 0, stream = 0;
};

bool parse_permute(PyObject* args, bool cuda, PermuteArgs* op, Trailing* trailing) {
  unsigned long long rows, index, out;
  long long num_rows, length;
  int shared, element_size, index_type;
  const bool parsed =
      cuda ? PyArg_ParseTuple(args, "KKKLLpiiKiK", &rows, &index, &out, &num_rows, &length, &shared, &element_size,
                              &index_type, &trailing->first_bad, &trailing->threads_or_device, &trailing->stream)
           : PyArg_ParseTuple(args, "KKKLLpiii", &rows, &index, &out, &num_rows, &length, &shared, &element_size,
                              &index_type, &trailing->threads_or_device);
  if (!parsed || !valid_codes(index_type, 0, element_size)) return false;
  *op = {reinterpret_cast<const void*>(rows), reinterpret_cast<const void*>(index), reinterpret_cast<void*>(out),
         num_rows, length, shared != 0, element_size, static_cast<IndexType>(index_type)};
  return true;
}

bool parse_lerp_gather(PyObject* args, bool cuda, LerpGatherArgs* op, Trailing* trailing) {
  unsigned long long theta, source, index, out;
  long long length;
  double t;
  int float_type, index_type;
  const bool parsed =
      cuda ? PyArg_ParseTuple(args, "KKKKLdiiKiK", &theta, &source, &index, &out, &length, &t, &float_type, &index_type,
                              &trailing->first_bad, &trailing->threads_or_device, &trailing->stream)
           : PyArg_ParseTuple(args, "KKKKLdiii", &theta, &source, &index, &out, &length, &t, &float_type, &index_type,
                              &trailing->threads_or_device);
  if (!parsed || !valid_codes(index_type, float_type, 4)) return false;
  *op = {reinterpret_cast<const void*>(theta), reinterpret_cast<const void*>(source),
         reinterpret_cast<const void*>(index), reinterpret_cast<void*>(out), length, t,
         static_cast<FloatType>(float_type), static_cast<IndexType>(index_type)};
  return true;
}

template <typename Op>
using Parser = bool (*)(PyObject*, bool, Op*, Trailing*);

// The CPU binding of an op: parse, run the kernel on the caller's thread count, return the
// lowest bad index position (-1: none).
template <typename Op, Parser<Op> Parse, int64_t (*Kernel)(const Op&, int)>
PyObject* on_cpu(PyObject*, PyObject* args) {
  Op op;
  Trailing trailing;
  if (!Parse(args, false, &op, &trailing)) return nullptr;
  int64_t bad;
  Py_BEGIN_ALLOW_THREADS
  bad = Kernel(op, trailing.threads_or_device);
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(bad);
}

PyObject* linear_assignment(PyObject*, PyObject* args) {
  unsigned long long cost, out;
  int float_type, maximize, threads;
  long long batch, n;
  if (!PyArg_ParseTuple(args, "KiLLpKi", &cost, &float_type, &batch, &n, &maximize, &out, &threads)) return nullptr;
  if (float_type != static_cast<int>(FloatType::kFloat32) && float_type != static_cast<int>(FloatType::kFloat64)) {
    PyErr_Format(PyExc_ValueError, "starfast._C.linear_assignment: cost must be float32 or float64 (code %d)", float_type);
    return nullptr;
  }
  std::string error;
  Py_BEGIN_ALLOW_THREADS
  error = starfast::ops::linear_assignment_cpu(reinterpret_cast<const void*>(cost), static_cast<FloatType>(float_type),
                                               batch, n, maximize != 0, reinterpret_cast<int64_t*>(out), threads);
  Py_END_ALLOW_THREADS
  if (!error.empty()) {
    PyErr_SetString(PyExc_ValueError, error.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

#ifdef STARFAST_WITH_CUDA
// The CUDA binding of an op: parse, then launch on the given device and stream (asynchronous, so
// the GIL is kept; a launch error becomes a RuntimeError).
template <typename Op, Parser<Op> Parse, std::string (*Kernel)(const Op&, uint64_t*, int, void*)>
PyObject* on_cuda(PyObject*, PyObject* args) {
  Op op;
  Trailing trailing;
  if (!Parse(args, true, &op, &trailing)) return nullptr;
  const std::string error = Kernel(op, reinterpret_cast<uint64_t*>(trailing.first_bad), trailing.threads_or_device,
                                   reinterpret_cast<void*>(trailing.stream));
  if (!error.empty()) {
    PyErr_SetString(PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}
#endif

PyMethodDef methods[] = {
    {"permute", on_cpu<PermuteArgs, parse_permute, starfast::ops::permute_cpu>, METH_VARARGS,
     "permute(rows, index, out, num_rows, length, shared_index, element_size, index_type, threads) -> bad position"},
    {"lerp_gather", on_cpu<LerpGatherArgs, parse_lerp_gather, starfast::ops::lerp_gather_cpu>, METH_VARARGS,
     "lerp_gather(theta, source, index or 0, out, length, t, float_type, index_type, threads) -> bad position"},
    {"linear_assignment", linear_assignment, METH_VARARGS,
     "linear_assignment(cost, float_type, batch, n, maximize, out, threads); ValueError on a non-finite cost"},
#ifdef STARFAST_WITH_CUDA
    {"permute_cuda", on_cuda<PermuteArgs, parse_permute, starfast::ops::permute_cuda>, METH_VARARGS,
     "permute_cuda(rows, index, out, num_rows, length, shared_index, element_size, index_type, first_bad or 0, device, "
     "stream)"},
    {"lerp_gather_cuda", on_cuda<LerpGatherArgs, parse_lerp_gather, starfast::ops::lerp_gather_cuda>, METH_VARARGS,
     "lerp_gather_cuda(theta, source, index or 0, out, length, t, float_type, index_type, first_bad or 0, device, "
     "stream)"},
#endif
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "starfast's compiled core (see csrc/ops/kernels.hpp)", -1,
                          methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const struct {
    const char* name;
    int value;
  } codes[] = {{"FLOAT32", static_cast<int>(FloatType::kFloat32)},   {"FLOAT64", static_cast<int>(FloatType::kFloat64)},
               {"BFLOAT16", static_cast<int>(FloatType::kBFloat16)}, {"FLOAT16", static_cast<int>(FloatType::kFloat16)},
               {"INT32", static_cast<int>(IndexType::kInt32)},       {"INT64", static_cast<int>(IndexType::kInt64)}};
  for (const auto& code : codes) {
    if (PyModule_AddIntConstant(module, code.name, code.value) < 0) {
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
