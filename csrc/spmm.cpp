// Op schemas of the diffkg_fast extension (one TORCH_LIBRARY for the whole namespace).
//
// Kernels register per dispatch key: CPU in cpu/spmm_cpu.cpp, CUDA in cuda/. The autograd
// formulas and the fake (meta) implementations live in Python (diffkg_fast/ops/spmm.py,
// torch.library.register_autograd / register_fake), as in pytorch/extension-cpp.
//
//   csr_spmm(rowptr, col, val, x)             out[r] = sum_k val[k] * x[col[k]],
//                                             k in rowptr[r] .. rowptr[r+1]-1
//   csr_propagate(rowptr, col, val, x, L)     sum_{l=0..L} A^l x for a square A (LightGCN)
//
// rowptr and col are int64, val and x share a floating dtype, x is (n_cols, d) and the result
// (n_rows, d). A is a constant of the data: the autograd formula differentiates x only.

#include <torch/library.h>

#ifdef DIFFKG_FAST_PYTHON_MODULE
// Ahead-of-time build (setup.py): the library is importable as `diffkg_fast._C`, whose import
// runs the registrations below. The JIT build (torch.utils.cpp_extension.load with
// is_python_module=False) is a plain shared library loaded by torch.ops.load_library.
#include <Python.h>
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(diffkg_fast, m) {
  m.def("csr_spmm(Tensor rowptr, Tensor col, Tensor val, Tensor x) -> Tensor");
  m.def("csr_propagate(Tensor rowptr, Tensor col, Tensor val, Tensor x, int layers) -> Tensor");
}
