// The op schemas of the CUDA backend, declared once. The kernels register
// themselves beside their sources (cuda/forward.cu, cuda/backward.cu,
// cuda/merge.cu: TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m)).
//
// NOTE: lora_kernels/ops.py defines lora_kernels::lora_forward & co. through
// torch.library.custom_op, a FRAGMENT of the same namespace; a fragment and
// this one TORCH_LIBRARY block coexist in either import order.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lora_kernels._C` loads this library, which runs the static
// registrations below; the module itself is empty (no pybind11 needed).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "Hand-written CUDA kernels of lora_kernels (ops under torch.ops.lora_kernels.cuda_*)",  // m_doc
      -1,    // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lora_kernels, m) {
  // (y, xa) with xa = scaling · (x ⊙ D) Aᵀ and y = x W0ᵀ + b + xa Bᵀ; x is (M, K). seed: 0-dim int64
  // tensor on x's device, read by the kernels (only when dropout_p > 0).
  m.def(
      "cuda_lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout_p, Tensor seed) -> (Tensor, Tensor)");
  // (dx, dA, dB); dx has zero elements unless need_grad_x.
  m.def(
      "cuda_lora_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, "
      "Tensor xa, float scaling, float dropout_p, Tensor seed, bool need_grad_x) -> (Tensor, Tensor, Tensor)");
  // weight += scaling · lora_B lora_A in place (unmerge: -scaling).
  m.def("cuda_lora_merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scaling) -> ()");
  // The (rows, cols) bool dropout keep-mask of reference.dropout_keep_mask, bit for bit; seed: 0-dim int64
  // tensor on the CPU. Kernel: cpu/dropout.cpp (CPU only).
  m.def("dropout_keep_mask(int rows, int cols, float p, Tensor seed) -> Tensor");
  // x ⊙ D (reference.dropout_scale) for 2-D x on the CPU, in x's dtype; the same mask as dropout_keep_mask.
  m.def("dropout_scale(Tensor x, float p, Tensor seed) -> Tensor");
}
