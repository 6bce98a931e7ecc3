// CUDA registrations of the cross-entropy ops: check, allocate, launch on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/cross_entropy.cuh"
#include "ops_checks.h"

namespace lmobj {
namespace {

cuda::DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::f32;
    case at::kHalf: return cuda::DType::f16;
    case at::kBFloat16: return cuda::DType::bf16;
    default: TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16");
  }
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& logits, const at::Tensor& target, int64_t row_offset,
                                       int64_t shift_len, int64_t ignore_index, double ls, double zl, double cap,
                                       bool inplace_grad) {
  check_ce_args("lmobj::ce_fwd", logits, target, row_offset, shift_len);
  check_grid_rows("lmobj::ce_fwd", logits.size(0));
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  auto loss = at::empty({N}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({N}, logits.options().dtype(at::kFloat));
  const CEOptions o{row_offset, shift_len, ignore_index, float(ls), float(zl), float(cap)};
  cuda::ce_forward(dtype_of(logits, "lmobj::ce_fwd"), logits.const_data_ptr(), logits.stride(0),
                   target.const_data_ptr<int64_t>(), N, V, o, loss.mutable_data_ptr<float>(),
                   lse.mutable_data_ptr<float>(), inplace_grad ? logits.mutable_data_ptr() : nullptr,
                   c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& target, int64_t row_offset,
                                               int64_t shift_len, int64_t ignore_index, double ls, double zl,
                                               double cap) {
  return fwd(logits, target, row_offset, shift_len, ignore_index, ls, zl, cap, false);
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_bwd_cuda(at::Tensor& logits, const at::Tensor& target, int64_t row_offset,
                                                   int64_t shift_len, int64_t ignore_index, double ls, double zl,
                                                   double cap) {
  return fwd(logits, target, row_offset, shift_len, ignore_index, ls, zl, cap, true);
}

at::Tensor ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                       const at::Tensor& lse, int64_t row_offset, int64_t shift_len, int64_t ignore_index, double ls,
                       double zl, double cap) {
  check_ce_args("lmobj::ce_bwd", logits, target, row_offset, shift_len);
  check_row_vector("lmobj::ce_bwd", "grad_loss", grad_loss, logits);
  check_row_vector("lmobj::ce_bwd", "lse", lse, logits);
  check_grid_rows("lmobj::ce_bwd", logits.size(0));
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  auto out = at::empty({N, V}, logits.options());
  const CEOptions o{row_offset, shift_len, ignore_index, float(ls), float(zl), float(cap)};
  cuda::ce_backward(dtype_of(logits, "lmobj::ce_bwd"), grad_loss.const_data_ptr<float>(), logits.const_data_ptr(),
                    logits.stride(0), target.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(), N, V, o,
                    out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void ce_grad_cols_cuda(at::Tensor& block, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& w,
                       int64_t col0, int64_t vocab, double ls, double zl, double cap) {
  check_grad_cols_args("lmobj::ce_grad_cols_", block, target, lse, w, col0, vocab);
  check_grid_rows("lmobj::ce_grad_cols_", block.size(0));
  c10::cuda::CUDAGuard guard(block.device());
  cuda::ce_grad_cols(dtype_of(block, "lmobj::ce_grad_cols_"), block.mutable_data_ptr(), block.stride(0),
                     block.size(0), block.size(1), target.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                     w.const_data_ptr<float>(), col0, vocab, float(ls), float(zl), float(cap),
                     c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(lmobj, CUDA, m) {
  m.impl("ce_fwd", &ce_fwd_cuda);
  m.impl("ce_bwd", &ce_bwd_cuda);
  m.impl("ce_fwd_bwd_", &ce_fwd_bwd_cuda);
  m.impl("ce_grad_cols_", &ce_grad_cols_cuda);
}

}  // namespace lmobj
