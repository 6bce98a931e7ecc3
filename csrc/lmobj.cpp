// Op schemas of the lmobj library and the module's build info.
// Kernels register against these in cpu/*.cpp (CPU) and cuda/*_ops.cpp (CUDA); fakes and autograd live in Python.
#include <torch/library.h>
#include <Python.h>

#include <string>

#if defined(LMOBJ_WITH_CUDA) && LMOBJ_WITH_CUDA
#include "cuda/corruption.cuh"
#endif

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
  // Low-memory linear CE: `block` (N, C) holds columns [col0, col0 + C) of V-column logit rows; overwrite it with
  // weight_rows[r] * d loss_r / d z (loss_r with row lse lse[r] and target target[r], any value where
  // weight_rows[r] == 0).
  m.def("ce_grad_cols_(Tensor(a!) block, Tensor target, Tensor lse, Tensor weight_rows, int col0, int vocab, "
        "float label_smoothing, float z_loss, float softcap) -> ()");

  // ---- corruption family (ALGORITHMS.md, "Randomness", "T5 span corruption", "MLM masking") ----
  // Philox counters use the global row row_offset + r, so a row's bytes depend on the seed (int64 [1] tensor
  // on the device of input_ids) and that index only.
  // T5 span corruption of row r's first lengths[r] tokens: (inputs (B, inputs_width) padded with pad_id,
  // targets (B, targets_width) padded with label_pad_id). Sentinel q of a row is sentinel_ids[q].
  m.def("span_corrupt(Tensor input_ids, Tensor lengths, Tensor seed, int row_offset, float noise_density, "
        "float mean_span_length, Tensor sentinel_ids, int eos_id, int pad_id, int label_pad_id, int inputs_width, "
        "int targets_width) -> (Tensor, Tensor)");
  // BERT masking: (inputs, labels). Thresholds are probabilities times 2^32 (select: per-unit selection
  // probability, or with exact the IEEE-754 bits of the float64 rate p of the count round(E * p); mask / random:
  // cumulative 80/10/10 cut points).
  m.def("mlm_mask(Tensor input_ids, Tensor? word_ids, Tensor seed, int row_offset, Tensor special_ids, bool exact, "
        "int select_threshold, int mask_threshold, int random_threshold, int random_low, int random_range, "
        "int mask_id, int ignore_index) -> (Tensor, Tensor)");
  // ---- end corruption family ----
}

// The module itself only tells what it was built with; the ops are reached through torch.ops.lmobj.
static PyObject* lmobj_build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:O,s:s,s:s}", "with_cuda", LMOBJ_WITH_CUDA ? Py_True : Py_False, "cuda_archs",
                       LMOBJ_CUDA_ARCHS, "torch_version_built", LMOBJ_TORCH_VERSION);
}

// Shared memory per block the CUDA corruption kernels need for rows of S tokens ("span", or "mlm" with word
// ids or exact counts; plain masking needs none): the Python API's `auto` passes rows over the card's limit on to
// Triton. None when built without CUDA.
static PyObject* lmobj_cuda_row_smem(PyObject*, PyObject* args) {
  const char* kind = nullptr;
  long long S = 0;
  if (!PyArg_ParseTuple(args, "sL", &kind, &S)) return nullptr;
#if LMOBJ_WITH_CUDA
  const std::string k(kind);
  if (k != "span" && k != "mlm") {
    PyErr_SetString(PyExc_ValueError, "kind must be 'span' or 'mlm'");
    return nullptr;
  }
  const size_t bytes = k == "span" ? lmobj::cuda::span_smem_bytes(S) : lmobj::cuda::mlm_smem_bytes(S, true, false);
  return PyLong_FromSize_t(bytes);
#else
  (void)kind;
  (void)S;
  Py_RETURN_NONE;
#endif
}

static PyMethodDef methods[] = {{"build_info", lmobj_build_info, METH_NOARGS, "What _C was built with."},
                                {"cuda_row_smem", lmobj_cuda_row_smem, METH_VARARGS,
                                 "Shared memory of a CUDA corruption block for rows of S tokens."},
                                {nullptr, nullptr, 0, nullptr}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
