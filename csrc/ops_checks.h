// Argument checks shared by the CPU and CUDA registrations (host only). The Python API checks first and names
// the user's arguments; these guard direct torch.ops.lmobj calls against out-of-bounds access.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace lmobj {

inline void check_ce_args(const char* op, const at::Tensor& logits, const at::Tensor& target, int64_t row_offset,
                          int64_t shift_len) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, V), got ", logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have at least one class");
  TORCH_CHECK(logits.stride(1) == 1 && logits.stride(0) >= logits.size(1), op,
              ": logits rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.is_contiguous(), op,
              ": target must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(target.device() == logits.device(), op, ": target and logits must be on the same device");
  TORCH_CHECK(row_offset >= 0 && row_offset + logits.size(0) <= target.numel(), op,
              ": target has ", target.numel(), " rows, fewer than row_offset + N = ", row_offset + logits.size(0));
  TORCH_CHECK(shift_len >= 0, op, ": shift_len must be >= 0");
  TORCH_CHECK(shift_len == 0 || target.numel() % shift_len == 0, op,
              ": with shift_len the target must hold whole sequences (numel % shift_len == 0)");
}

inline void check_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == n && t.is_contiguous(), op, ": ", name,
              " must be a contiguous float32 vector of ", n, " rows");
}

inline void check_grad_cols_args(const char* op, const at::Tensor& block, const at::Tensor& target,
                                 const at::Tensor& lse, const at::Tensor& w, int64_t col0, int64_t vocab) {
  TORCH_CHECK(block.dim() == 2 && block.stride(1) == 1 && block.stride(0) >= block.size(1), op,
              ": block must be 2-D with contiguous rows");
  const int64_t n = block.size(0);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.numel() == n &&
                  target.is_contiguous(), op, ": target must be a contiguous int64 vector of ", n, " rows");
  check_row_vector(op, "lse", lse, n);
  check_row_vector(op, "weight_rows", w, n);
  TORCH_CHECK(target.device() == block.device() && lse.device() == block.device() && w.device() == block.device(),
              op, ": all tensors must be on the device of block");
  TORCH_CHECK(col0 >= 0 && vocab >= col0 + block.size(1), op, ": columns [", col0, ", ", col0 + block.size(1),
              ") are outside a vocabulary of ", vocab);
}

}  // namespace lmobj
