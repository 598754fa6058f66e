// Python module stub: importing ccl_ops._C loads this library, whose static
// initialisers register the ccl:: operators with the dispatcher.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ccl_ops compiled operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
