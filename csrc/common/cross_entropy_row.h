// Per-row pieces of the cross-entropy family shared by the CPU and CUDA kernels (ALGORITHMS.md).
#pragma once
#include <cstdint>

#include "common/fast_math.h"

namespace lmobj {

// The target of global row `row`: target[row], or with shift_len = S > 0 the next position's label, ignored at
// the last position of each sequence (causal LM scores position t against label t + 1 without copying labels).
LMOBJ_HD int64_t row_target(const int64_t* target, int64_t row, int64_t shift_len, int64_t ignore_index) {
  if (shift_len > 0) return (row % shift_len == shift_len - 1) ? ignore_index : target[row + 1];
  return target[row];
}

// Options of one cross-entropy call, resolved once on the host.
struct CEOptions {
  int64_t row_offset;
  int64_t shift_len;
  int64_t ignore_index;
  float smoothing;  // e
  float z_loss;     // a
  float softcap;    // c, <= 0: no cap
};

// loss = (1-e)(lse - z_y) + e(lse - mean z) + a lse^2; NaN for a target outside [0, V) (never read out of bounds).
LMOBJ_HD float ce_row_loss(float lse, float z_target, float sum_z, int64_t V, int64_t y, const CEOptions& o) {
  if (y == o.ignore_index) return 0.0f;
  if (y < 0 || y >= V) return NAN;
  return (1.0f - o.smoothing) * (lse - z_target) + o.smoothing * (lse - sum_z / static_cast<float>(V)) +
         o.z_loss * lse * lse;
}

// tanh through exp, branch-free (vectorises on the CPU): tanh(y) = 1 - 2 / (exp(2y) + 1).
LMOBJ_HD float fast_tanhf(float y) { return 1.0f - 2.0f / (fast_expf(2.0f * y) + 1.0f); }

}  // namespace lmobj
