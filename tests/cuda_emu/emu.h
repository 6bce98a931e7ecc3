// A CUDA-on-the-CPU shim for tests: the real csrc/cuda/*.cu sources compile with g++ against it (after
// tests/cuda_emu/build.py rewrites `kernel<<<grid, block, smem, stream>>>(args)` into `lmobj_emu::launch` and
// `extern __shared__` arrays into a per-block buffer), and each CUDA thread of a block runs as one OS thread.
// What it checks that compiling cannot: the kernels' arithmetic, indexing, tails, block reductions, scans and
// shuffles, __syncthreads placement (a barrier that not every live thread reaches is reported, not hung on),
// shuffles that read an exited lane, a __syncthreads reached after some threads exited (undefined in CUDA),
// launch limits (threads per block, grid, dynamic shared memory with and without the opt-in attribute), writes
// past the dynamic shared memory, and shared memory is garbage (0xA5) at the start of every block. Races are not
// seen here (threads are sequentially consistent) but by the ThreadSanitizer build of race_driver.cpp, and reads
// out of bounds by its AddressSanitizer build (tests/test_cuda_emulated.py runs both). Not covered: warp-
// synchronous code without a sync, speed, and the device-only branches of csrc/common (__CUDA_ARCH__ is
// undefined, so their host twins run). __expf rounds its argument times log2(e) to float, as ex2.approx does.
#pragma once
#include <cuda_runtime_api.h>  // dim3, cudaError_t, cudaStream_t: host-usable declarations
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static  // one block runs at a time, so a static is the block's shared memory (build.py
                           // registers each array with a SharedArray, so that launch can poison it)
#define __align__(n) alignas(n)

namespace lmobj_emu {

struct Idx {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Idx thread_idx, block_idx;
inline Idx block_dim, grid_dim;

inline std::mutex error_mutex;
inline std::string first_error;  // the first problem found since the last take_error()
inline std::atomic<bool> broken{false};

inline void report(const std::string& what) {
  std::lock_guard<std::mutex> l(error_mutex);
  if (first_error.empty()) first_error = what;
}

// How long a barrier waits for the rest of the block before it reports a deadlock: LMOBJ_EMU_TIMEOUT seconds,
// default 120 (a loaded 2-core machine, or a sanitizer build, is slow; a real deadlock only costs the wait).
inline std::chrono::seconds timeout() {
  static const long s = [] {
    const char* e = std::getenv("LMOBJ_EMU_TIMEOUT");
    return e != nullptr && std::atol(e) > 0 ? std::atol(e) : 120L;
  }();
  return std::chrono::seconds(s);
}

// A barrier that a thread leaves when it exits (CUDA counts exited threads as arrived) and that reports, instead
// of hanging, when some live thread never arrives.
struct Barrier {
  std::mutex m;
  std::condition_variable cv;
  int n = 0, count = 0, dropped = 0;
  bool block_wide = false;  // a __syncthreads barrier (not a warp's shuffle barrier)
  uint64_t gen = 0;
  void wait(const char* what) {
    std::unique_lock<std::mutex> l(m);
    if (broken) return;
    if (block_wide && dropped > 0) report(std::string(what) + ": reached after some threads of the block exited");
    const uint64_t g = gen;
    if (++count == n) {
      count = 0;
      ++gen;
      cv.notify_all();
      return;
    }
    if (!cv.wait_for(l, timeout(), [&] { return gen != g || broken.load(); })) {
      report(std::string(what) + ": not every live thread of the block arrived (deadlock)");
      broken = true;
      cv.notify_all();
    }
  }
  void drop() {
    std::lock_guard<std::mutex> l(m);
    --n;
    ++dropped;
    if (n > 0 && count == n) {
      count = 0;
      ++gen;
      cv.notify_all();
    }
  }
};

inline Barrier* block_barrier = nullptr;
inline Barrier* warp_barriers[32];
inline uint64_t shfl_slots[32][32];
inline std::atomic<bool> lane_exited[1024];
inline std::atomic<int64_t> sync_count{0};
inline std::vector<unsigned char> dyn_smem;
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kSmemCanary = 0;  // exact size: AddressSanitizer sees every byte past the end
#else
constexpr size_t kSmemCanary = 64;  // bytes after the dynamic shared memory that must stay 0x5A
#endif

// Static __shared__ arrays of the kernels: poisoned when first reached (no thread of the block can be past the
// declaration yet: a function-local static's initialisation holds the others back) and by launch before every
// later block.
inline std::mutex shared_mutex;
inline std::vector<std::pair<void*, size_t>> shared_arrays;
struct SharedArray {
  SharedArray(void* p, size_t bytes) {
    std::lock_guard<std::mutex> l(shared_mutex);
    std::memset(p, 0xA5, bytes);
    shared_arrays.emplace_back(p, bytes);
  }
};
inline std::map<const void*, int> max_dyn_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
inline cudaError_t last_error = cudaSuccess;
constexpr int kOptinSmem = 232448;  // H100 / H200: 227 KB per block with the opt-in
constexpr int kDefaultSmem = 48 * 1024;

inline unsigned char* dynamic_smem() { return dyn_smem.data(); }

inline void syncthreads() { block_barrier->wait("__syncthreads"); }

inline int syncthreads_count(int pred) {
  if (pred) sync_count.fetch_add(1);
  block_barrier->wait("__syncthreads_count");
  const int r = static_cast<int>(sync_count.load());
  block_barrier->wait("__syncthreads_count");
  if (thread_idx.x == 0) sync_count.store(0);
  block_barrier->wait("__syncthreads_count");
  return r;
}

template <typename T>
T shfl_from(T v, int src_lane, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffles of at most 8 bytes");
  const int warp = thread_idx.x >> 5, lane = thread_idx.x & 31;
  if (src_lane < 0 || src_lane > 31) src_lane = lane;  // CUDA: a source outside the warp returns the own value
  std::memcpy(&shfl_slots[warp][lane], &v, sizeof v);
  warp_barriers[warp]->wait(what);
  const unsigned src = static_cast<unsigned>(warp * 32 + src_lane);
  if (src >= block_dim.x || lane_exited[src]) report(std::string(what) + ": reads a lane that has exited");
  T r;
  std::memcpy(&r, &shfl_slots[warp][src_lane], sizeof r);
  warp_barriers[warp]->wait(what);
  return r;
}

template <typename K>
cudaError_t func_set_attribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > kOptinSmem) return cudaErrorInvalidValue;
  max_dyn_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

inline cudaError_t get_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

// kernel<<<grid, block, smem, stream>>>(args), with `body` calling the kernel: checks the launch as CUDA would,
// then runs the blocks one after another, each with one OS thread per CUDA thread.
template <typename K, typename F>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, F&& body) {
  const auto it = max_dyn_smem.find(reinterpret_cast<const void*>(kernel));
  const size_t smem_limit = it == max_dyn_smem.end() ? kDefaultSmem : it->second;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.y != 1 || block.z != 1 || grid.x == 0 || grid.x > 2147483647u ||
      grid.y != 1 || grid.z != 1) {
    last_error = cudaErrorInvalidConfiguration;
    report("launch: invalid configuration (1-D blocks of 1..1024 threads and 1-D grids only)");
    return;
  }
  if (smem > smem_limit) {
    last_error = cudaErrorInvalidValue;
    report("launch: " + std::to_string(smem) + " bytes of dynamic shared memory, over the kernel's limit of " +
           std::to_string(smem_limit));
    return;
  }
  block_dim = {block.x, 1, 1};
  grid_dim = {grid.x, 1, 1};
  sync_count = 0;
  std::vector<unsigned char>(smem + kSmemCanary).swap(dyn_smem);  // a new buffer of this size (ASan sees its end)
  for (unsigned b = 0; b < grid.x && !broken; ++b) {
    // shared memory starts with garbage, dynamic and static alike
    std::fill(dyn_smem.begin(), dyn_smem.begin() + smem, 0xA5);
    std::fill(dyn_smem.begin() + smem, dyn_smem.end(), 0x5A);
    {
      std::lock_guard<std::mutex> l(shared_mutex);
      for (auto& [p, bytes] : shared_arrays) std::memset(p, 0xA5, bytes);
    }
    Barrier bb;
    bb.n = static_cast<int>(block.x);
    bb.block_wide = true;
    block_barrier = &bb;
    std::vector<Barrier> wb((block.x + 31) / 32);
    for (size_t w = 0; w < wb.size(); ++w) {
      wb[w].n = static_cast<int>(std::min<unsigned>(32, block.x - 32 * w));
      warp_barriers[w] = &wb[w];
    }
    for (unsigned t = 0; t < block.x; ++t) lane_exited[t] = false;
    std::vector<std::thread> team;
    team.reserve(block.x);
    for (unsigned t = 0; t < block.x && !broken; ++t) {
      try {
        team.emplace_back([&, t, b] {
          thread_idx = {t, 0, 0};
          block_idx = {b, 0, 0};
          body();
          lane_exited[t] = true;
          warp_barriers[t >> 5]->drop();
          block_barrier->drop();
        });
      } catch (const std::exception& e) {  // e.g. a limit on threads: say so, release the others, no abort
        report(std::string("launch: could not start thread ") + std::to_string(t) + " of the block: " + e.what());
        broken = true;
        for (Barrier* x : {&bb}) { std::lock_guard<std::mutex> l(x->m); x->cv.notify_all(); }
        for (auto& w : wb) { std::lock_guard<std::mutex> l(w.m); w.cv.notify_all(); }
      }
    }
    for (auto& th : team) th.join();
    for (size_t i = smem; i < dyn_smem.size(); ++i)
      if (dyn_smem[i] != 0x5A) {
        report("a kernel wrote past its " + std::to_string(smem) + " bytes of dynamic shared memory");
        break;
      }
  }
}

}  // namespace lmobj_emu

#define threadIdx (::lmobj_emu::thread_idx)
#define blockIdx (::lmobj_emu::block_idx)
#define blockDim (::lmobj_emu::block_dim)
#define gridDim (::lmobj_emu::grid_dim)
#define __syncthreads() ::lmobj_emu::syncthreads()
#define __syncthreads_count(p) ::lmobj_emu::syncthreads_count(p)
#define __shfl_xor_sync(mask, v, o) ::lmobj_emu::shfl_from((v), (threadIdx.x & 31) ^ (o), "__shfl_xor_sync")
#define __shfl_up_sync(mask, v, d) \
  ::lmobj_emu::shfl_from((v), (threadIdx.x & 31) >= unsigned(d) ? (threadIdx.x & 31) - (d) : (threadIdx.x & 31), \
                         "__shfl_up_sync")
#define __shfl_down_sync(mask, v, d) \
  ::lmobj_emu::shfl_from((v), (threadIdx.x & 31) + (d) < 32 ? (threadIdx.x & 31) + (d) : (threadIdx.x & 31), \
                         "__shfl_down_sync")
#define __expf(x) exp2f((x) * 1.44269504f)
#define __logf(x) logf(x)
#define cudaFuncSetAttribute ::lmobj_emu::func_set_attribute
#define cudaGetLastError ::lmobj_emu::get_last_error
