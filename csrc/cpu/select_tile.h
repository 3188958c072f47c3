// The selection ops on CPU: the interface between the drivers (select.cpp,
// which split the work into items and run them with at::parallel_for) and the
// per-ISA inner loops (select_tile_impl.h, compiled once per ISA, see isa.h).
//
// The loops work on blocks of at most kSelectBlock elements: values (or flow
// scores) are brought to float32 into a stack buffer, then turned into order
// keys, counts or mask bytes. Two L1-resident 4 KiB buffers per thread.
#pragma once

#include <cstdint>

#include "select_key.h"

namespace multiflow::cpu {

inline constexpr int64_t kSelectBlock = 1024;

// Copies of the radix histogram a thread counts into (see histogram below).
inline constexpr int64_t kHistogramCopies = 4;

// nm_mask groups wider than this are ranked by a stable sort in the driver.
inline constexpr int64_t kNmRankMaxM = 64;

// out[e] = float(src[e]) (|float(src[e])| when absolute), e < n <= kSelectBlock.
using ToFloatFn = void (*)(const void* src, int64_t n, bool absolute, float* out);

// One row segment of flow scores: out[j] = (imp_out_i * (|float(w[j])| * scale)) * imp_in[j],
// in float32 and in that order (bitwise the reference's score), j < n <= kSelectBlock.
using FlowScoreFn = void (*)(const void* w, int64_t n, float imp_out_i, float scale, const float* imp_in, float* out);

struct SelectTiles {
  // Indexed by dtype: 0 float32, 1 float16, 2 bfloat16 (see select.cpp).
  ToFloatFn to_float[3];
  FlowScoreFn flow_score[3];

  // keys[e] = key_of_float(f[e]) (of |f[e]| when absolute; see select_key.h), e < n.
  void (*float_keys)(const float* f, int64_t n, bool absolute, uint32_t* keys);
  // Number of e < n with f[e] <= threshold (float comparison: NaN counts never).
  int64_t (*count_at_most)(const float* f, int64_t n, float threshold);
  // out[e] = f[e] > threshold, e < n.
  void (*greater_than)(const float* f, int64_t n, float threshold, bool* out);

  // Radix pass: counts (key >> shift) & digit_mask for each key whose bits
  // from high_shift up equal prefix (every key when high_shift == 32), into
  // hist: kHistogramCopies histograms of kRadixBuckets counters, one after the
  // other, whose sum is the digit histogram.
  void (*histogram)(
      const uint32_t* keys, int64_t n, int high_shift, uint32_t prefix, int shift, uint32_t digit_mask, uint32_t* hist);
  // Copies the keys whose bits from high_shift (< 32) up equal prefix to out,
  // in order; returns how many. out has room for n keys (all may be written).
  int64_t (*gather)(const uint32_t* keys, int64_t n, int high_shift, uint32_t prefix, uint32_t* out);

  // N:M on keys of one row of C = n_groups * m elements, m <= kNmRankMaxM:
  // keep[j] is true for the n largest keys of each group of m (equal keys:
  // lower index first), found by counting each key's rank (O(m^2)).
  void (*nm_row)(const uint32_t* keys, int64_t n_groups, int64_t n, int64_t m, bool* keep);
};

SelectTiles select_tiles_default();
SelectTiles select_tiles_avx2();
SelectTiles select_tiles_avx512();

}  // namespace multiflow::cpu
