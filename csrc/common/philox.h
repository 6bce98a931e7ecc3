// Philox4x32-10, bit for bit Triton's tl.philox / tl.randint4x (ALGORITHMS.md, "Randomness"), host and device.
// key = the 64-bit seed split into (low, high) 32-bit words; per round the key grows by 0x9E3779B9 / 0xBB67AE85
// and the counter is mixed with the multipliers 0xD2511F53 / 0xCD9E8D57.
//
// Counters of the corruption ops: (c0, c1, c2, c3) = (draw index, global row low, global row high, stream).
// A row's draws depend only on the seed and its global row index (row_offset + local row): splitting a batch
// gives the same bytes.
#pragma once
#include <cstdint>

#include "common/fast_math.h"

namespace lmobj {

// Streams (counter word c3): one per use, so no two uses ever share a draw.
// MLM: token selection keys are draws p of kStreamMLMSelect, word keys draws p (p = the word's first token) of
// kStreamMLMWord; a selected token p reads block p of kStreamMLMReplace: word 0 = the 80/10/10 draw, word 1 = the
// random id.
enum : uint32_t {
  kStreamSpanNoise = 1u,
  kStreamSpanKeep = 2u,
  kStreamMLMSelect = 3u,
  kStreamMLMWord = 4u,
  kStreamMLMReplace = 5u
};

struct Philox4 {
  uint32_t v[4];
};

LMOBJ_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

LMOBJ_HD Philox4 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 10; ++i) {
    const uint32_t a = c0, c = c2;
    c0 = philox_mulhi(0xCD9E8D57u, c) ^ c1 ^ k0;
    c2 = philox_mulhi(0xD2511F53u, a) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c;
    c3 = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// The four words of draw block `c0` of global row `row` in `stream`.
LMOBJ_HD Philox4 philox_row(uint64_t seed, int64_t row, uint32_t stream, uint32_t c0) {
  const uint64_t g = static_cast<uint64_t>(row);
  return philox4x32_10(seed, c0, static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), stream);
}

// Draw j of a row's stream: word j % 4 of block j / 4 (the layout every backend uses).
LMOBJ_HD uint32_t philox_draw(uint64_t seed, int64_t row, uint32_t stream, int64_t j) {
  const Philox4 r = philox_row(seed, row, stream, static_cast<uint32_t>(j >> 2));
  return r.v[j & 3];
}

}  // namespace lmobj
