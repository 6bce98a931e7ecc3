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

// A row's log-sum-exp kept as m + ls: its max, and the log of the sum of exp(z - m). Apart, the loss's
// (m - z_y) + ls and the softmax exp((z - m) - ls) keep float32's accuracy at any magnitude of the logits, as
// F.cross_entropy's log_softmax does; lse - z_y and exp(z - lse) lose the rounding of lse there (logits near 1e3:
// 100x its error). A stored lse comes back as {lse, 0}.
struct RowNorm {
  float m, ls;
  LMOBJ_HD float lse() const { return m + ls; }
};

// loss = (1-e)(lse - z_y) + e(lse - mean z) + a lse^2; NaN for a target outside [0, V) (never read out of bounds).
// The smoothing term only when e > 0: with -inf logits (or a few at finfo.min, whose float sum overflows) sum_z is
// -inf, and 0 * inf would make the loss NaN where F.cross_entropy gives a finite one.
LMOBJ_HD float ce_row_loss(RowNorm n, float z_target, float sum_z, int64_t V, int64_t y, const CEOptions& o) {
  if (y == o.ignore_index) return 0.0f;
  if (y < 0 || y >= V) return NAN;
  const float lse = n.lse();
  float loss = (1.0f - o.smoothing) * ((n.m - z_target) + n.ls) + o.z_loss * lse * lse;
  if (o.smoothing > 0.0f) loss += o.smoothing * ((n.m - sum_z / static_cast<float>(V)) + n.ls);
  return loss;
}

// d(c tanh(x/c))/dx = 1 - (z/c)^2 of a capped logit z; 1 without a cap (not 1 - (z * 0)^2: NaN at z = -inf).
LMOBJ_HD float cap_factor(float z, float inv_c, bool capped) {
  const float t = z * inv_c;
  return capped ? 1.0f - t * t : 1.0f;
}

// exp(x) - 1 without the cancellation near 0, branch-free (vectorises on the CPU): |x| < 1/2 by its Taylor series
// to x^8 (relative error below 1.1e-8), else exp(x) - 1 (at most ~1 bit lost).
LMOBJ_HD float fast_expm1f(float x) {
  float p = 1.0f / 40320.0f;
  p = p * x + 1.0f / 5040.0f;
  p = p * x + 1.0f / 720.0f;
  p = p * x + 1.0f / 120.0f;
  p = p * x + 1.0f / 24.0f;
  p = p * x + 1.0f / 6.0f;
  p = p * x + 0.5f;
  p = p * x + 1.0f;
  const float big = fast_expf(x) - 1.0f;
  return fabsf(x) < 0.5f ? p * x : big;
}

// tanh(y) = expm1(2y) / (expm1(2y) + 2), a few ulp everywhere. The form 1 - 2 / (exp(2y) + 1) cancels for small y
// (an absolute error of ~6e-8, so c * 6e-8 on a soft-capped logit: 4x plain PyTorch's loss error at c = 30).
LMOBJ_HD float fast_tanhf(float y) {
  // 2y capped at 88 keeps e finite (fast_expf gives +inf from 88.38 on, and inf / inf is NaN): tanh -> 1. Written
  // so that NaN passes both selects: a NaN logit stays NaN (F.cross_entropy's loss is NaN), not -c or +c.
  float x = 2.0f * y;
  x = x > 88.0f ? 88.0f : x;
  const float e = fast_expm1f(x);
  return y != y ? y : e / (e + 2.0f);
}

}  // namespace lmobj
