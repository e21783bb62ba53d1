// The Python module skillkern._C and the schemas of the ops in torch.ops.skillkern.
//
// This is the only TORCH_LIBRARY(skillkern, ...) block (a namespace may have one): kernels register with
// TORCH_LIBRARY_IMPL next to their code (stats_update.cpp: CPU, stats_update_cuda.cu: CUDA). The fake
// (meta) implementations used by torch.compile and FakeTensor live in skillkern/_ext.py.

#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(skillkern, m) {
  // Semantics in skillkern/ops/stats_update.py. Mutates `out` in place and returns nothing.
  m.def("stats_update(Tensor h, Tensor slot, Tensor label, Tensor(a!) out, Tensor? threshold) -> ()");
  // Semantics in skillkern/ops/stats_moments.py: per-slot float64 sum, sum of squares and sum of |h|.
  m.def("stats_moments(Tensor h, Tensor slot, Tensor(a!) out) -> ()");
}

// An empty module: `from skillkern import _C` exists only to load this library (and run the registrations).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "skillkern compiled ops (torch.ops.skillkern)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
