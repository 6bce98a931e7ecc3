// CPU kernels of the cross-entropy family: one pass per row for the forward, one for the gradient,
// float32 accumulation whatever the input dtype. Rows run in parallel (at::parallel_for).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common/cross_entropy_row.h"
#include "ops_checks.h"

namespace lmobj {
namespace {

// c tanh(raw / c) with a cap, raw without.
LMOBJ_HD float soft_cap(float raw, float c, float inv_c, bool capped) {
  return capped ? c * fast_tanhf(raw * inv_c) : raw;
}

// The gradient of ALGORITHMS.md at one logit z (capped when a cap is set), one statement for every CPU loop:
// (exp((z - m) - ls) coef - uni) d cap / dz, with coef = g (1 + 2 a lse) and uni = g e / V; at the target also
// - g (1 - e) inside the bracket (target_grad). lse = m + ls (RowNorm).
struct GradCoef {
  float coef, uni;
};
inline GradCoef grad_coef(float g, RowNorm n, float smoothing, float z_loss, int64_t V) {
  return {g * (1.0f + 2.0f * z_loss * n.lse()), g * smoothing / static_cast<float>(V)};
}
LMOBJ_HD float logit_grad(float z, RowNorm n, GradCoef k, float inv_c, bool capped) {
  return (fast_expf((z - n.m) - n.ls) * k.coef - k.uni) * cap_factor(z, inv_c, capped);
}
inline float target_grad(float zy, RowNorm n, GradCoef k, float g, float smoothing, float inv_c, bool capped) {
  return (fast_expf((zy - n.m) - n.ls) * k.coef - k.uni - g * (1.0f - smoothing)) * cap_factor(zy, inv_c, capped);
}

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
    for (int64_t j = 0; j < V; ++j) z[j] = soft_cap(static_cast<float>(x[j]), c, inv_c, true);
  } else {
    for (int64_t j = 0; j < V; ++j) z[j] = static_cast<float>(x[j]);
  }
  return z;
}

// (m, ls) and sum of z of one row of floats. Float sums over blocks of 1024 columns (8 lanes of 128 adds each, the exps
// vectorised), blocks added in double. One float sum per lane over the whole row (V / 8 adds in sequence) lost up
// to 7 ulps of lse at V = 4097, and the gradient then missed the 3x-of-plain-PyTorch rule for some seeds.
inline void row_stats(const float* z, int64_t V, RowNorm& n, float& sum_z) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < V; ++j) m = z[j] > m ? z[j] : m;
  double s = 0.0, sz = 0.0;
  float nans = 0.0f;
  for (int64_t j0 = 0; j0 < V; j0 += 1024) {
    const int64_t n = V - j0 < 1024 ? V - j0 : 1024;
    const float* zb = z + j0;
    float bs = 0.0f, bz = 0.0f, bn = 0.0f;
#pragma omp simd reduction(+ : bs, bz, bn)
    for (int64_t j = 0; j < n; ++j) {
      bs += fast_expf(zb[j] - m);
      bz += zb[j];
      bn += zb[j] != zb[j] ? 1.0f : 0.0f;
    }
    s += bs;
    sz += bz;
    nans += bn;
  }
  n = {m, static_cast<float>(std::log(s))};
  sum_z = static_cast<float>(sz);
  // the max skips NaN and fast_expf clamps it to a tiny value: without this a NaN logit would vanish from the row
  // (F.cross_entropy gives NaN, and a NaN loss is how training finds out it diverged). Counted, not read off the
  // sum of z: finite logits near the float maximum overflow partial sums to +inf and -inf, whose sum is NaN too.
  if (nans > 0.0f) n = {NAN, 0.0f};
}

// d loss_row / d z_raw, times g, written as T. z holds the capped values when a cap is set; it may alias `out`
// (in-place gradient), so the target's entry is computed before the loop overwrites it.
template <typename T>
void row_grad(const float* z, int64_t V, int64_t y, RowNorm n, float g, const CEOptions& o, T* out) {
  if (g == 0.0f) {  // a zero weight is a zero gradient, even where lse = -inf (a row of -inf logits) makes NaN
    for (int64_t j = 0; j < V; ++j) out[j] = static_cast<T>(0.0f);
    return;
  }
  const GradCoef k = grad_coef(g, n, o.smoothing, o.z_loss, V);
  const bool capped = o.softcap > 0.0f, valid = y >= 0 && y < V;
  const float inv_c = capped ? 1.0f / o.softcap : 0.0f;
  const float dy = target_grad(valid ? z[y] : 0.0f, n, k, g, o.smoothing, inv_c, capped);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) out[j] = static_cast<T>(logit_grad(z[j], n, k, inv_c, capped));
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
      RowNorm n;
      float sum_z;
      row_stats(z, V, n, sum_z);
      const int64_t y = row_target(target, o.row_offset + r, o.shift_len, o.ignore_index);
      const bool valid = y >= 0 && y < V;
      loss[r] = ce_row_loss(n, valid ? z[y] : 0.0f, sum_z, V, y, o);
      lse_out[r] = n.lse();
      if (grad_inplace != nullptr) {
        T* out = grad_inplace + r * ld;
        if (y == o.ignore_index) {
          for (int64_t j = 0; j < V; ++j) out[j] = static_cast<T>(0.0f);
        } else {
          row_grad(z, V, y, n, 1.0f, o, out);
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
      row_grad(z, V, y, RowNorm{lse[r], 0.0f}, grad_loss[r], o, orow);
    }
  });
}

// ---- column layout: element (r, j) of the (N, V) logits at x[j * ld + r] (stride(0) == 1, stride(1) == ld) ----
// The CPU linear cross-entropy computes each chunk's logits as W @ h^T, a (V, rows) product: MKL runs that shape
// ~1.5x faster than h @ W^T into (rows, V) for chunks of ~100 rows (measured, N=4096, D=768, V=50257), and dh as
// W^T @ G^T ~1.15x faster. These kernels take up to kLanes rows of tokens at a time as the vector lanes, and split
// the vocabulary lines between the threads, so that each thread streams through contiguous memory.
constexpr int64_t kLanes = 128;
// Vocabulary lines per float partial sum (then merged in double): fewer sequential adds per lane than row_stats'.
constexpr int64_t kColBlock = 64;

template <typename T, bool Capped>
LMOBJ_HD void load_line(const T* line, int64_t nl, float c, float inv_c, float* d) {
#pragma omp simd
  for (int64_t l = 0; l < nl; ++l) {
    d[l] = soft_cap(static_cast<float>(line[l]), c, inv_c, Capped);
  }
}

// Online-softmax state of the lanes over some vocabulary lines: max, sum of exp(z - max) and sum of z (double),
// count of NaN logits.
struct ColStats {
  float m[kLanes], nans[kLanes];
  double s[kLanes], sz[kLanes];
};

// s * exp(m - mn) for a running max m raised to mn > m: in double, since a float factor rounds the same way at
// every raise and logits that rise along the vocabulary raise it at every block (V = 128256, logits rising from 0
// to 0.05: lse off by 1.2e-5, 30x plain float32's error); an empty state (m = -inf, s = 0) stays 0.
inline double rescale(double s, float m, float mn) {
  return m == -INFINITY ? 0.0 : s * std::exp(static_cast<double>(m) - static_cast<double>(mn));
}

// The stats of lines [j0, j1) of a tile of nl lanes: per block of kColBlock lines, the lines as floats (capped) in
// an L1-resident scratch, their max and float sums, merged into the double accumulators.
template <typename T, bool Capped>
void col_stats_range(const T* x, int64_t ld, int64_t nl, int64_t j0, int64_t j1, float c, float inv_c,
                     ColStats& st) {
  alignas(64) float sc[kColBlock * kLanes];
  float bm[kLanes], bs[kLanes], bz[kLanes], bn[kLanes];
  for (int64_t l = 0; l < nl; ++l) st.m[l] = -INFINITY, st.s[l] = 0.0, st.sz[l] = 0.0, st.nans[l] = 0.0f;
  for (int64_t jb = j0; jb < j1; jb += kColBlock) {
    const int64_t nb = j1 - jb < kColBlock ? j1 - jb : kColBlock;
    for (int64_t b = 0; b < nb; ++b) load_line<T, Capped>(x + (jb + b) * ld, nl, c, inv_c, sc + b * kLanes);
    for (int64_t l = 0; l < nl; ++l) bm[l] = -INFINITY, bs[l] = 0.0f, bz[l] = 0.0f, bn[l] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      const float* d = sc + b * kLanes;
#pragma omp simd
      for (int64_t l = 0; l < nl; ++l) bm[l] = d[l] > bm[l] ? d[l] : bm[l];  // skips NaN, as row_stats' max
    }
    for (int64_t b = 0; b < nb; ++b) {
      const float* d = sc + b * kLanes;
#pragma omp simd
      for (int64_t l = 0; l < nl; ++l) {
        bs[l] += fast_expf(d[l] - bm[l]);
        bz[l] += d[l];
        bn[l] += d[l] != d[l] ? 1.0f : 0.0f;
      }
    }
    // The block's sum scaled to the running max (exactly 1 at bm == m), vectorised; fast_expf turns the NaN of
    // -inf - -inf or inf - inf into ~0, as in row_stats (a block of -inf adds ~0, a +inf logit gives lse = +inf).
    // Lanes whose max the block raises are done after, one by one (rescale).
    int rises = 0;
#pragma omp simd reduction(+ : rises)
    for (int64_t l = 0; l < nl; ++l) {
      st.sz[l] += bz[l];
      st.nans[l] += bn[l];
      const bool up = bm[l] > st.m[l];
      st.s[l] += up ? 0.0 : static_cast<double>(bs[l] * fast_expf(bm[l] - st.m[l]));
      rises += up ? 1 : 0;
    }
    if (rises == 0) continue;
    for (int64_t l = 0; l < nl; ++l) {
      if (bm[l] <= st.m[l]) continue;
      st.s[l] = rescale(st.s[l], st.m[l], bm[l]) + static_cast<double>(bs[l]);
      st.m[l] = bm[l];
    }
  }
}

// Merge b into a (the states of two ranges of lines).
inline void col_stats_merge(ColStats& a, const ColStats& b, int64_t nl) {
  for (int64_t l = 0; l < nl; ++l) {
    a.sz[l] += b.sz[l];
    a.nans[l] += b.nans[l];
    if (b.m[l] <= a.m[l]) {
      a.s[l] += b.m[l] == a.m[l] ? b.s[l] : rescale(b.s[l], b.m[l], a.m[l]);
    } else {
      a.s[l] = rescale(a.s[l], a.m[l], b.m[l]) + b.s[l];
      a.m[l] = b.m[l];
    }
  }
}

// Threads for a tile: vocabulary ranges of at least 256 lines (up to 32k logits each, against a few microseconds
// to hand a range to a thread), so that a chunk's one tile of a 4096-word vocabulary still fills 16 cores.
inline int64_t col_parts(int64_t V) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), V / 256));
}

// f(tile_begin, tile_end, parts) over the tiles of kLanes rows: in sequence on the calling thread, each tile's
// vocabulary split in `parts` ranges between the threads, when there are fewer tiles than threads (a chunk of ~100
// rows of a large vocabulary); else the tiles themselves in parallel, one range each (small vocabularies: the
// trainer's 361; many rows). Not a parallel_for of grain "all tiles" for the first case: its inline run marks a
// parallel region, and the ranges' own parallel_for would then run on one thread.
template <typename F>
void for_tiles(int64_t N, int64_t V, const F& f) {
  const int64_t tiles = (N + kLanes - 1) / kLanes, parts = col_parts(V);
  if (parts > 1 && tiles < at::get_num_threads()) {
    f(int64_t{0}, tiles, parts);
  } else {
    at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) { f(b, e, int64_t{1}); });
  }
}

// (m, ls) and sum of z of a tile's nl columns, the lines split in `parts` ranges between the threads.
template <typename T, bool Capped>
void col_stats(const T* x, int64_t ld, int64_t nl, int64_t V, int64_t parts, float c, float inv_c, float* m,
               float* ls, float* sum_z) {
  std::vector<ColStats> st(parts);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      col_stats_range<T, Capped>(x, ld, nl, V * p / parts, V * (p + 1) / parts, c, inv_c, st[p]);
  });
  for (int64_t p = 1; p < parts; ++p) col_stats_merge(st[0], st[p], nl);
  for (int64_t l = 0; l < nl; ++l) {
    const ColStats& s = st[0];
    m[l] = s.m[l];
    ls[l] = s.m[l] == -INFINITY ? 0.0f : static_cast<float>(std::log(s.s[l]));
    sum_z[l] = static_cast<float>(s.sz[l]);
    if (s.nans[l] > 0.0f) m[l] = NAN, ls[l] = 0.0f;  // a NaN logit makes the row's loss NaN (row_stats)
  }
}

// Gradient of a tile's nl columns, column l times g[l] (0: zeros, even where lse = -inf), written at out (ldo), the
// lines split in `parts` ranges between the threads; out may be x (in place): the targets' entries are computed
// before the lines are overwritten. A target outside [0, V) (and not ignored) gives a NaN column, as row_grad.
// Each column's normaliser is (m[l], ls[l]) (RowNorm); ls = nullptr: m holds stored lse values, ls = 0.
template <typename T, bool Capped>
void col_grad(const T* x, int64_t ld, T* out, int64_t ldo, int64_t nl, int64_t V, int64_t parts, const int64_t* y,
              const float* m, const float* ls, const float* g, const CEOptions& o) {
  const float c = o.softcap, inv_c = Capped ? 1.0f / o.softcap : 0.0f;
  float coef[kLanes], uni[kLanes], lm[kLanes], lls[kLanes], keep[kLanes], dy[kLanes];
  for (int64_t l = 0; l < nl; ++l) {
    const bool zero = g[l] == 0.0f, bad = !zero && (y[l] < 0 || y[l] >= V);
    const RowNorm n{m[l], ls != nullptr ? ls[l] : 0.0f};
    const GradCoef k = grad_coef(g[l], n, o.smoothing, o.z_loss, V);
    keep[l] = zero ? 0.0f : 1.0f;
    coef[l] = zero ? 0.0f : bad ? NAN : k.coef;
    uni[l] = zero ? 0.0f : k.uni;
    lm[l] = zero ? 0.0f : n.m;
    lls[l] = zero ? 0.0f : n.ls;
    dy[l] = 0.0f;
    if (!zero && !bad) {
      const float zy = soft_cap(static_cast<float>(x[y[l] * ld + l]), c, inv_c, Capped);
      dy[l] = target_grad(zy, n, k, g[l], o.smoothing, inv_c, Capped);
    }
  }
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    alignas(64) float z[kLanes];
    for (int64_t j = V * b / parts; j < V * e / parts; ++j) {
      load_line<T, Capped>(x + j * ld, nl, c, inv_c, z);
      T* oline = out + j * ldo;
#pragma omp simd
      for (int64_t l = 0; l < nl; ++l) {
        const float v = logit_grad(z[l], RowNorm{lm[l], lls[l]}, GradCoef{coef[l], uni[l]}, inv_c, Capped);
        z[l] = keep[l] != 0.0f ? v : 0.0f;  // a NaN logit of an ignored row is a zero too
      }
      for (int64_t l = 0; l < nl; ++l) oline[l] = static_cast<T>(z[l]);
    }
  });
  for (int64_t l = 0; l < nl; ++l)
    if (keep[l] != 0.0f && coef[l] == coef[l]) out[y[l] * ldo + l] = static_cast<T>(dy[l]);
}

// Forward (loss, lse) of column-layout logits, and with grad_inplace their gradient (weight 1 per valid row)
// written over them, a tile of kLanes rows at a time (for_tiles).
template <typename T, bool Capped>
void ce_forward_cols(const T* x, const int64_t* target, int64_t N, int64_t V, int64_t ld, const CEOptions& o,
                     float* loss, float* lse_out, T* grad_inplace) {
  const float c = o.softcap, inv_c = Capped ? 1.0f / o.softcap : 0.0f;
  for_tiles(N, V, [&](int64_t tb, int64_t te, int64_t parts) {
    int64_t y[kLanes];
    float m[kLanes], ls[kLanes], sum_z[kLanes], g[kLanes];
    for (int64_t r0 = tb * kLanes; r0 < std::min(N, te * kLanes); r0 += kLanes) {
      const int64_t nl = std::min(kLanes, N - r0);
      const T* xt = x + r0;
      col_stats<T, Capped>(xt, ld, nl, V, parts, c, inv_c, m, ls, sum_z);
      for (int64_t l = 0; l < nl; ++l) {
        y[l] = row_target(target, o.row_offset + r0 + l, o.shift_len, o.ignore_index);
        const bool valid = y[l] >= 0 && y[l] < V;
        const float zy = soft_cap(valid ? static_cast<float>(xt[y[l] * ld + l]) : 0.0f, c, inv_c, Capped);
        const RowNorm n{m[l], ls[l]};
        loss[r0 + l] = ce_row_loss(n, zy, sum_z[l], V, y[l], o);
        lse_out[r0 + l] = n.lse();
        g[l] = y[l] == o.ignore_index ? 0.0f : 1.0f;
      }
      if (grad_inplace != nullptr)
        col_grad<T, Capped>(xt, ld, grad_inplace + r0, ld, nl, V, parts, y, m, ls, g, o);
    }
  });
}

// Gradient of sum_r grad_loss[r] * loss[r] of column-layout logits, written in column layout (ldo).
template <typename T, bool Capped>
void ce_backward_cols(const float* grad_loss, const T* x, const int64_t* target, const float* lse, int64_t N,
                      int64_t V, int64_t ld, const CEOptions& o, T* out, int64_t ldo) {
  for_tiles(N, V, [&](int64_t tb, int64_t te, int64_t parts) {
    int64_t y[kLanes];
    float g[kLanes];
    for (int64_t r0 = tb * kLanes; r0 < std::min(N, te * kLanes); r0 += kLanes) {
      const int64_t nl = std::min(kLanes, N - r0);
      for (int64_t l = 0; l < nl; ++l) {
        y[l] = row_target(target, o.row_offset + r0 + l, o.shift_len, o.ignore_index);
        g[l] = y[l] == o.ignore_index ? 0.0f : grad_loss[r0 + l];
      }
      col_grad<T, Capped>(x + r0, ld, out + r0, ldo, nl, V, parts, y, lse + r0, nullptr, g, o);
    }
  });
}

// Column layout: the (N, V) logits are a transposed view of a (V, N)-shaped buffer (strides (1, ld), ld >= N), as
// the CPU linear cross-entropy makes them; every other accepted layout has contiguous rows.
inline bool is_cols(const at::Tensor& logits) {
  return logits.numel() > 0 && logits.size(1) > 1 && logits.stride(1) != 1;
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
  check_ce_args("lmobj::ce_fwd", logits, target, row_offset, shift_len, /*cols_ok=*/true);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto loss = at::empty({N}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({N}, logits.options().dtype(at::kFloat));
  const CEOptions o{row_offset, shift_len, ignore_index, float(ls), float(zl), float(cap)};
  LMOBJ_DISPATCH_FLOATS(logits.scalar_type(), "lmobj::ce_fwd", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = inplace_grad ? logits.mutable_data_ptr<scalar_t>() : nullptr;
    if (is_cols(logits)) {
      auto fwd = o.softcap > 0.0f ? ce_forward_cols<scalar_t, true> : ce_forward_cols<scalar_t, false>;
      fwd(x, target.const_data_ptr<int64_t>(), N, V, logits.stride(1), o, loss.mutable_data_ptr<float>(),
          lse.mutable_data_ptr<float>(), g);
    } else {
      ce_forward_rows<scalar_t>(x, target.const_data_ptr<int64_t>(), N, V, logits.stride(0), o,
                                loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), g);
    }
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
  check_ce_args("lmobj::ce_bwd", logits, target, row_offset, shift_len, /*cols_ok=*/true);
  check_row_vector("lmobj::ce_bwd", "grad_loss", grad_loss, logits);
  check_row_vector("lmobj::ce_bwd", "lse", lse, logits);
  const int64_t N = logits.size(0), V = logits.size(1);
  const CEOptions o{row_offset, shift_len, ignore_index, float(ls), float(zl), float(cap)};
  if (is_cols(logits)) {  // the gradient in the logits' layout: a transposed view of a (V, N) tensor
    auto out_t = at::empty({V, N}, logits.options());
    LMOBJ_DISPATCH_FLOATS(logits.scalar_type(), "lmobj::ce_bwd", [&] {
      auto bwd = o.softcap > 0.0f ? ce_backward_cols<scalar_t, true> : ce_backward_cols<scalar_t, false>;
      bwd(grad_loss.const_data_ptr<float>(), logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(),
          lse.const_data_ptr<float>(), N, V, logits.stride(1), o, out_t.mutable_data_ptr<scalar_t>(), N);
    });
    return out_t.t();
  }
  auto out = at::empty({N, V}, logits.options());
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
      const RowNorm l{lse[r], 0.0f};
      const GradCoef k = grad_coef(w[r], l, smoothing, z_loss, V);
      const int64_t y = target[r] - col0;
      // the target's entry first: the loop below overwrites the row
      float dy = 0.0f;
      if (y >= 0 && y < C) {
        const float zy = soft_cap(static_cast<float>(row[y]), c, inv_c, capped);
        dy = target_grad(zy, l, k, w[r], smoothing, inv_c, capped);
      }
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) {
        const float z = soft_cap(static_cast<float>(row[j]), c, inv_c, capped);
        row[j] = static_cast<T>(logit_grad(z, l, k, inv_c, capped));
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
