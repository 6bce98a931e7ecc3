// Argument checks shared by the CPU and CUDA registrations (host only). The Python API checks first and names
// the user's arguments; these guard direct torch.ops.lmobj calls against out-of-bounds access.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace lmobj {

// cols_ok (the CPU kernels): also the column layout, a transposed view of a (V, N)-shaped buffer whose rows may be
// longer than N (strides (1, ld), ld >= N), in which the CPU linear cross-entropy computes its logits.
inline void check_ce_args(const char* op, const at::Tensor& logits, const at::Tensor& target, int64_t row_offset,
                          int64_t shift_len, bool cols_ok = false) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, V), got ", logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have at least one class");
  // a dimension of size 1 has no stride to speak of ((13, 1) logits from a transpose: strides (1, 13)), nor has
  // an empty tensor (NumPy's (0, V) arrays: strides (0, 0)); PyTorch calls all of these contiguous
  const bool rows = logits.numel() == 0 || ((logits.stride(1) == 1 || logits.size(1) == 1) &&
                                            (logits.stride(0) >= logits.size(1) || logits.size(0) == 1));
  const bool cols = cols_ok && logits.numel() > 0 && (logits.stride(0) == 1 || logits.size(0) == 1) &&
                    logits.stride(1) >= logits.size(0);
  TORCH_CHECK(rows || cols, op,
              cols_ok ? ": logits must have contiguous rows (stride(1) == 1) or columns (stride(0) == 1)"
                      : ": logits rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.is_contiguous(), op,
              ": target must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(target.device() == logits.device(), op, ": target and logits must be on the same device");
  TORCH_CHECK(row_offset >= 0 && row_offset + logits.size(0) <= target.numel(), op,
              ": target has ", target.numel(), " rows, fewer than row_offset + N = ", row_offset + logits.size(0));
  TORCH_CHECK(shift_len >= 0, op, ": shift_len must be >= 0");
  TORCH_CHECK(shift_len == 0 || target.numel() % shift_len == 0, op,
              ": with shift_len the target must hold whole sequences (numel % shift_len == 0)");
}

// A per-row float32 input of the rows of `like` (on its device: a kernel would read a host pointer otherwise).
inline void check_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  const int64_t n = like.size(0);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == n && t.is_contiguous(), op, ": ", name,
              " must be a contiguous float32 vector of ", n, " rows");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
}

// The CUDA kernels launch one block per row on a 1-D grid, whose x dimension holds up to 2^31 - 1 blocks.
inline void check_grid_rows(const char* op, int64_t n) {
  TORCH_CHECK(n < (int64_t{1} << 31), op, ": ", n, " rows are more than one launch holds (2^31 - 1); split them");
}

inline void check_grad_cols_args(const char* op, const at::Tensor& block, const at::Tensor& target,
                                 const at::Tensor& lse, const at::Tensor& w, int64_t col0, int64_t vocab) {
  TORCH_CHECK(block.dim() == 2 && block.stride(1) == 1 && block.stride(0) >= block.size(1), op,
              ": block must be 2-D with contiguous rows");
  const int64_t n = block.size(0);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.numel() == n &&
                  target.is_contiguous(), op, ": target must be a contiguous int64 vector of ", n, " rows");
  check_row_vector(op, "lse", lse, block);
  check_row_vector(op, "weight_rows", w, block);
  TORCH_CHECK(target.device() == block.device(), op, ": target must be on the device of block");
  TORCH_CHECK(col0 >= 0 && vocab >= col0 + block.size(1), op, ": columns [", col0, ", ", col0 + block.size(1),
              ") are outside a vocabulary of ", vocab);
}

}  // namespace lmobj
