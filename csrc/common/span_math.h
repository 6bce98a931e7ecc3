// T5 span arithmetic and rounding rules shared by the CPU and CUDA corruption kernels (ALGORITHMS.md, "T5 span
// corruption" and "MLM masking"). Host and device; results are exact integers, identical on every backend
// (float32 products/quotients rounded to nearest even, as T5 does in TensorFlow float32).
#pragma once
#include <cstdint>
#include <cstring>

#include "common/fast_math.h"

namespace lmobj {

LMOBJ_HD float f32_mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);  // immune to --use_fast_math / FMA contraction
#else
  return a * b;
#endif
}

LMOBJ_HD float f32_div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// round half to even of x >= 0 (written out so that it does not depend on the FPU rounding mode).
// Compares with t + 0.5 (exact in float32 for t < 2^23) instead of subtracting, so that no compiler can fuse the
// rounding into the product that made x (an FMA would see the unrounded product).
LMOBJ_HD int64_t round_half_even_pos(float x) {
  int64_t t = static_cast<int64_t>(x);
  const float h = static_cast<float>(t) + 0.5f;
  if (x > h || (x == h && (t & 1))) ++t;
  return t;
}

struct SpanCounts {
  int64_t n;  // noise tokens (0: the row is not corrupted)
  int64_t k;  // noise spans (= non-noise spans)
};

// Steps 1-3 of ALGORITHMS.md for a row of L real tokens. Rows with L < 2 (and r == 0) are not corrupted:
// inputs = tokens + [eos], targets = [eos] (T5 cuts the mask of max(L, 2) tokens back to L, leaving no noise).
LMOBJ_HD SpanCounts span_counts(int64_t L, float r, float m) {
  if (!(r > 0.0f) || L < 2) return {0, 0};
  int64_t n = round_half_even_pos(f32_mul_rn(static_cast<float>(L), r));
  n = n < 1 ? 1 : n;
  n = n > L - 1 ? L - 1 : n;
  int64_t k = round_half_even_pos(f32_div_rn(static_cast<float>(n), m));
  k = k < 1 ? 1 : k;
  k = k > L - n ? L - n : k;
  return {n, k};
}

LMOBJ_HD int64_t span_inputs_len(int64_t L, SpanCounts c) { return c.n ? L - c.n + c.k + 1 : L + 1; }
LMOBJ_HD int64_t span_targets_len(SpanCounts c) { return c.n ? c.n + c.k + 1 : 1; }

// The float64 whose IEEE-754 bits are b (how the exact MLM rate travels in the ops' int64 argument).
LMOBJ_HD double double_from_bits(int64_t b) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double(b);
#else
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
#endif
}

// MLM exact count: round_half_even(E * p) of the float64 product, as BERT's round(len(cand) * masked_lm_prob)
// (p = 0.15, E = 10: the product rounds to 1.5, so 2), at least 1, at most E. One multiply and comparisons (no
// FMA can form), so every backend agrees.
LMOBJ_HD int64_t mlm_exact_count(int64_t E, double p) {
  if (E <= 0) return 0;
  const double x = static_cast<double>(E) * p;
  int64_t c = static_cast<int64_t>(x);
  const double h = static_cast<double>(c) + 0.5;
  if (x > h || (x == h && (c & 1))) ++c;
  c = c < 1 ? 1 : c;
  return c > E ? E : c;
}

// A uniform id in [low, low + range) from one 32-bit draw (multiply-shift; range < 2^31).
LMOBJ_HD int64_t draw_id(uint32_t w, int64_t low, int64_t range) {
  return low + static_cast<int64_t>((static_cast<uint64_t>(w) * static_cast<uint64_t>(range)) >> 32);
}

}  // namespace lmobj
