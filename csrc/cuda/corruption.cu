// CUDA kernels of the corruption family (ALGORITHMS.md, "Randomness", "T5 span corruption", "MLM masking").
// One block per row, the row's working set in shared memory. Same algorithm and bytes as triton_kernels/
// corruption.py: cuts of a random composition are the `want` slots with the smallest (Philox key, slot) pairs,
// found by a 32-step binary search on the key (block-wide counts with __syncthreads_count); run indices by a
// block scan of the cut flags; tokens then scatter straight to their output positions.
#include <cstdint>

#include "common/philox.h"
#include "common/span_math.h"
#include "cuda/corruption.cuh"

namespace lmobj::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

template <typename T, typename Op>
__device__ __forceinline__ T warp_inclusive_scan(T v, Op op) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T u = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v = op(u, v);
  }
  return v;
}

// In-place inclusive scan of data[0, m) (shared memory) by the whole block; warp_buf holds 32 T.
template <typename T, typename Op>
__device__ void block_inclusive_scan(T* data, int64_t m, T id, Op op, T* warp_buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  T carry = id;
  for (int64_t base = 0; base < m; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    T v = i < m ? data[i] : id;
    v = warp_inclusive_scan(v, op);
    if (lane == 31) warp_buf[warp] = v;
    __syncthreads();
    if (warp == 0) {
      T w = lane < nwarps ? warp_buf[lane] : id;
      w = warp_inclusive_scan(w, op);
      warp_buf[lane] = w;
    }
    __syncthreads();
    v = op(op(carry, warp > 0 ? warp_buf[warp - 1] : id), v);
    if (i < m) data[i] = v;
    carry = op(carry, warp_buf[nwarps - 1]);
    __syncthreads();
  }
}

struct Add {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Number of i < m with pred(i), in every thread of the block.
template <typename Pred>
__device__ int64_t block_count(int64_t m, Pred pred) {
  int64_t c = 0;
  for (int64_t base = 0; base < m; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    c += __syncthreads_count(i < m && pred(i));
  }
  return c;
}

// cut[j] = 1 for the `want` slots j < m (valid[j], or all when valid == nullptr) with the smallest (keys[j], j).
__device__ void select_smallest(const uint32_t* keys, const uint8_t* valid, int64_t m, int64_t want, uint8_t* cut) {
  if (want <= 0) {
    for (int64_t j = threadIdx.x; j < m; j += blockDim.x) cut[j] = 0;
    __syncthreads();
    return;
  }
  auto ok = [&](int64_t j) { return valid == nullptr || valid[j]; };
  uint64_t lo = 0, hi = 0xFFFFFFFFull;
  for (int it = 0; it < 32; ++it) {  // smallest T with #(key <= T) >= want
    const uint64_t mid = (lo + hi) >> 1;
    const int64_t c = block_count(m, [&](int64_t j) { return ok(j) && keys[j] <= mid; });
    if (c >= want) hi = mid; else lo = mid + 1;
  }
  const uint32_t T = static_cast<uint32_t>(lo);
  const int64_t n_lt = block_count(m, [&](int64_t j) { return ok(j) && keys[j] < T; });
  const int64_t n_eq = block_count(m, [&](int64_t j) { return ok(j) && keys[j] == T; });
  const int64_t need = want - n_lt;
  const bool all_eq = n_eq <= need;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x)
    cut[j] = ok(j) && (keys[j] < T || (all_eq && keys[j] == T));
  __syncthreads();
  if (!all_eq && threadIdx.x == 0) {  // ties at the threshold (rare): the lowest slots win
    int64_t c = 0;
    for (int64_t j = 0; j < m; ++j)
      if (ok(j) && keys[j] == T) cut[j] = c++ < need;
  }
  __syncthreads();
}

__device__ void composition_keys(uint64_t seed, int64_t g, uint32_t stream, int64_t m, uint32_t* keys) {
  for (int64_t b = threadIdx.x; b * 4 < m; b += blockDim.x) {
    const Philox4 r = philox_row(seed, g, stream, static_cast<uint32_t>(b));
#pragma unroll
    for (int w = 0; w < 4; ++w)
      if (b * 4 + w < m) keys[b * 4 + w] = r.v[w];
  }
  __syncthreads();
}

// Shared memory of the span kernel for rows of S tokens.
__host__ __device__ inline size_t span_smem(int64_t S) { return static_cast<size_t>(S) * 18 + 32 * 8 + 16; }

__global__ void span_kernel(SpanArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t S = a.S;
  int64_t* warp_buf = reinterpret_cast<int64_t*>(smem);
  uint32_t* keys = reinterpret_cast<uint32_t*>(smem + 32 * 8);  // keys, then noise run ids (sn)
  int32_t* sn = reinterpret_cast<int32_t*>(keys);
  int32_t* sx = reinterpret_cast<int32_t*>(keys + S);
  int32_t* A = sx + S;  // end of keep run q (in keep tokens)
  int32_t* Bn = A + S;  // end of noise run q (in noise tokens)
  uint8_t* cut_n = reinterpret_cast<uint8_t*>(Bn + S);
  uint8_t* cut_x = cut_n + S;

  const int64_t b = blockIdx.x, g = a.row_offset + b;
  const uint64_t seed = static_cast<uint64_t>(a.seed[0]);
  int64_t L = a.lengths[b];
  L = L < 0 ? 0 : (L > S ? S : L);
  const SpanCounts c = span_counts(L, a.noise_density, a.mean_span_length);
  const int64_t n = c.n, k = c.k, nkeep = L - n;

  composition_keys(seed, g, kStreamSpanNoise, n - 1, keys);
  select_smallest(keys, nullptr, n - 1, k - 1, cut_n);
  composition_keys(seed, g, kStreamSpanKeep, nkeep - 1, keys);
  select_smallest(keys, nullptr, nkeep - 1, k - 1, cut_x);
  // run ids: exclusive prefix sums of the cut flags (slot j ends a run after item j)
  for (int64_t j = threadIdx.x; j < S; j += blockDim.x) {
    sn[j] = j < n - 1 ? cut_n[j] : 0;
    sx[j] = j < nkeep - 1 ? cut_x[j] : 0;
  }
  __syncthreads();
  block_inclusive_scan<int32_t>(sn, S, 0, Add(), reinterpret_cast<int32_t*>(warp_buf));
  block_inclusive_scan<int32_t>(sx, S, 0, Add(), reinterpret_cast<int32_t*>(warp_buf));
  for (int64_t j = threadIdx.x; j < S; j += blockDim.x) {
    const bool cn = j < n - 1 && cut_n[j], cx = j < nkeep - 1 && cut_x[j];
    sn[j] -= cn;
    sx[j] -= cx;
    if (j < n && (cn || j == n - 1)) Bn[sn[j]] = static_cast<int32_t>(j + 1);
    if (j < nkeep && (cx || j == nkeep - 1)) A[sx[j]] = static_cast<int32_t>(j + 1);
  }
  __syncthreads();

  const int64_t* row = a.x + b * a.ld;
  int64_t* in = a.inputs + b * a.inputs_width;
  int64_t* tg = a.targets + b * a.targets_width;
  const int64_t Wi = a.inputs_width, Wt = a.targets_width;
  for (int64_t j = threadIdx.x; j < S; j += blockDim.x) {
    if (j < n) {  // noise token j of run q sits at A_q + j; goes to targets after q + 1 sentinels
      const int64_t q = sn[j], src = A[q] + j, dst = j + q + 1;
      if (src < L && dst < Wt) tg[dst] = row[src];
    }
    if (j < nkeep) {  // keep token j of run q sits at B_{q-1} + j; goes to inputs after q sentinels
      const int64_t q = sx[j], src = (q > 0 ? Bn[q - 1] : 0) + j, dst = j + q;
      if (src < L && dst < Wi) in[dst] = row[src];
    }
    if (j < k) {  // sentinel j: inputs at A_j + j, targets at B_{j-1} + j
      const int64_t s = a.sentinels[j < a.n_sentinels ? j : a.n_sentinels - 1];
      const int64_t di = A[j] + j, dt = (j > 0 ? Bn[j - 1] : 0) + j;
      if (di < Wi) in[di] = s;
      if (dt < Wt) tg[dt] = s;
    }
  }
  const int64_t in_len = n ? L - n + k + 1 : L + 1, tg_len = n ? n + k + 1 : 1;
  for (int64_t j = in_len - 1 + threadIdx.x; j < Wi; j += blockDim.x) in[j] = j == in_len - 1 ? a.eos_id : a.pad_id;
  for (int64_t j = tg_len - 1 + threadIdx.x; j < Wt; j += blockDim.x)
    tg[j] = j == tg_len - 1 ? a.eos_id : a.label_pad_id;
}

__device__ __forceinline__ bool mlm_eligible(const MLMArgs& a, const int64_t* row, const int64_t* wrow, int64_t p) {
  const int64_t v = row[p];
  for (int64_t s = 0; s < a.n_special; ++s)
    if (v == a.special_ids[s]) return false;
  return wrow == nullptr || wrow[p] >= 0;
}

// Shared memory of the MLM kernel for rows of S tokens (with word ids or exact counts).
__host__ __device__ inline size_t mlm_smem(int64_t S) { return static_cast<size_t>(S) * 14 + 32 * 8 + 16; }

template <bool WORDS, bool EXACT>
__global__ void mlm_kernel(MLMArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t S = a.S, b = blockIdx.x, g = a.row_offset + b;
  const uint64_t seed = static_cast<uint64_t>(a.seed[0]);
  const int64_t* row = a.x + b * a.ld;
  const int64_t* wrow = WORDS ? a.word_ids + b * a.wld : nullptr;
  int64_t* out = a.out + b * S;
  int64_t* lab = a.labels + b * S;

  auto finish = [&](int64_t p, bool sel) {  // the 80/10/10 draws only for selected tokens
    const int64_t v = row[p];
    if (!sel) {
      out[p] = v;
      lab[p] = a.ignore_index;
      return;
    }
    lab[p] = v;
    const Philox4 r = philox_row(seed, g, kStreamMLMReplace, static_cast<uint32_t>(p));
    const int64_t u = r.v[0];
    out[p] = u < a.mask_threshold ? a.mask_id
             : u < a.random_threshold ? draw_id(r.v[1], a.random_low, a.random_range)
                                      : v;
  };

  if constexpr (!WORDS && !EXACT) {  // every token on its own: no block-wide step; one key block per 4 tokens
    for (int64_t q = threadIdx.x; q * 4 < S; q += blockDim.x) {
      const Philox4 r = philox_row(seed, g, kStreamMLMSelect, static_cast<uint32_t>(q));
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int64_t p = q * 4 + w;
        if (p < S) finish(p, mlm_eligible(a, row, wrow, p) && static_cast<int64_t>(r.v[w]) < a.select_threshold);
      }
    }
    return;
  } else {
    int64_t* warp_buf = reinterpret_cast<int64_t*>(smem);
    int64_t* tag = warp_buf + 32;                              // S
    uint32_t* keys = reinterpret_cast<uint32_t*>(tag + S);     // S
    uint8_t* elig = reinterpret_cast<uint8_t*>(keys + S);      // S
    uint8_t* unit = elig + S;                                  // S
    for (int64_t q = threadIdx.x; q * 4 < S; q += blockDim.x) {
      const Philox4 r = philox_row(seed, g, WORDS ? kStreamMLMWord : kStreamMLMSelect, static_cast<uint32_t>(q));
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int64_t p = q * 4 + w;
        if (p < S) {
          keys[p] = r.v[w];
          elig[p] = mlm_eligible(a, row, wrow, p);
        }
      }
    }
    __syncthreads();
    for (int64_t p = threadIdx.x; p < S; p += blockDim.x)
      unit[p] = elig[p] && !(WORDS && p > 0 && elig[p - 1] && wrow[p - 1] == wrow[p]);
    __syncthreads();
    if constexpr (EXACT) {
      const int64_t E = block_count(S, [&](int64_t p) { return unit[p] != 0; });
      select_smallest(keys, unit, S, mlm_exact_count(E, double_from_bits(a.select_threshold)),
                      reinterpret_cast<uint8_t*>(tag));
      // chosen flags now in the first S bytes of tag: widen into tags, from the end (in place, one thread)
      if (threadIdx.x == 0) {
        const uint8_t* ch = reinterpret_cast<const uint8_t*>(tag);
        for (int64_t p = S - 1; p >= 0; --p) tag[p] = unit[p] ? 2 * p + ch[p] : -1;
      }
      __syncthreads();
    } else {
      for (int64_t p = threadIdx.x; p < S; p += blockDim.x)
        tag[p] = unit[p] ? 2 * p + (static_cast<int64_t>(keys[p]) < a.select_threshold) : -1;
      __syncthreads();
    }
    if constexpr (WORDS) block_inclusive_scan<int64_t>(tag, S, int64_t(-1), Max(), warp_buf);
    for (int64_t p = threadIdx.x; p < S; p += blockDim.x) finish(p, elig[p] && tag[p] >= 0 && (tag[p] & 1));
  }
}

int threads_for(int64_t S) { return S <= 256 ? 64 : (S <= 1024 ? 128 : 256); }

template <typename K, typename Args>
cudaError_t launch(K kernel, const Args& a, size_t smem, int threads, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<static_cast<unsigned>(a.B), threads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

size_t span_smem_bytes(int64_t S) { return span_smem(S); }
size_t mlm_smem_bytes(int64_t S, bool words, bool exact) { return (words || exact) ? mlm_smem(S) : 0; }

cudaError_t span_corrupt(const SpanArgs& a, cudaStream_t stream) {
  return launch(span_kernel, a, span_smem(a.S), threads_for(a.S), stream);
}

cudaError_t mlm_mask(const MLMArgs& a, cudaStream_t stream) {
  const bool words = a.word_ids != nullptr;
  const size_t smem = mlm_smem_bytes(a.S, words, a.exact);
  const int threads = threads_for(a.S);
  if (words && a.exact) return launch(mlm_kernel<true, true>, a, smem, threads, stream);
  if (words) return launch(mlm_kernel<true, false>, a, smem, threads, stream);
  if (a.exact) return launch(mlm_kernel<false, true>, a, smem, threads, stream);
  return launch(mlm_kernel<false, false>, a, smem, threads, stream);
}

}  // namespace lmobj::cuda
