// The fusedbn operator library and the Python module that loads it. Each op family (csrc/<family>/) declares its
// schemas in a TORCH_LIBRARY_FRAGMENT and registers its kernels per dispatch key in TORCH_LIBRARY_IMPL blocks of its
// own cpu/, cuda/ and autograd/ folders; nothing here changes when a family is added.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedbn, m) {}

// A Python module with no functions: importing fusedbn._C loads the library and runs the registrations.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
