// Raw-pointer launchers of the CUDA cross-entropy kernels (no torch headers: keeps the .cu compile light).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/cross_entropy_row.h"

namespace lmobj::cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Per-row loss and lse; with grad_inplace (== x, a buffer the library owns) the row is then overwritten with
// d(sum of row losses)/dx. x rows are `ld` elements apart.
void ce_forward(DType dtype, const void* x, int64_t ld, const int64_t* target, int64_t N, int64_t V,
                const CEOptions& o, float* loss, float* lse, void* grad_inplace, cudaStream_t stream);

// out (N, V, contiguous) = grad_loss[r] * d loss_r / dx.
void ce_backward(DType dtype, const float* grad_loss, const void* x, int64_t ld, const int64_t* target,
                 const float* lse, int64_t N, int64_t V, const CEOptions& o, void* out, cudaStream_t stream);

// In place: block (N, C; rows ld apart) = columns [col0, col0 + C) of V-column logit rows -> w[r] * d loss_r / dz.
void ce_grad_cols(DType dtype, void* block, int64_t ld, int64_t N, int64_t C, const int64_t* target, const float* lse,
                  const float* w, int64_t col0, int64_t V, float smoothing, float z_loss, float softcap,
                  cudaStream_t stream);

}  // namespace lmobj::cuda
