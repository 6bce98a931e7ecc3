// C entry points of the emulated CUDA launchers (tests/cuda_emu/build.py compiles this with the rewritten
// csrc/cuda/*.cu), called from tests/test_cuda_emulated.py through ctypes. Each returns the launcher's
// cudaError_t (0: success); emu_take_error() returns and clears the first problem the shim saw.
#include <string>

#include "api.h"
#include "cuda/corruption.cuh"
#include "cuda/cross_entropy.cuh"

using lmobj::CEOptions;
namespace cu = lmobj::cuda;

extern "C" {

const char* emu_take_error() {
  static std::string last;
  std::lock_guard<std::mutex> l(lmobj_emu::error_mutex);
  last = lmobj_emu::first_error;
  lmobj_emu::first_error.clear();
  lmobj_emu::broken = false;
  return last.c_str();
}

int emu_ce_forward(int dtype, const void* x, int64_t ld, const int64_t* target, int64_t N, int64_t V,
                   int64_t row_offset, int64_t shift_len, int64_t ignore_index, float smoothing, float z_loss,
                   float softcap, float* loss, float* lse, void* grad_inplace) {
  const CEOptions o{row_offset, shift_len, ignore_index, smoothing, z_loss, softcap};
  cu::ce_forward(static_cast<cu::DType>(dtype), x, ld, target, N, V, o, loss, lse, grad_inplace, nullptr);
  return static_cast<int>(cudaGetLastError());
}

int emu_ce_backward(int dtype, const float* grad_loss, const void* x, int64_t ld, const int64_t* target,
                    const float* lse, int64_t N, int64_t V, int64_t row_offset, int64_t shift_len,
                    int64_t ignore_index, float smoothing, float z_loss, float softcap, void* out) {
  const CEOptions o{row_offset, shift_len, ignore_index, smoothing, z_loss, softcap};
  cu::ce_backward(static_cast<cu::DType>(dtype), grad_loss, x, ld, target, lse, N, V, o, out, nullptr);
  return static_cast<int>(cudaGetLastError());
}

int emu_ce_grad_cols(int dtype, void* block, int64_t ld, int64_t N, int64_t C, const int64_t* target,
                     const float* lse, const float* w, int64_t col0, int64_t V, float smoothing, float z_loss,
                     float softcap) {
  cu::ce_grad_cols(static_cast<cu::DType>(dtype), block, ld, N, C, target, lse, w, col0, V, smoothing, z_loss,
                   softcap, nullptr);
  return static_cast<int>(cudaGetLastError());
}

int emu_span_corrupt(const int64_t* x, int64_t ld, int64_t B, int64_t S, const int64_t* lengths,
                     const int64_t* seed, const int64_t* sentinels, int64_t n_sentinels, int64_t row_offset,
                     float noise_density, float mean_span_length, int64_t eos_id, int64_t pad_id,
                     int64_t label_pad_id, int64_t* inputs, int64_t inputs_width, int64_t* targets,
                     int64_t targets_width) {
  const cu::SpanArgs a{x, ld, B, S, lengths, seed, sentinels, n_sentinels, row_offset, noise_density,
                       mean_span_length, eos_id, pad_id, label_pad_id, inputs, inputs_width, targets,
                       targets_width};
  return static_cast<int>(cu::span_corrupt(a, nullptr));
}

int emu_mlm_mask(const int64_t* x, int64_t ld, int64_t B, int64_t S, const int64_t* word_ids, int64_t wld,
                 const int64_t* seed, const int64_t* special_ids, int64_t n_special, int64_t row_offset, int exact,
                 int64_t select_threshold, int64_t mask_threshold, int64_t random_threshold, int64_t random_low,
                 int64_t random_range, int64_t mask_id, int64_t ignore_index, int64_t* out, int64_t* labels) {
  const cu::MLMArgs a{x, ld, B, S, word_ids, wld, seed, special_ids, n_special, row_offset, exact != 0,
                      select_threshold, mask_threshold, random_threshold, random_low, random_range, mask_id,
                      ignore_index, out, labels};
  return static_cast<int>(cu::mlm_mask(a, nullptr));
}

}  // extern "C"
