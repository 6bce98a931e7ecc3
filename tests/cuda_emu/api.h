// C entry points of the emulated CUDA launchers (defined in api.cpp): for race_driver.cpp, and the signatures
// tests/test_cuda_emulated.py calls through ctypes.
#pragma once
#include <cstdint>

extern "C" {
const char* emu_take_error();
int emu_ce_forward(int, const void*, int64_t, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                   float, float, float*, float*, void*);
int emu_ce_backward(int, const float*, const void*, int64_t, const int64_t*, const float*, int64_t, int64_t,
                    int64_t, int64_t, int64_t, float, float, float, void*);
int emu_ce_grad_cols(int, void*, int64_t, int64_t, int64_t, const int64_t*, const float*, const float*, int64_t,
                     int64_t, float, float, float);
int emu_span_corrupt(const int64_t*, int64_t, int64_t, int64_t, const int64_t*, const int64_t*, const int64_t*,
                     int64_t, int64_t, float, float, int64_t, int64_t, int64_t, int64_t*, int64_t, int64_t*, int64_t);
int emu_mlm_mask(const int64_t*, int64_t, int64_t, int64_t, const int64_t*, int64_t, const int64_t*, const int64_t*,
                 int64_t, int64_t, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t*,
                 int64_t*);
}
