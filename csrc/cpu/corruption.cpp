// CPU kernels of the corruption family (ALGORITHMS.md, "Randomness", "T5 span corruption", "MLM masking").
// One row at a time, rows in parallel (at::parallel_for). Cuts of a random composition are the k-1 slots with the
// smallest (Philox key, slot index) pairs, found with nth_element (linear time): the same set the CUDA and
// Triton kernels find with a threshold search and the reference with a sort.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <tuple>
#include <vector>

#include "common/philox.h"
#include "common/span_math.h"
#include "corruption_checks.h"

namespace lmobj {
namespace {

constexpr int kLanes = 8;

// Philox of 8 blocks with counters (c0[l], row low, row high, stream): out[4 l + w] = word w of block l (the
// layout of philox_draw). AVX2: the 32 x 32 -> 64-bit products of 8 lanes in two vpmuludq each.
inline void philox8(uint64_t seed, const uint32_t* c0, int64_t row, uint32_t stream, uint32_t* out) {
  const uint64_t g = static_cast<uint64_t>(row);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  alignas(32) uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
#if defined(__AVX2__)
  __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0));
  __m256i v1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g)));
  __m256i v2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32)));
  __m256i v3 = _mm256_set1_epi32(static_cast<int>(stream));
  const __m256i A = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i B = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int i = 0; i < 10; ++i) {
    const __m256i e0 = _mm256_mul_epu32(v0, A), o0 = _mm256_mul_epu32(_mm256_srli_epi64(v0, 32), A);
    const __m256i e2 = _mm256_mul_epu32(v2, B), o2 = _mm256_mul_epu32(_mm256_srli_epi64(v2, 32), B);
    const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
    const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
    const __m256i hi2 = _mm256_blend_epi32(_mm256_srli_epi64(e2, 32), o2, 0xAA);
    const __m256i lo2 = _mm256_blend_epi32(e2, _mm256_slli_epi64(o2, 32), 0xAA);
    v0 = _mm256_xor_si256(_mm256_xor_si256(hi2, v1), _mm256_set1_epi32(static_cast<int>(k0)));
    v2 = _mm256_xor_si256(_mm256_xor_si256(hi0, v3), _mm256_set1_epi32(static_cast<int>(k1)));
    v1 = lo2;
    v3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(x0), v0);
  _mm256_store_si256(reinterpret_cast<__m256i*>(x1), v1);
  _mm256_store_si256(reinterpret_cast<__m256i*>(x2), v2);
  _mm256_store_si256(reinterpret_cast<__m256i*>(x3), v3);
#else
  for (int l = 0; l < kLanes; ++l) {
    const Philox4 r = philox4x32_10(seed, c0[l], static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), stream);
    x0[l] = r.v[0];
    x1[l] = r.v[1];
    x2[l] = r.v[2];
    x3[l] = r.v[3];
  }
#endif
  for (int l = 0; l < kLanes; ++l) {
    out[4 * l] = x0[l];
    out[4 * l + 1] = x1[l];
    out[4 * l + 2] = x2[l];
    out[4 * l + 3] = x3[l];
  }
}

// Draws 0 .. m-1 of a row's stream (draw j = word j % 4 of block j / 4), into keys (resized to a multiple of 32).
inline void row_draws(uint64_t seed, int64_t row, uint32_t stream, int64_t m, std::vector<uint32_t>& keys) {
  keys.resize(static_cast<size_t>((m + 4 * kLanes - 1) / (4 * kLanes) * (4 * kLanes)));
  uint32_t c0[kLanes];
  for (int64_t j = 0; j < m; j += 4 * kLanes) {
    for (int l = 0; l < kLanes; ++l) c0[l] = static_cast<uint32_t>(j / 4 + l);
    philox8(seed, c0, row, stream, &keys[j]);
  }
}

// The `want`-th smallest (key << 32 | index) among the m keys (those with valid[j], when given). A pass keeps the
// candidates under a generous estimate of the quantile (uniform keys): a few dozen values, all of them if the
// estimate falls short. Then a bucket histogram of the candidates' keys (monotone in the key, branch-free) finds
// the bucket that holds the answer, and nth_element orders its one or two values. nth_element on all candidates
// mispredicted a branch per comparison and took a third of span_corrupt's time.
// On return cand[0, *n_cand) holds the candidates (key << 32 | index) in increasing index: every pair <= the
// result is among them.
inline uint64_t kth_smallest(const uint32_t* keys, const uint8_t* valid, int64_t m, int64_t want,
                             std::vector<uint64_t>& cand, int64_t* n_cand = nullptr) {
  const double q = (2.0 * static_cast<double>(want) + 32.0) / static_cast<double>(m);
  const uint64_t lim = q >= 1.0 ? (uint64_t(1) << 32) : static_cast<uint64_t>(q * 4294967296.0);
  cand.resize(static_cast<size_t>(2 * m));
  uint64_t* c = cand.data();
  uint64_t* small = c + m;
  int64_t cnt = 0;
  uint64_t l = lim;
  for (int pass = 0; pass < 2; ++pass) {
    l = pass == 0 ? lim : (uint64_t(1) << 32);
    cnt = 0;
    for (int64_t j = 0; j < m; ++j) {  // branch-free compaction
      c[cnt] = (static_cast<uint64_t>(keys[j]) << 32) | static_cast<uint64_t>(j);
      cnt += (valid == nullptr || valid[j]) & (keys[j] < l);
    }
    if (cnt >= want) break;
  }
  constexpr int kBuckets = 64;
  const float scale = static_cast<float>(kBuckets) / static_cast<float>(l);  // keys of candidates are < l
  auto bucket = [scale](uint64_t v) {
    const int bk = static_cast<int>(static_cast<float>(static_cast<uint32_t>(v >> 32)) * scale);
    return bk < kBuckets - 1 ? bk : kBuckets - 1;
  };
  int64_t hist[kBuckets] = {0};
  for (int64_t i = 0; i < cnt; ++i) ++hist[bucket(c[i])];
  int64_t before = 0;
  int bk = 0;
  while (before + hist[bk] < want) before += hist[bk++];
  int64_t ns = 0;
  for (int64_t i = 0; i < cnt; ++i) {
    small[ns] = c[i];
    ns += bucket(c[i]) == bk;
  }
  const int64_t r = want - 1 - before;
  std::nth_element(small, small + r, small + ns);
  if (n_cand != nullptr) *n_cand = cnt;
  return small[r];
}

// The `want` slots j < m with the smallest (key_j, j), in increasing j, into cuts; keys from `stream` of row
// `row`. Returns how many (min(want, m), 0 when want <= 0).
int64_t select_cuts(uint64_t seed, int64_t row, uint32_t stream, int64_t m, int64_t want, std::vector<int64_t>& cuts,
                    std::vector<uint32_t>& keys, std::vector<uint64_t>& cand) {
  if (want <= 0 || m <= 0) return 0;
  cuts.resize(static_cast<size_t>(m));
  int64_t* ct = cuts.data();
  if (want >= m) {
    for (int64_t j = 0; j < m; ++j) ct[j] = j;
    return m;
  }
  row_draws(seed, row, stream, m, keys);
  int64_t cnt = 0;
  const uint64_t thr = kth_smallest(keys.data(), nullptr, m, want, cand, &cnt);
  const uint64_t* c = cand.data();
  int64_t n = 0;
  for (int64_t i = 0; i < cnt; ++i) {  // the chosen slots are among the candidates, already in slot order
    ct[n] = static_cast<int64_t>(c[i] & 0xFFFFFFFFull);
    n += c[i] <= thr;
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor> span_corrupt_cpu(const at::Tensor& input_ids, const at::Tensor& lengths,
                                                    const at::Tensor& seed, int64_t row_offset, double noise_density,
                                                    double mean_span_length, const at::Tensor& sentinel_ids,
                                                    int64_t eos_id, int64_t pad_id, int64_t label_pad_id,
                                                    int64_t inputs_width, int64_t targets_width) {
  check_span_args("lmobj::span_corrupt", input_ids, lengths, seed, sentinel_ids, row_offset, noise_density,
                  mean_span_length, inputs_width, targets_width);
  const int64_t B = input_ids.size(0), S = input_ids.size(1), ld = input_ids.stride(0);
  const float r = static_cast<float>(noise_density), m = static_cast<float>(mean_span_length);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const int64_t NS = sentinel_ids.numel();
  for (int64_t b = 0; b < B; ++b) {  // host-side guards: the Python API already checked these
    TORCH_CHECK(len[b] >= 0 && len[b] <= S, "lmobj::span_corrupt: lengths[", b, "] = ", len[b],
                " is outside [0, ", S, "]");
    const SpanCounts c = span_counts(len[b], r, m);
    TORCH_CHECK(c.k <= NS, "lmobj::span_corrupt: row ", b, " needs ", c.k, " sentinels, only ", NS, " given");
    TORCH_CHECK(span_inputs_len(len[b], c) <= inputs_width && span_targets_len(c) <= targets_width,
                "lmobj::span_corrupt: inputs_width/targets_width too small for row ", b);
  }
  auto inputs = at::empty({B, inputs_width}, input_ids.options());
  auto targets = at::empty({B, targets_width}, input_ids.options());
  const int64_t* x = input_ids.const_data_ptr<int64_t>();
  const int64_t* sent = sentinel_ids.const_data_ptr<int64_t>();
  int64_t* oi_base = inputs.mutable_data_ptr<int64_t>();
  int64_t* ot_base = targets.mutable_data_ptr<int64_t>();
  const uint64_t sd = static_cast<uint64_t>(seed.const_data_ptr<int64_t>()[0]);
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cut_noise, cut_keep;
    std::vector<uint32_t> keys;
    std::vector<uint64_t> cand;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t L = len[b], g = row_offset + b;
      const int64_t* row = x + b * ld;
      int64_t* in = oi_base + b * inputs_width;
      int64_t* tg = ot_base + b * targets_width;
      const SpanCounts c = span_counts(L, r, m);
      int64_t oi = 0, ot = 0;
      if (c.n == 0) {
        std::copy(row, row + L, in);
        oi = L;
      } else {
        // Run q of the kept (noise) tokens ends at the q-th cut of its slots, the last run at the last slot:
        // cuts are the k-1 chosen slots of the n-1 (nkeep-1) gaps of a random composition into k parts.
        const int64_t nkeep = L - c.n;
        select_cuts(sd, g, kStreamSpanNoise, c.n - 1, c.k - 1, cut_noise, keys, cand);
        select_cuts(sd, g, kStreamSpanKeep, nkeep - 1, c.k - 1, cut_keep, keys, cand);
        int64_t p = 0, end_keep = -1, end_noise = -1;
        for (int64_t q = 0; q < c.k; ++q) {
          const bool last = q == c.k - 1;
          const int64_t lk = (last ? nkeep - 1 : cut_keep[q]) - end_keep;
          end_keep += lk;
          std::copy(row + p, row + p + lk, in + oi);
          oi += lk;
          p += lk;
          in[oi++] = sent[q];
          tg[ot++] = sent[q];
          const int64_t ln = (last ? c.n - 1 : cut_noise[q]) - end_noise;
          end_noise += ln;
          std::copy(row + p, row + p + ln, tg + ot);
          ot += ln;
          p += ln;
        }
      }
      in[oi++] = eos_id;
      tg[ot++] = eos_id;
      for (; oi < inputs_width; ++oi) in[oi] = pad_id;
      for (; ot < targets_width; ++ot) tg[ot] = label_pad_id;
    }
  });
  return {inputs, targets};
}

std::tuple<at::Tensor, at::Tensor> mlm_mask_cpu(const at::Tensor& input_ids, const std::optional<at::Tensor>& word_ids,
                                                const at::Tensor& seed, int64_t row_offset,
                                                const at::Tensor& special_ids, bool exact, int64_t select_threshold,
                                                int64_t mask_threshold, int64_t random_threshold, int64_t random_low,
                                                int64_t random_range, int64_t mask_id, int64_t ignore_index) {
  check_mlm_args("lmobj::mlm_mask", input_ids, word_ids, seed, special_ids, row_offset, exact,
                 select_threshold, mask_threshold, random_threshold, random_range);
  const int64_t B = input_ids.size(0), S = input_ids.size(1), ld = input_ids.stride(0);
  auto out = at::empty({B, S}, input_ids.options());
  auto labels = at::empty({B, S}, input_ids.options());
  const int64_t* x = input_ids.const_data_ptr<int64_t>();
  const bool words = word_ids.has_value();
  const int64_t* wid = words ? word_ids->const_data_ptr<int64_t>() : nullptr;
  const int64_t wld = words ? word_ids->stride(0) : 0;
  const int64_t* sp = special_ids.const_data_ptr<int64_t>();
  const int64_t nsp = special_ids.numel();
  const uint64_t sd = static_cast<uint64_t>(seed.const_data_ptr<int64_t>()[0]);
  int64_t* o_base = out.mutable_data_ptr<int64_t>();
  int64_t* l_base = labels.mutable_data_ptr<int64_t>();
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> elig(S), unit(S);
    std::vector<int64_t> start(S), chosen;
    std::vector<uint32_t> keys, rep(4 * kLanes);
    std::vector<uint64_t> cand;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t g = row_offset + b;
      const int64_t* row = x + b * ld;
      const int64_t* wrow = words ? wid + b * wld : nullptr;
      int64_t* o = o_base + b * S;
      int64_t* lab = l_base + b * S;
      row_draws(sd, g, words ? kStreamMLMWord : kStreamMLMSelect, S, keys);
      chosen.resize(static_cast<size_t>(S));
      int64_t nc = 0;
      if (!words) {
        // Token units (no word ids): branch-free passes the compiler vectorises; eligibility one special id at a
        // time, then selection, labels and the compaction of the selected positions.
        // Locals and __restrict: a uint8_t store may alias anything, and the loops would reload S each step.
        const int64_t n = S;
        uint8_t* __restrict el = elig.data();
        const int64_t* __restrict rw = row;
        for (int64_t p = 0; p < n; ++p) el[p] = 1;
        for (int64_t s = 0; s < nsp; ++s) {
          const int64_t id = sp[s];
          for (int64_t p = 0; p < n; ++p) el[p] &= static_cast<uint8_t>(rw[p] != id);
        }
        uint64_t thr = 0;
        bool any = !exact;
        if (exact) {
          int64_t E = 0;
          for (int64_t p = 0; p < n; ++p) E += el[p];
          const int64_t want = mlm_exact_count(E, double_from_bits(select_threshold));
          any = want > 0;
          if (any) thr = kth_smallest(keys.data(), el, n, want, cand);
        }
        const uint32_t* __restrict kk = keys.data();
        int64_t* __restrict ch = chosen.data();
        int64_t* __restrict ov = o;
        int64_t* __restrict lv = lab;
        const int64_t ign = ignore_index;
        const uint64_t sel_thr = static_cast<uint64_t>(select_threshold);
        std::copy(rw, rw + n, ov);
        if (exact) {
          for (int64_t p = 0; p < n; ++p) {
            const uint64_t key = (static_cast<uint64_t>(kk[p]) << 32) | static_cast<uint64_t>(p);
            lv[p] = (any & (el[p] != 0) & (key <= thr)) ? rw[p] : ign;
          }
        } else {
          for (int64_t p = 0; p < n; ++p) lv[p] = ((el[p] != 0) & (static_cast<uint64_t>(kk[p]) < sel_thr)) ? rw[p] : ign;
        }
        for (int64_t p = 0; p < n; ++p) {  // compaction of the selected positions
          ch[nc] = p;
          nc += (el[p] != 0) & (exact ? any & (((static_cast<uint64_t>(kk[p]) << 32) | static_cast<uint64_t>(p)) <= thr)
                                      : static_cast<uint64_t>(kk[p]) < sel_thr);
        }
      } else {
        // Word units: a unit is the first token of a run of eligible tokens sharing a word id (>= 0);
        // start[p] = the unit that decides token p.
        int64_t cur = -1, E = 0;
        for (int64_t p = 0; p < S; ++p) {
          bool e = wrow[p] >= 0;
          for (int64_t s = 0; s < nsp; ++s) e &= row[p] != sp[s];
          elig[p] = e;
          const bool u = e && (p == 0 || !elig[p - 1] || wrow[p - 1] != wrow[p]);
          unit[p] = u;
          E += u;
          if (u) cur = p;
          start[p] = e ? cur : -1;
        }
        uint64_t thr = 0;
        int64_t want = 0;
        if (exact) {
          want = mlm_exact_count(E, double_from_bits(select_threshold));
          if (want > 0) thr = kth_smallest(keys.data(), unit.data(), S, want, cand);
        }
        for (int64_t p = 0; p < S; ++p) {
          bool sel = false;
          if (start[p] >= 0) {
            const int64_t u = start[p];
            if (exact) {
              sel = want > 0 && ((static_cast<uint64_t>(keys[u]) << 32) | static_cast<uint64_t>(u)) <= thr;
            } else {
              sel = static_cast<int64_t>(keys[u]) < select_threshold;
            }
          }
          o[p] = row[p];
          lab[p] = sel ? row[p] : ignore_index;
          chosen[nc] = p;
          nc += sel;
        }
      }
      // 80/10/10 of the selected tokens, 8 Philox blocks at a time
      for (int64_t i = 0; i < nc; i += kLanes) {
        uint32_t c0[kLanes];
        for (int l = 0; l < kLanes; ++l) c0[l] = static_cast<uint32_t>(chosen[std::min(i + l, nc - 1)]);
        philox8(sd, c0, g, kStreamMLMReplace, rep.data());
        for (int l = 0; l < kLanes && i + l < nc; ++l) {
          const int64_t p = chosen[i + l], v = rep[4 * l];
          o[p] = v < mask_threshold ? mask_id
                 : v < random_threshold ? draw_id(rep[4 * l + 1], random_low, random_range)
                                        : row[p];
        }
      }
    }
  });
  return {out, labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(lmobj, CPU, m) {
  m.impl("span_corrupt", &span_corrupt_cpu);
  m.impl("mlm_mask", &mlm_mask_cpu);
}

}  // namespace lmobj
