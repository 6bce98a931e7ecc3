// CUDA registrations of the corruption ops: check, allocate, launch on the current stream. Lengths are not read
// on the host (no sync): the kernels clamp them to [0, S], clamp sentinel indices and guard every write, so a
// direct call with inconsistent arguments gives wrong ids, never an out-of-bounds access.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "corruption_checks.h"
#include "cuda/corruption.cuh"

namespace lmobj {
namespace {

// A row is one thread block: its shared memory bounds the row length on the cuda backend (about 12,900 tokens
// for span corruption on an H100, 5,600 on a 99 KB card); say so instead of a bare launch failure.
// One block per row on a 1-D grid, whose x dimension holds up to 2^31 - 1 blocks.
void check_row_fits(const char* op, const at::Tensor& x, size_t smem) {
  TORCH_CHECK(x.size(0) < (int64_t{1} << 31), op, ": ", x.size(0),
              " rows are more than one launch holds (2^31 - 1); split the batch");
  int dev = x.get_device(), limit = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess, op,
              ": could not read the GPU's shared memory size");
  TORCH_CHECK(smem <= static_cast<size_t>(limit), op, ": rows of ", x.size(1), " tokens need ", smem,
              " bytes of shared memory per block on the cuda backend, more than this GPU's ", limit,
              "; use backend='triton' (what backend='auto' picks for such rows) or shorter rows");
}

std::tuple<at::Tensor, at::Tensor> span_corrupt_cuda(const at::Tensor& input_ids, const at::Tensor& lengths,
                                                     const at::Tensor& seed, int64_t row_offset,
                                                     double noise_density, double mean_span_length,
                                                     const at::Tensor& sentinel_ids, int64_t eos_id, int64_t pad_id,
                                                     int64_t label_pad_id, int64_t inputs_width,
                                                     int64_t targets_width) {
  check_span_args("lmobj::span_corrupt", input_ids, lengths, seed, sentinel_ids, row_offset, noise_density,
                  mean_span_length, inputs_width, targets_width);
  TORCH_CHECK(sentinel_ids.numel() >= 1, "lmobj::span_corrupt: sentinel_ids must not be empty");
  c10::cuda::CUDAGuard guard(input_ids.device());
  const int64_t B = input_ids.size(0), S = input_ids.size(1);
  if (B > 0) check_row_fits("lmobj::span_corrupt", input_ids, cuda::span_smem_bytes(S));
  auto inputs = at::empty({B, inputs_width}, input_ids.options());
  auto targets = at::empty({B, targets_width}, input_ids.options());
  cuda::SpanArgs a{input_ids.const_data_ptr<int64_t>(), input_ids.stride(0), B, S,
                   lengths.const_data_ptr<int64_t>(), seed.const_data_ptr<int64_t>(),
                   sentinel_ids.const_data_ptr<int64_t>(), sentinel_ids.numel(), row_offset,
                   static_cast<float>(noise_density), static_cast<float>(mean_span_length), eos_id, pad_id,
                   label_pad_id, inputs.mutable_data_ptr<int64_t>(), inputs_width,
                   targets.mutable_data_ptr<int64_t>(), targets_width};
  const cudaError_t err = cuda::span_corrupt(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lmobj::span_corrupt: CUDA launch failed: ", cudaGetErrorString(err));
  return {inputs, targets};
}

std::tuple<at::Tensor, at::Tensor> mlm_mask_cuda(const at::Tensor& input_ids,
                                                 const std::optional<at::Tensor>& word_ids, const at::Tensor& seed,
                                                 int64_t row_offset, const at::Tensor& special_ids, bool exact,
                                                 int64_t select_threshold, int64_t mask_threshold,
                                                 int64_t random_threshold, int64_t random_low, int64_t random_range,
                                                 int64_t mask_id, int64_t ignore_index) {
  check_mlm_args("lmobj::mlm_mask", input_ids, word_ids, seed, special_ids, row_offset, exact,
                 select_threshold, mask_threshold, random_threshold, random_range);
  c10::cuda::CUDAGuard guard(input_ids.device());
  const int64_t B = input_ids.size(0), S = input_ids.size(1);
  auto out = at::empty({B, S}, input_ids.options());
  auto labels = at::empty({B, S}, input_ids.options());
  if (S == 0) return {out, labels};
  const bool words = word_ids.has_value();
  if (B > 0) check_row_fits("lmobj::mlm_mask", input_ids, cuda::mlm_smem_bytes(S, words, exact));
  cuda::MLMArgs a{input_ids.const_data_ptr<int64_t>(), input_ids.stride(0), B, S,
                  words ? word_ids->const_data_ptr<int64_t>() : nullptr, words ? word_ids->stride(0) : 0,
                  seed.const_data_ptr<int64_t>(), special_ids.const_data_ptr<int64_t>(), special_ids.numel(),
                  row_offset, exact, select_threshold, mask_threshold, random_threshold, random_low, random_range,
                  mask_id, ignore_index, out.mutable_data_ptr<int64_t>(), labels.mutable_data_ptr<int64_t>()};
  const cudaError_t err = cuda::mlm_mask(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "lmobj::mlm_mask: CUDA launch failed: ", cudaGetErrorString(err));
  return {out, labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(lmobj, CUDA, m) {
  m.impl("span_corrupt", &span_corrupt_cuda);
  m.impl("mlm_mask", &mlm_mask_cuda);
}

}  // namespace lmobj
