// Argument checks of the corruption ops shared by the CPU and CUDA registrations (host only). The Python API
// checks first and names the user's arguments; these guard direct torch.ops.lmobj calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cfloat>
#include <optional>

#include "common/span_math.h"

namespace lmobj {

inline void check_ids_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2, op, ": ", name, " must be a 2-D int64 tensor");
  // rows of 1 token have no column stride to speak of ((B, 1) ids from a transpose: strides (1, B)), nor has an
  // empty tensor (NumPy's (0, S) arrays: strides (0, 0)); PyTorch calls both contiguous
  TORCH_CHECK(t.numel() == 0 || t.size(1) == 1 || t.stride(1) == 1, op, ": ", name,
              " rows must be contiguous (stride(1) == 1)");
}

inline void check_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on the device of input_ids");
}

inline void check_span_args(const char* op, const at::Tensor& input_ids, const at::Tensor& lengths,
                            const at::Tensor& seed, const at::Tensor& sentinel_ids, int64_t row_offset,
                            double noise_density, double mean_span_length, int64_t inputs_width,
                            int64_t targets_width) {
  // in float32, as the kernels compute: m < 1 would ask for more spans than noise tokens (cuts past the gaps)
  const float r = static_cast<float>(noise_density), m = static_cast<float>(mean_span_length);
  TORCH_CHECK(r >= 0.0f && r < 1.0f, op, ": noise_density must be in [0, 1) in float32, got ", noise_density);
  TORCH_CHECK(m >= 1.0f && m <= FLT_MAX, op, ": mean_span_length must be a finite float >= 1, got ",
              mean_span_length);
  check_ids_matrix(op, "input_ids", input_ids);
  check_vector(op, "lengths", lengths, input_ids);
  check_vector(op, "seed", seed, input_ids);
  check_vector(op, "sentinel_ids", sentinel_ids, input_ids);
  TORCH_CHECK(lengths.numel() == input_ids.size(0), op, ": lengths must have one entry per row");
  TORCH_CHECK(seed.numel() == 1, op, ": seed must hold one int64");
  TORCH_CHECK(row_offset >= 0, op, ": row_offset must be >= 0");
  TORCH_CHECK(inputs_width >= 1 && targets_width >= 1, op, ": inputs_width and targets_width must be >= 1");
}

inline void check_mlm_args(const char* op, const at::Tensor& input_ids, const std::optional<at::Tensor>& word_ids,
                           const at::Tensor& seed, const at::Tensor& special_ids, int64_t row_offset, bool exact,
                           int64_t select_threshold, int64_t mask_threshold, int64_t random_threshold,
                           int64_t random_range) {
  check_ids_matrix(op, "input_ids", input_ids);
  if (word_ids.has_value()) {
    check_ids_matrix(op, "word_ids", *word_ids);
    TORCH_CHECK(word_ids->sizes() == input_ids.sizes(), op, ": word_ids must have the shape of input_ids");
    TORCH_CHECK(word_ids->device() == input_ids.device(), op, ": word_ids must be on the device of input_ids");
  }
  check_vector(op, "seed", seed, input_ids);
  check_vector(op, "special_ids", special_ids, input_ids);
  TORCH_CHECK(seed.numel() == 1, op, ": seed must hold one int64");
  TORCH_CHECK(row_offset >= 0, op, ": row_offset must be >= 0");
  const int64_t one = int64_t(1) << 32;
  TORCH_CHECK(mask_threshold >= 0 && mask_threshold <= random_threshold && random_threshold <= one, op,
              ": thresholds must satisfy 0 <= mask <= random <= 2^32");
  if (exact) {  // the float64 bits of the rate
    const double p = double_from_bits(select_threshold);
    TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": with exact, select_threshold must hold the bits of a float64 in [0, 1]");
  } else {
    TORCH_CHECK(select_threshold >= 0 && select_threshold <= one, op, ": select_threshold must be in [0, 2^32]");
  }
  TORCH_CHECK(random_range >= 1 && random_range < (int64_t(1) << 31), op, ": random_range must be in [1, 2^31)");
}

}  // namespace lmobj
