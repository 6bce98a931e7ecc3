// Small math helpers compiled for host and device.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define LMOBJ_HD __host__ __device__ __forceinline__
#else
#define LMOBJ_HD inline
#endif

namespace lmobj {

// exp(x) for float, branch-free so that the CPU loops vectorise (gcc -O3 -mavx2 -mfma -fopenmp-simd).
// Cephes-style: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for exp(r), 2^n built in the exponent bits.
// Relative error about 2 ulp; underflows to 0 below -87.3 (exp(-inf) = 0 as well).
LMOBJ_HD float fast_expf(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float out = p * scale;
  return x <= -87.3f ? 0.0f : out;
}

// Merge two (max, sum of exp(x - max)) pairs of an online softmax.
LMOBJ_HD void softmax_merge(float& m, float& s, float m2, float s2) {
  float mn = m > m2 ? m : m2;
  if (mn == -INFINITY) return;  // both empty
  s = s * fast_expf(m - mn) + s2 * fast_expf(m2 - mn);
  m = mn;
}

}  // namespace lmobj
