// A standalone run of the emulated CUDA kernels on fixed inputs, for the sanitizer builds of
// tests/test_cuda_emulated.py: ThreadSanitizer sees a missing __syncthreads as a data race between the emulated
// threads (the shim's barriers are mutex + condition variable, so they order memory as __syncthreads does), and
// AddressSanitizer / UBSan see reads and writes past a buffer, dynamic shared memory included (allocated to the
// byte under ASan), and misaligned accesses. Values are checked by the Python tests; this checks the accesses.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "api.h"


static int failures = 0;

static void check(const char* what, int rc) {
  const char* err = emu_take_error();
  if (rc != 0 || err[0] != '\0') {
    std::printf("FAIL %s: cudaError %d, %s\n", what, rc, err);
    ++failures;
  }
}

static uint64_t lcg(uint64_t& s) { return s = s * 6364136223846793005ull + 1442695040888963407ull; }

static void span_case(int64_t B, int64_t S, float r, float m) {
  uint64_t s = 7;
  std::vector<int64_t> x(B * S), len(B), seed{123456789}, sent(2000);
  for (auto& v : x) v = static_cast<int64_t>(lcg(s) >> 40) % 32000;
  for (int64_t b = 0; b < B; ++b) len[b] = b == 0 ? S : static_cast<int64_t>(lcg(s) >> 33) % (S + 1);
  if (B > 2) len[B - 1] = 1;
  for (int i = 0; i < 2000; ++i) sent[i] = 32099 - i;
  const int64_t W = S + 2;
  std::vector<int64_t> in(B * W), tg(B * W);
  check("span_corrupt", emu_span_corrupt(x.data(), S, B, S, len.data(), seed.data(), sent.data(), 2000, 5, r, m, 1,
                                         0, -100, in.data(), W, tg.data(), W));
}

static void mlm_case(int64_t B, int64_t S, bool words, bool exact) {
  uint64_t s = 11;
  const int64_t wld = S + 3;  // word ids rows further apart than S
  std::vector<int64_t> x(B * S), wid(B * wld), seed{987654321}, special{0, 101, 102}, out(B * S), lab(B * S);
  for (auto& v : x) v = static_cast<int64_t>(lcg(s) >> 40) % 30522;
  for (int64_t b = 0; b < B; ++b) {
    int64_t w = 0;
    for (int64_t p = 0; p < S; ++p) {
      w += (lcg(s) >> 63) != 0;
      wid[b * wld + p] = (lcg(s) >> 60) == 0 ? -1 : w;
    }
  }
  double p = 0.15;
  int64_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  const int64_t one = int64_t(1) << 32;
  const int64_t select = exact ? bits : static_cast<int64_t>(0.15 * one);
  check("mlm_mask", emu_mlm_mask(x.data(), S, B, S, words ? wid.data() : nullptr, words ? wld : 0, seed.data(),
                                 special.data(), 3, 77, exact, select, static_cast<int64_t>(0.8 * one),
                                 static_cast<int64_t>(0.9 * one), 999, 29000, 103, -100, out.data(), lab.data()));
}

static void ce_case(int64_t N, int64_t V, int64_t ld, float smoothing, float z_loss, float cap) {
  uint64_t s = 3;
  std::vector<float> x(N * ld), loss(N), lse(N), w(N, 0.5f), out(N * V);
  for (auto& v : x) v = static_cast<float>(static_cast<int64_t>(lcg(s) >> 40) % 2001 - 1000) / 300.0f;
  std::vector<int64_t> t(N);
  for (int64_t r = 0; r < N; ++r) t[r] = r == 1 ? -100 : static_cast<int64_t>(lcg(s) >> 33) % V;
  check("ce_forward", emu_ce_forward(0, x.data(), ld, t.data(), N, V, 0, 0, -100, smoothing, z_loss, cap,
                                     loss.data(), lse.data(), nullptr));
  check("ce_backward", emu_ce_backward(0, w.data(), x.data(), ld, t.data(), lse.data(), N, V, 0, 0, -100, smoothing,
                                       z_loss, cap, out.data()));
  std::vector<int64_t> tc(t);
  for (auto& v : tc) v = v < 0 ? 0 : v;
  check("ce_grad_cols", emu_ce_grad_cols(0, x.data() + 1, ld, N, V - 2, tc.data(), lse.data(), w.data(), 1, V,
                                         smoothing, z_loss, cap));
  check("ce_forward (fused)", emu_ce_forward(0, x.data(), ld, t.data(), N, V, 0, 0, -100, smoothing, z_loss, cap,
                                             loss.data(), lse.data(), x.data()));
}

int main() {
  span_case(2, 1500, 0.5f, 8.0f);  // 256 threads, the shared-memory opt-in path is 3000 tokens: too slow here
  span_case(3, 300, 0.15f, 3.0f);
  for (int words = 0; words < 2; ++words)
    for (int exact = 0; exact < 2; ++exact) mlm_case(2, 300, words, exact);
  ce_case(3, 41, 41, 0.0f, 0.0f, 0.0f);      // scalar loads, 64 threads
  ce_case(2, 4100, 4100, 0.1f, 1e-3f, 5.0f);  // vector loads, tails, 128 threads
  ce_case(2, 999, 1003, 0.0f, 0.0f, 0.0f);   // rows ld apart
  std::printf(failures ? "%d failures\n" : "ok\n", failures);
  return failures ? 1 : 0;
}
