// Raw-pointer launchers of the CUDA corruption kernels (no torch headers: keeps the .cu compile light).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace lmobj::cuda {

struct SpanArgs {
  const int64_t* x;  // (B, S) ids, rows ld apart
  int64_t ld, B, S;
  const int64_t* lengths;  // (B,)
  const int64_t* seed;     // [1], on the device
  const int64_t* sentinels;
  int64_t n_sentinels;
  int64_t row_offset;
  float noise_density, mean_span_length;
  int64_t eos_id, pad_id, label_pad_id;
  int64_t* inputs;  // (B, inputs_width) contiguous
  int64_t inputs_width;
  int64_t* targets;  // (B, targets_width) contiguous
  int64_t targets_width;
};

struct MLMArgs {
  const int64_t* x;  // (B, S) ids, rows ld apart
  int64_t ld, B, S;
  const int64_t* word_ids;  // (B, S) rows wld apart, or nullptr
  int64_t wld;
  const int64_t* seed;  // [1], on the device
  const int64_t* special_ids;
  int64_t n_special;
  int64_t row_offset;
  bool exact;  // then select_threshold holds the bits of the float64 rate p (see mlm_exact_count)
  int64_t select_threshold, mask_threshold, random_threshold, random_low, random_range, mask_id, ignore_index;
  int64_t* out;     // (B, S) contiguous
  int64_t* labels;  // (B, S) contiguous
};

// Dynamic shared memory a launch needs for rows of S tokens (one block per row holds the whole row): the callers
// check it against the card's per-block limit, so that a row too long for it gets an error that says so.
size_t span_smem_bytes(int64_t S);
size_t mlm_smem_bytes(int64_t S, bool words, bool exact);

// Returns a cudaError_t of the launch (cudaSuccess, or the error of a failed launch).
cudaError_t span_corrupt(const SpanArgs& a, cudaStream_t stream);
cudaError_t mlm_mask(const MLMArgs& a, cudaStream_t stream);

}  // namespace lmobj::cuda
