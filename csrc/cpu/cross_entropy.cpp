// CPU kernels of the cross-entropy family: one pass per row for the forward, one for the gradient,
// float32 accumulation whatever the input dtype. Rows run in parallel (at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common/cross_entropy_row.h"
#include "ops_checks.h"

namespace lmobj {
namespace {

// z (capped if asked) of one row as float: a view of the input when no conversion is needed, else the scratch.
template <typename T>
const float* row_as_float(const T* x, int64_t V, const CEOptions& o, std::vector<float>& scratch) {
  if constexpr (std::is_same_v<T, float>) {
    if (o.softcap <= 0.0f) return x;
  }
  scratch.resize(V);
  float* z = scratch.data();
  if (o.softcap > 0.0f) {
    const float c = o.softcap, inv_c = 1.0f / o.softcap;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) z[j] = c * fast_tanhf(static_cast<float>(x[j]) * inv_c);
  } else {
    for (int64_t j = 0; j < V; ++j) z[j] = static_cast<float>(x[j]);
  }
  return z;
}

// lse, sum of z, of one row of floats. Float sums over blocks of 1024 columns (8 lanes of 128 adds each, the exps
// vectorised), blocks added in double. One float sum per lane over the whole row (V / 8 adds in sequence) lost up
// to 7 ulps of lse at V = 4097, and the gradient then missed the 3x-of-plain-PyTorch rule for some seeds.
inline void row_stats(const float* z, int64_t V, float& lse, float& sum_z) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) m = z[j] > m ? z[j] : m;
  double s = 0.0, sz = 0.0;
  for (int64_t j0 = 0; j0 < V; j0 += 1024) {
    const int64_t n = V - j0 < 1024 ? V - j0 : 1024;
    const float* zb = z + j0;
    float bs = 0.0f, bz = 0.0f;
#pragma omp simd reduction(+ : bs, bz)
    for (int64_t j = 0; j < n; ++j) {
      bs += fast_expf(zb[j] - m);
      bz += zb[j];
    }
    s += bs;
    sz += bz;
  }
  lse = m + static_cast<float>(std::log(s));
  sum_z = static_cast<float>(sz);
  // the max skips NaN and fast_expf clamps it to a tiny value: without this a NaN logit would vanish from the row
  // (F.cross_entropy gives NaN, and a NaN loss is how training finds out it diverged)
  if (sz != sz) lse = NAN;
}

// d loss_row / d z_raw, times g, written as T. z holds the capped values when a cap is set; it may alias `out`
// (in-place gradient), so the target's entry is computed before the loop overwrites it.
template <typename T>
void row_grad(const float* z, int64_t V, int64_t y, float lse, float g, const CEOptions& o, T* out) {
  if (g == 0.0f) {  // a zero weight is a zero gradient, even where lse = -inf (a row of -inf logits) makes NaN
    for (int64_t j = 0; j < V; ++j) out[j] = static_cast<T>(0.0f);
    return;
  }
  const float coef = g * (1.0f + 2.0f * o.z_loss * lse), uni = g * o.smoothing / static_cast<float>(V);
  const bool capped = o.softcap > 0.0f, valid = y >= 0 && y < V;
  const float inv_c = capped ? 1.0f / o.softcap : 0.0f;
  const float zy = valid ? z[y] : 0.0f;
  const float dy = (fast_expf(zy - lse) * coef - uni - g * (1.0f - o.smoothing)) * cap_factor(zy, inv_c, capped);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j)
    out[j] = static_cast<T>((fast_expf(z[j] - lse) * coef - uni) * cap_factor(z[j], inv_c, capped));
  if (valid) {
    out[y] = static_cast<T>(dy);
  } else {
    for (int64_t j = 0; j < V; ++j) out[j] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
  }
}

template <typename T>
void ce_forward_rows(const T* x, const int64_t* target, int64_t N, int64_t V, int64_t ld, const CEOptions& o,
                     float* loss, float* lse_out, T* grad_inplace) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> scratch;
    for (int64_t r = b; r < e; ++r) {
      const T* row = x + r * ld;
      const float* z = row_as_float(row, V, o, scratch);
      float lse, sum_z;
      row_stats(z, V, lse, sum_z);
      const int64_t y = row_target(target, o.row_offset + r, o.shift_len, o.ignore_index);
      const bool valid = y >= 0 && y < V;
      loss[r] = ce_row_loss(lse, valid ? z[y] : 0.0f, sum_z, V, y, o);
      lse_out[r] = lse;
      if (grad_inplace != nullptr) {
        T* out = grad_inplace + r * ld;
        if (y == o.ignore_index) {
          for (int64_t j = 0; j < V; ++j) out[j] = static_cast<T>(0.0f);
        } else {
          row_grad(z, V, y, lse, 1.0f, o, out);
        }
      }
    }
  });
}

template <typename T>
void ce_backward_rows(const float* grad_loss, const T* x, const int64_t* target, const float* lse, int64_t N,
                      int64_t V, int64_t ld, const CEOptions& o, T* out) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> scratch;
    for (int64_t r = b; r < e; ++r) {
      const int64_t y = row_target(target, o.row_offset + r, o.shift_len, o.ignore_index);
      T* orow = out + r * V;
      if (y == o.ignore_index) {
        for (int64_t j = 0; j < V; ++j) orow[j] = static_cast<T>(0.0f);
        continue;
      }
      const float* z = row_as_float(x + r * ld, V, o, scratch);
      row_grad(z, V, y, lse[r], grad_loss[r], o, orow);
    }
  });
}

#define LMOBJ_DISPATCH_FLOATS(dtype, NAME, ...)                                         \
  switch (dtype) {                                                                    \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }             \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; }     \
    default: TORCH_CHECK(false, NAME ": logits must be float32, float16 or bfloat16"); \
  }

std::tuple<at::Tensor, at::Tensor> ce_fwd_impl(const at::Tensor& logits, const at::Tensor& target, int64_t row_offset,
                                               int64_t shift_len, int64_t ignore_index, double ls, double zl,
                                               double cap, bool inplace_grad) {
  check_ce_args("lmobj::ce_fwd", logits, target, row_offset, shift_len);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto loss = at::empty({N}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({N}, logits.options().dtype(at::kFloat));
  const CEOptions o{row_offset, shift_len, ignore_index, float(ls), float(zl), float(cap)};
  LMOBJ_DISPATCH_FLOATS(logits.scalar_type(), "lmobj::ce_fwd", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = inplace_grad ? logits.mutable_data_ptr<scalar_t>() : nullptr;
    ce_forward_rows<scalar_t>(x, target.const_data_ptr<int64_t>(), N, V, logits.stride(0), o,
                              loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), g);
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& target, int64_t row_offset,
                                              int64_t shift_len, int64_t ignore_index, double ls, double zl,
                                              double cap) {
  return ce_fwd_impl(logits, target, row_offset, shift_len, ignore_index, ls, zl, cap, false);
}

std::tuple<at::Tensor, at::Tensor> ce_fwd_bwd_cpu(at::Tensor& logits, const at::Tensor& target, int64_t row_offset,
                                                  int64_t shift_len, int64_t ignore_index, double ls, double zl,
                                                  double cap) {
  return ce_fwd_impl(logits, target, row_offset, shift_len, ignore_index, ls, zl, cap, true);
}

at::Tensor ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                      const at::Tensor& lse, int64_t row_offset, int64_t shift_len, int64_t ignore_index, double ls,
                      double zl, double cap) {
  check_ce_args("lmobj::ce_bwd", logits, target, row_offset, shift_len);
  check_row_vector("lmobj::ce_bwd", "grad_loss", grad_loss, logits);
  check_row_vector("lmobj::ce_bwd", "lse", lse, logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto out = at::empty({N, V}, logits.options());
  const CEOptions o{row_offset, shift_len, ignore_index, float(ls), float(zl), float(cap)};
  LMOBJ_DISPATCH_FLOATS(logits.scalar_type(), "lmobj::ce_bwd", [&] {
    ce_backward_rows<scalar_t>(grad_loss.const_data_ptr<float>(), logits.const_data_ptr<scalar_t>(),
                               target.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(), N, V, logits.stride(0),
                               o, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

template <typename T>
void grad_cols_rows(T* x, int64_t ld, int64_t N, int64_t C, const int64_t* target, const float* lse, const float* w,
                    int64_t col0, int64_t V, float smoothing, float z_loss, float softcap) {
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
    const bool capped = softcap > 0.0f;
    const float c = softcap, inv_c = capped ? 1.0f / softcap : 0.0f;
    for (int64_t r = b; r < e; ++r) {
      T* row = x + r * ld;
      if (w[r] == 0.0f) {  // ignored: zeros, even where lse = -inf (a row of -inf logits) would make NaN
        for (int64_t j = 0; j < C; ++j) row[j] = static_cast<T>(0.0f);
        continue;
      }
      const float l = lse[r], coef = w[r] * (1.0f + 2.0f * z_loss * l);
      const float uni = w[r] * smoothing / static_cast<float>(V);
      const int64_t y = target[r] - col0;
      // the target's entry first: the loop below overwrites the row
      float dy = 0.0f;
      if (y >= 0 && y < C) {
        const float raw = static_cast<float>(row[y]);
        const float zy = capped ? c * fast_tanhf(raw * inv_c) : raw;
        dy = (fast_expf(zy - l) * coef - uni - w[r] * (1.0f - smoothing)) * cap_factor(zy, inv_c, capped);
      }
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const float raw = static_cast<float>(row[j]);
        const float z = capped ? c * fast_tanhf(raw * inv_c) : raw;
        row[j] = static_cast<T>((fast_expf(z - l) * coef - uni) * cap_factor(z, inv_c, capped));
      }
      if (y >= 0 && y < C) row[y] = static_cast<T>(dy);
    }
  });
}

void ce_grad_cols_cpu(at::Tensor& block, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& w,
                      int64_t col0, int64_t vocab, double ls, double zl, double cap) {
  check_grad_cols_args("lmobj::ce_grad_cols_", block, target, lse, w, col0, vocab);
  LMOBJ_DISPATCH_FLOATS(block.scalar_type(), "lmobj::ce_grad_cols_", [&] {
    grad_cols_rows<scalar_t>(block.mutable_data_ptr<scalar_t>(), block.stride(0), block.size(0), block.size(1),
                             target.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(), w.const_data_ptr<float>(),
                             col0, vocab, float(ls), float(zl), float(cap));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lmobj, CPU, m) {
  m.impl("ce_fwd", &ce_fwd_cpu);
  m.impl("ce_bwd", &ce_bwd_cpu);
  m.impl("ce_fwd_bwd_", &ce_fwd_bwd_cpu);
  m.impl("ce_grad_cols_", &ce_grad_cols_cpu);
}

}  // namespace lmobj
