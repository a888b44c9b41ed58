// The Python module shell of starfast._C. The extension exposes no Python functions: importing
// it runs the static TORCH_LIBRARY registrations, after which the ops live in torch.ops.starfast.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
