// Op schemas of the lmobj library and the module's build info.
// Kernels register against these in cpu/*.cpp (CPU) and cuda/*_ops.cpp (CUDA); fakes and autograd live in Python.
#include <torch/library.h>
#include <Python.h>

#include <string>

#ifndef LMOBJ_WITH_CUDA
#define LMOBJ_WITH_CUDA 0
#endif
#ifndef LMOBJ_CUDA_ARCHS
#define LMOBJ_CUDA_ARCHS ""
#endif
#ifndef LMOBJ_TORCH_VERSION
#define LMOBJ_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(lmobj, m) {
  // ---- cross-entropy family (ALGORITHMS.md, "Cross-entropy family") ----
  // Row r of `logits` (N, V) is scored against target[row_offset + r], or with shift_len = S > 0 against
  // target[row_offset + r + 1] (ignored when (row_offset + r) % S == S - 1): causal LM without copying labels.
  // softcap <= 0 means no cap. Returns per-row loss (float32, 0 at ignored rows) and lse (float32).
  m.def("ce_fwd(Tensor logits, Tensor target, int row_offset, int shift_len, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)");
  // Gradient of sum_r grad_loss[r] * loss[r] w.r.t. logits, in the logits' dtype.
  m.def("ce_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, int row_offset, int shift_len, "
        "int ignore_index, float label_smoothing, float z_loss, float softcap) -> Tensor");
  // Forward, then overwrite `logits` (a scratch buffer the library owns) with d(sum of row losses)/d logits.
  m.def("ce_fwd_bwd_(Tensor(a!) logits, Tensor target, int row_offset, int shift_len, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)");
}

// The module itself only tells what it was built with; the ops are reached through torch.ops.lmobj.
static PyObject* lmobj_build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:O,s:s,s:s}", "with_cuda", LMOBJ_WITH_CUDA ? Py_True : Py_False, "cuda_archs",
                       LMOBJ_CUDA_ARCHS, "torch_version_built", LMOBJ_TORCH_VERSION);
}

static PyMethodDef methods[] = {{"build_info", lmobj_build_info, METH_NOARGS, "What _C was built with."},
                                {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
