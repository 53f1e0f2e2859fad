// The Python module lora_kernels._C, in both builds: the CPU-only one (module.cpp + cpu/*.cpp,
// the C++ compiler alone) and the CUDA one (also lora.cpp and cuda/). `import lora_kernels._C`
// loads the library, which runs the static op registrations of its sources; the module itself
// is empty (no pybind11 needed).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "Compiled kernels of lora_kernels: the CPU dropout mask (torch.ops.lora_kernels.dropout_*) and, "
      "in a CUDA build, the CUDA kernels (torch.ops.lora_kernels.cuda_*)",  // m_doc
      -1,       // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}
