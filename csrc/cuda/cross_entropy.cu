// CUDA kernels of the cross-entropy family. One block per row: an online softmax over the row with 16-byte
// loads where the row is aligned, a block reduction of (max, sum exp, sum z), then (for the gradient) one more
// pass that writes softmax-based gradients. Memory-bound: the forward reads the row once, the fused
// forward+gradient reads it twice (the second time mostly from L2) and writes it once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "cuda/cross_entropy.cuh"

namespace lmobj::cuda {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <bool CAP>
__device__ __forceinline__ float cap(float x, float c, float inv_c) {
  if constexpr (CAP) return c * tanhf(x * inv_c);
  return x;
}

// Merge (m, s) pairs of an online softmax and sums of z across the block. Result valid in every thread.
// While both maxima are -inf each s is 0 or NaN (fmaxf skips NaN: a thread that saw only NaN and -inf has
// m = -inf, s = NaN): their sum keeps the NaN, so a NaN logit makes the lse NaN as on the CPU.
__device__ __forceinline__ void block_reduce(float& m, float& s, float& sz, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    sz += __shfl_xor_sync(0xffffffffu, sz, off);
    float mn = fmaxf(m, m2);
    s = (mn == -INFINITY) ? s + s2 : s * __expf(m - mn) + s2 * __expf(m2 - mn);
    m = mn;
  }
  if (lane == 0) {
    smem[warp] = m;
    smem[32 + warp] = s;
    smem[64 + warp] = sz;
  }
  __syncthreads();
  m = -INFINITY;
  s = 0.0f;
  sz = 0.0f;
  for (int w = 0; w < nwarps; ++w) {
    float m2 = smem[w], s2 = smem[32 + w];
    float mn = fmaxf(m, m2);
    s = (mn == -INFINITY) ? s + s2 : s * __expf(m - mn) + s2 * __expf(m2 - mn);
    m = mn;
    sz += smem[64 + w];
  }
}

// The gradient pass of one row (both kernels): g * d loss / d z_j for every j, written to orow. A row with an
// ignored target gets zeros; a target outside [0, V) gets NaN (the loss is NaN too; never an out-of-bounds read).
template <typename T, int VEC, bool CAP>
__device__ __forceinline__ void write_grad_row(const T* row, T* orow, int64_t V, int64_t y, RowNorm n, float g,
                                               const CEOptions& o) {
  const bool ignored = y == o.ignore_index, valid = y >= 0 && y < V;
  const float c = o.softcap, inv_c = CAP ? 1.0f / o.softcap : 0.0f;
  const float coef = g * (1.0f + 2.0f * o.z_loss * n.lse()), uni = g * o.smoothing / static_cast<float>(V);
  const float hit = g * (1.0f - o.smoothing);
  auto grad = [&](float x, int64_t j) {
    const float z = cap<CAP>(x, c, inv_c);
    float d = __expf((z - n.m) - n.ls) * coef - uni - (j == y ? hit : 0.0f);
    if constexpr (CAP) d *= 1.0f - (z * inv_c) * (z * inv_c);
    return from_f<T>((ignored || g == 0.0f) ? 0.0f : (valid ? d : NAN));  // 0 weight: 0, not NaN at lse = -inf
  };
  const int64_t nvec = V / VEC;
  for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
    Pack<T, VEC> p = reinterpret_cast<const Pack<T, VEC>*>(row)[k], q;
#pragma unroll
    for (int i = 0; i < VEC; ++i) q.v[i] = grad(to_f(p.v[i]), k * VEC + i);
    reinterpret_cast<Pack<T, VEC>*>(orow)[k] = q;
  }
  for (int64_t j = nvec * VEC + threadIdx.x; j < V; j += blockDim.x) orow[j] = grad(to_f(row[j]), j);
}

template <typename T, int VEC, bool CAP>
__global__ void ce_fwd_kernel(const T* x, int64_t ld, const int64_t* __restrict__ target, int64_t V,
                              CEOptions o, float* __restrict__ loss, float* __restrict__ lse_out, T* grad) {
  __shared__ float smem[96 + 2];
  const int64_t r = blockIdx.x;
  const T* row = x + r * ld;
  const float c = o.softcap, inv_c = CAP ? 1.0f / o.softcap : 0.0f;
  const int64_t nvec = V / VEC;
  float m = -INFINITY, s = 0.0f, sz = 0.0f;
  for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
    Pack<T, VEC> p = reinterpret_cast<const Pack<T, VEC>*>(row)[k];
    float z[VEC], pm = -INFINITY;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      z[i] = cap<CAP>(to_f(p.v[i]), c, inv_c);
      pm = fmaxf(pm, z[i]);
    }
    // while every value so far is -inf, mn is too and exp(-inf - -inf) would be NaN: shift by 0 instead
    const float mn = fmaxf(m, pm), shift = mn == -INFINITY ? 0.0f : mn;
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc += __expf(z[i] - shift);
      sz += z[i];
    }
    s = s * __expf(m - shift) + acc;
    m = mn;
  }
  for (int64_t j = nvec * VEC + threadIdx.x; j < V; j += blockDim.x) {
    const float z = cap<CAP>(to_f(row[j]), c, inv_c), mn = fmaxf(m, z), shift = mn == -INFINITY ? 0.0f : mn;
    s = s * __expf(m - shift) + __expf(z - shift);
    m = mn;
    sz += z;
  }
  block_reduce(m, s, sz, smem);
  const RowNorm n{m, logf(s)};  // one per row: the accurate log (__logf is ~3 ulp for s >= 2)
  const int64_t y = row_target(target, o.row_offset + r, o.shift_len, o.ignore_index);
  const bool valid = y >= 0 && y < V;
  if (threadIdx.x == 0) {
    const float zy = valid ? cap<CAP>(to_f(row[y]), c, inv_c) : 0.0f;
    loss[r] = ce_row_loss(n, zy, sz, V, y, o);
    lse_out[r] = n.lse();
  }
  if (grad == nullptr) return;
  __syncthreads();  // thread 0 has read row[y] before any thread overwrites the row
  write_grad_row<T, VEC, CAP>(row, grad + r * ld, V, y, n, 1.0f, o);
}

template <typename T, int VEC, bool CAP>
__global__ void ce_bwd_kernel(const float* __restrict__ grad_loss, const T* __restrict__ x, int64_t ld,
                              const int64_t* __restrict__ target, const float* __restrict__ lse_in, int64_t V,
                              CEOptions o, T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int64_t y = row_target(target, o.row_offset + r, o.shift_len, o.ignore_index);
  const float g = y == o.ignore_index ? 0.0f : grad_loss[r];
  write_grad_row<T, VEC, CAP>(x + r * ld, out + r * V, V, y, RowNorm{lse_in[r], 0.0f}, g, o);
}

// One block per row, a grid-stride over the block's columns: every element is independent.
template <typename T, bool CAP>
__global__ void ce_grad_cols_kernel(T* x, int64_t ld, int64_t C, const int64_t* __restrict__ target,
                                    const float* __restrict__ lse, const float* __restrict__ w, int64_t col0,
                                    float inv_V, float smoothing, float z_loss, float softcap) {
  const int64_t r = blockIdx.x;
  T* row = x + r * ld;
  const float l = lse[r], g = w[r], c = softcap, inv_c = CAP ? 1.0f / softcap : 0.0f;
  const float coef = g * (1.0f + 2.0f * z_loss * l), uni = g * smoothing * inv_V, hit = g * (1.0f - smoothing);
  const int64_t y = target[r] - col0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const float z = cap<CAP>(to_f(row[j]), c, inv_c);
    float d = __expf(z - l) * coef - uni - (j == y ? hit : 0.0f);
    if constexpr (CAP) d *= 1.0f - (z * inv_c) * (z * inv_c);
    row[j] = from_f<T>(g == 0.0f ? 0.0f : d);  // ignored rows: 0, even where lse = -inf makes d NaN
  }
}

template <typename T>
void launch_grad_cols(void* x, int64_t ld, int64_t N, int64_t C, const int64_t* target, const float* lse,
                      const float* w, int64_t col0, int64_t V, float smoothing, float z_loss, float softcap,
                      cudaStream_t st) {
  T* xt = static_cast<T*>(x);
  const dim3 grid(static_cast<unsigned>(N)), block(C >= 1024 ? 256 : 128);
  const float inv_V = 1.0f / static_cast<float>(V);
  if (softcap > 0.0f)
    ce_grad_cols_kernel<T, true><<<grid, block, 0, st>>>(xt, ld, C, target, lse, w, col0, inv_V, smoothing, z_loss,
                                                          softcap);
  else
    ce_grad_cols_kernel<T, false><<<grid, block, 0, st>>>(xt, ld, C, target, lse, w, col0, inv_V, smoothing, z_loss,
                                                           softcap);
}

// About 16 vector loads per thread: enough in flight per thread, and blocks small enough that several share an SM
// (at V = 32000 bf16, 1024-thread blocks ran at 1.6 TB/s on an H200, where V = 128256 reached 3.6 TB/s).
int threads_for(int64_t V, int vec) {
  int64_t t = 64;
  while (t < 1024 && t * 16 * vec < V) t *= 2;
  return static_cast<int>(t);
}

// VEC-wide loads need every row start aligned to 16 bytes.
template <typename T>
bool aligned16(const void* p, int64_t ld) {
  constexpr int VEC = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % VEC == 0;
}

template <typename T>
void launch_fwd(const void* x, int64_t ld, const int64_t* target, int64_t N, int64_t V, const CEOptions& o, float* loss,
                float* lse, void* grad, cudaStream_t st) {
  constexpr int VEC = 16 / sizeof(T);
  const T* xt = static_cast<const T*>(x);
  T* gt = static_cast<T*>(grad);
  const bool vec = aligned16<T>(x, ld), capped = o.softcap > 0.0f;
  const dim3 grid(static_cast<unsigned>(N)), block(threads_for(V, vec ? VEC : 1));
  if (vec && capped) ce_fwd_kernel<T, VEC, true><<<grid, block, 0, st>>>(xt, ld, target, V, o, loss, lse, gt);
  else if (vec) ce_fwd_kernel<T, VEC, false><<<grid, block, 0, st>>>(xt, ld, target, V, o, loss, lse, gt);
  else if (capped) ce_fwd_kernel<T, 1, true><<<grid, block, 0, st>>>(xt, ld, target, V, o, loss, lse, gt);
  else ce_fwd_kernel<T, 1, false><<<grid, block, 0, st>>>(xt, ld, target, V, o, loss, lse, gt);
}

template <typename T>
void launch_bwd(const float* g, const void* x, int64_t ld, const int64_t* target, const float* lse, int64_t N,
                int64_t V, const CEOptions& o, void* out, cudaStream_t st) {
  constexpr int VEC = 16 / sizeof(T);
  const T* xt = static_cast<const T*>(x);
  T* ot = static_cast<T*>(out);
  const bool vec = aligned16<T>(x, ld) && aligned16<T>(out, V), capped = o.softcap > 0.0f;
  const dim3 grid(static_cast<unsigned>(N)), block(threads_for(V, vec ? VEC : 1));
  if (vec && capped) ce_bwd_kernel<T, VEC, true><<<grid, block, 0, st>>>(g, xt, ld, target, lse, V, o, ot);
  else if (vec) ce_bwd_kernel<T, VEC, false><<<grid, block, 0, st>>>(g, xt, ld, target, lse, V, o, ot);
  else if (capped) ce_bwd_kernel<T, 1, true><<<grid, block, 0, st>>>(g, xt, ld, target, lse, V, o, ot);
  else ce_bwd_kernel<T, 1, false><<<grid, block, 0, st>>>(g, xt, ld, target, lse, V, o, ot);
}

}  // namespace

void ce_forward(DType dtype, const void* x, int64_t ld, const int64_t* target, int64_t N, int64_t V,
                const CEOptions& o, float* loss, float* lse, void* grad_inplace, cudaStream_t stream) {
  if (N == 0) return;
  switch (dtype) {
    case DType::f32: launch_fwd<float>(x, ld, target, N, V, o, loss, lse, grad_inplace, stream); break;
    case DType::f16: launch_fwd<__half>(x, ld, target, N, V, o, loss, lse, grad_inplace, stream); break;
    case DType::bf16: launch_fwd<__nv_bfloat16>(x, ld, target, N, V, o, loss, lse, grad_inplace, stream); break;
  }
}

void ce_backward(DType dtype, const float* grad_loss, const void* x, int64_t ld, const int64_t* target,
                 const float* lse, int64_t N, int64_t V, const CEOptions& o, void* out, cudaStream_t stream) {
  if (N == 0) return;
  switch (dtype) {
    case DType::f32: launch_bwd<float>(grad_loss, x, ld, target, lse, N, V, o, out, stream); break;
    case DType::f16: launch_bwd<__half>(grad_loss, x, ld, target, lse, N, V, o, out, stream); break;
    case DType::bf16: launch_bwd<__nv_bfloat16>(grad_loss, x, ld, target, lse, N, V, o, out, stream); break;
  }
}

void ce_grad_cols(DType dtype, void* block, int64_t ld, int64_t N, int64_t C, const int64_t* target, const float* lse,
                  const float* w, int64_t col0, int64_t V, float smoothing, float z_loss, float softcap,
                  cudaStream_t stream) {
  if (N == 0 || C == 0) return;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    launch_grad_cols<T>(block, ld, N, C, target, lse, w, col0, V, smoothing, z_loss, softcap, stream);
  };
  switch (dtype) {
    case DType::f32: launch(float{}); break;
    case DType::f16: launch(__half{}); break;
    case DType::bf16: launch(__nv_bfloat16{}); break;
  }
}

}  // namespace lmobj::cuda
