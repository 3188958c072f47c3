// The row kernel of bitmap_linear on CPU, for one ISA. Included only by the
// isa_*.cpp files, after they set CPU_CAPABILITY (no include guard on purpose:
// once per ISA translation unit). See isa.h and bitmap_tile.h.
//
// Decoding a segment of 16 words into dense float32 lanes:
//   AVX-512 (every dtype) per 16-bit half of a word, the next 16 values widened to
//                    float32 and permuted to the set lanes (indices from a
//                    256-entry byte table per 8 bits), zeros elsewhere. Not the
//                    memory form of vexpandps: it is microcoded on AMD Zen 4 / 5 and
//                    made this kernel 2x slower there. Near the end of the
//                    values tensor, where 16 values would run past it, the
//                    values go through a zero-padded copy first;
//   AVX2 float32     per byte of a word, a masked load of popcount(byte) values
//                    and a permute from a 256-entry table, zeros elsewhere;
//   everything else  zero the segment, then one scalar store per set bit
//                    (count-trailing-zeros walk), widening half / bf16 exactly.
// Then each row of x is dotted with the segments of up to kBitmapRowsPerCall
// weight rows at once (each load of x feeds all of them), two vector
// accumulators per (x row, weight row) kept in scratch (loaded and stored once
// per segment). AVX-512 with M <= 4 skips the segment: see row_dot_registers.
// AVX-512 with one row of finite x compresses x instead of expanding the
// weights (gemv, a BitmapGemvFn): only the kept columns are multiplied; with
// AVX512-VBMI2, rows of at most 1/3 density list their kept columns with a byte
// compress instead (gemv_vbmi2); either way the rows' 16-lane sums are reduced
// 16 rows at a time (store_row_sums). AVX2 has a one-row kernel too (gemv, its
// section at the end): x permuted per mask byte by the set-bit table.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "cpu/bitmap_tile.h"
#include "cpu/isa.h"
#include "cpu/vec_load_impl.h"

namespace multiflow::cpu {
namespace {
namespace bitmap {

// popcount / count-trailing-zeros. Under the AVX2 / AVX-512 target pragmas GCC
// emits popcnt for the builtin (SSE4.2 comes with them); only the AVX-512 float
// decode uses popcount.
inline int popcount32(uint32_t u) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_popcount(u);
#else
  u = u - ((u >> 1) & 0x55555555u);
  u = (u & 0x33333333u) + ((u >> 2) & 0x33333333u);
  u = (u + (u >> 4)) & 0x0F0F0F0Fu;
  return static_cast<int>((u * 0x01010101u) >> 24);
#endif
}

inline int ctz32(uint32_t u) {  // u != 0
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(u);
#else
  int n = 0;
  while (!(u & 1u)) {
    u >>= 1;
    ++n;
  }
  return n;
#endif
}

// The one-row kernels' walk of a very sparse row (every ISA with one): its count in bits
// checked against `count` first (the walk reads one value per set bit), then
// s = sum of values[pos + i] * x[column of the i-th set bit]. false: the count is wrong.
template <typename T>
inline bool walk_row_sum(const uint32_t* b, int64_t words, const T* values, int64_t pos, int64_t count,
                         const float* x, float& s) {
  int64_t n = 0;
  for (int64_t w = 0; w < words; ++w) {
    n += popcount32(b[w]);
  }
  if (n != count) {
    return false;
  }
  s = 0.0f;
  for (int64_t w = 0; w < words; ++w) {
    for (uint32_t u = b[w]; u != 0u; u &= u - 1) {
      s += static_cast<float>(values[pos++]) * x[32 * w + ctz32(u)];
    }
  }
  return true;
}

#if !defined(CPU_CAPABILITY_AVX512)  // AVX-512 has its own for every dtype, below
// dense[32 w + b] = the next value for every set bit b of bits[w], 0 elsewhere.
template <typename T>
inline const T* decode_segment(const T* v, const T* /*v_end*/, const int32_t* bits, int64_t n_words, float* dense) {
  std::fill(dense, dense + 32 * n_words, 0.0f);
  for (int64_t w = 0; w < n_words; ++w) {
    uint32_t u = static_cast<uint32_t>(bits[w]);
    float* d = dense + 32 * w;
    while (u) {
      d[ctz32(u)] = static_cast<float>(*v++);
      u &= u - 1;
    }
  }
  return v;
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// AVX2 has no expand: for each byte k of a word, the 8 lanes take
// values[permute[k][l]] where bit l of k is set (permute[k][l] = set bits of k
// below l), zero elsewhere. decode_segment masks its load to popcount(k) lanes,
// so nothing past the row's values is read.
struct ExpandTable {
  int32_t permute[256][8];
};

constexpr ExpandTable make_expand_table() {
  ExpandTable t{};
  for (int k = 0; k < 256; ++k) {
    int next = 0;
    for (int l = 0; l < 8; ++l) {
      t.permute[k][l] = ((k >> l) & 1) ? next++ : 0;
    }
  }
  return t;
}

alignas(32) constexpr ExpandTable kExpand = make_expand_table();

// The 8 lanes of byte k: the first popcount(k) lanes of packed moved to k's set lanes,
// zeros elsewhere.
inline __m256i expand8(__m256i packed, uint32_t k) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.permute[k]));
  return _mm256_and_si256(_mm256_permutevar8x32_epi32(packed, idx), byte_lane_mask(k));
}

inline const float* decode_segment(const float* v, const float* /*v_end*/, const int32_t* bits, int64_t n_words,
                                   float* dense) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t w = 0; w < n_words; ++w) {
    const uint32_t u = static_cast<uint32_t>(bits[w]);
    for (int q = 0; q < 4; ++q) {
      const uint32_t k = (u >> (8 * q)) & 0xFFu;
      const int n = popcount32(k);
      const __m256i load_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
      const __m256i packed = _mm256_castps_si256(_mm256_maskload_ps(v, load_mask));
      _mm256_storeu_ps(dense + 32 * w + 8 * q, _mm256_castsi256_ps(expand8(packed, k)));
      v += n;
    }
  }
  return v;
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
struct ExpandIndex8 {  // idx[b][l] = the set bits of b below lane l (0 where bit l is clear)
  uint8_t idx[256][8];
};

constexpr ExpandIndex8 make_expand_index8() {
  ExpandIndex8 t{};
  for (int k = 0; k < 256; ++k) {
    int next = 0;
    for (int l = 0; l < 8; ++l) {
      t.idx[k][l] = static_cast<uint8_t>(((k >> l) & 1) ? next++ : 0);
    }
  }
  return t;
}

alignas(64) constexpr ExpandIndex8 kExpandIndex8 = make_expand_index8();

// Near the end of values: the values left (fewer than 16) in a zero-padded copy, widened.
template <typename T>
#if defined(__GNUC__) || defined(__clang__)
__attribute__((noinline, cold))
#endif
__m512 load_tail(const T* v, const T* v_end) {
  alignas(64) T tmp[16] = {};
  std::copy(v, v_end, tmp);
  return load_as_float(tmp);
}

// 16 float32 lanes: lane l = the next value if bit l of the 16-bit k is set, else 0;
// the values start at v; v_end = the end of the whole values tensor (the 16 lanes
// loaded may run into the next rows' values, which the permute never picks).
template <typename T>
inline __m512 expand16(uint32_t k, const T* v, const T* v_end) {
  const uint32_t lo = k & 0xFFu;
  const uint32_t hi = (k >> 8) & 0xFFu;
  const __m128i idx_lo = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpandIndex8.idx[lo]));
  const __m128i idx_hi = _mm_add_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpandIndex8.idx[hi])),
                                      _mm_set1_epi8(static_cast<char>(popcount32(lo))));
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi64(idx_lo, idx_hi));
  const __m512 packed = v_end - v >= 16 ? __m512(load_as_float(v)) : load_tail(v, v_end);
  return _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(k), idx, packed);
}

template <typename T>
inline const T* decode_segment(const T* v, const T* v_end, const int32_t* bits, int64_t n_words, float* dense) {
  for (int64_t w = 0; w < n_words; ++w) {
    const uint32_t u = static_cast<uint32_t>(bits[w]);
    const int n_lo = popcount32(u & 0xFFFFu);
    _mm512_storeu_ps(dense + 32 * w, expand16(u & 0xFFFFu, v, v_end));
    _mm512_storeu_ps(dense + 32 * w + 16, expand16(u >> 16, v + n_lo, v_end));
    v += n_lo + popcount32(u >> 16);
  }
  return v;
}

// Few rows of x (M <= kRegisterRows): no dense segment at all. Each word
// expands straight into two registers, which meet every row of x there; the
// 2 * R accumulators stay in registers for the whole weight row.
constexpr int64_t kRegisterRows = 4;

template <typename T, int R>
inline void row_dot_registers(
    const T* values, const T* v_end, const int32_t* bits, int64_t words, const float* x, int64_t ldx, float* out) {
  __m512 acc0[R];
  __m512 acc1[R];
  for (int i = 0; i < R; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  const T* v = values;
  for (int64_t w = 0; w < words; ++w) {
    // No skip of empty words: every column is multiplied (by 0 where pruned), as in
    // the segment path and F.linear, so an inf / NaN of x gives the same result
    // whatever the number of rows.
    const uint32_t u = static_cast<uint32_t>(bits[w]);
    const int n_lo = popcount32(u & 0xFFFFu);
    const __m512 w0 = expand16(u & 0xFFFFu, v, v_end);
    const __m512 w1 = expand16(u >> 16, v + n_lo, v_end);
    v += n_lo + popcount32(u >> 16);
    for (int i = 0; i < R; ++i) {
      const float* xi = x + i * ldx + 32 * w;
      acc0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xi), acc0[i]);
      acc1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xi + 16), acc1[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    alignas(64) float lanes[32];
    _mm512_store_ps(lanes, acc0[i]);
    _mm512_store_ps(lanes + 16, acc1[i]);
    float s = 0.0f;
    for (int l = 0; l < 32; ++l) {
      s += lanes[l];
    }
    out[i] = s;
  }
}

// --- One row of x (BitmapGemvFn) -------------------------------------------
// Each 16-column half k of a word: x's 16 columns compressed (register form,
// zeros above) to the popcount(k) kept ones, met by the next popcount(k)
// values with a masked FMA (lanes above keep their sum). The 16 values are one
// plain load, kept out of the FMA (an empty asm): folded, it becomes a masked
// memory operand, 3x slower from DRAM on our AMD EPYC (Zen 5). Four accumulators
// (two words per step) hide the FMA latency. While 64 values are left in the
// tensor no load needs a bound check (a word takes at most 32); the last words
// go through a checked load. Rows with fewer kept weights than 1 in 128 walk
// their set bits instead (count-trailing-zeros, scalar FMA).
struct LowMasks {
  __mmask16 m[17];  // m[n] = the n low lanes
};

constexpr LowMasks make_low_masks() {
  LowMasks t{};
  for (int n = 0; n <= 16; ++n) {
    t.m[n] = static_cast<__mmask16>((1u << n) - 1u);
  }
  return t;
}

alignas(64) constexpr LowMasks kLowMasks = make_low_masks();

template <typename T>
inline __m512 load_values16_unchecked(const T* v) {
  __m512 r = load_as_float(v);
#if defined(__GNUC__) || defined(__clang__)
  asm("" : "+v"(r));
#endif
  return r;
}

template <typename T>
inline __m512 load_values16(const T* values, int64_t pos, int64_t n_values) {
  if (n_values - pos >= 16) {
    return load_values16_unchecked(values + pos);
  }
  return pos < n_values ? load_tail(values + pos, values + n_values) : _mm512_setzero_ps();
}

// One word at values + pos; Checked: bound-check the loads against n_values.
template <bool Checked, typename T>
inline void gemv_word(
    uint32_t u, const T* values, int64_t& pos, int64_t n_values, const float* xw, __m512& a0, __m512& a1) {
  const int n_lo = popcount32(u & 0xFFFFu);
  const int n = popcount32(u);
  const __m512 x0 = _mm512_maskz_compress_ps(static_cast<__mmask16>(u), _mm512_loadu_ps(xw));
  const __m512 x1 = _mm512_maskz_compress_ps(static_cast<__mmask16>(u >> 16), _mm512_loadu_ps(xw + 16));
  __m512 v0, v1;
  if constexpr (Checked) {
    v0 = load_values16(values, pos, n_values);
    v1 = load_values16(values, pos + n_lo, n_values);
  } else {
    v0 = load_values16_unchecked(values + pos);
    v1 = load_values16_unchecked(values + pos + n_lo);
  }
  pos += n;
  a0 = _mm512_mask3_fmadd_ps(v0, x0, a0, kLowMasks.m[n_lo]);
  a1 = _mm512_mask3_fmadd_ps(v1, x1, a1, kLowMasks.m[n - n_lo]);
}

// Software prefetch for the VBMI2 one-row kernel, issued at the start of each row: the
// bits 512 bytes ahead and the values 4 KiB ahead, as many lines as the row itself
// takes (so the prefetch keeps pace with the reads). Out of cache (each format
// rotating 1 GiB of copies, 2 threads, 75%), in alternating processes: 768x768 about
// 22.7 -> 21.9 us and 4096x4096 464 -> 442 us, 2304x768 level, 768x3072 +2% (its rows
// are 3 KB: the hardware prefetchers already stream them), in cache +4% (the prefetch
// instructions); a nearer 2 KiB of values gained nothing, 6-8 KiB less than 4 KiB.
// gemv (two 16-lane compresses per word, more work per byte) got slower with it
// (768x768: 25.5 -> 26.5 us), so it does not prefetch.
constexpr int64_t kGemvPrefetchBits = 512;
constexpr int64_t kGemvPrefetchValues = 4096;

template <typename T>
inline void prefetch_row_ahead(const uint32_t* row_bits, int64_t words, const T* row_values, int64_t count) {
  const char* pb = reinterpret_cast<const char*>(row_bits) + kGemvPrefetchBits;
  for (int64_t o = 0; o < words * 4; o += 64) {
    _mm_prefetch(pb + o, _MM_HINT_T0);
  }
  const char* pv = reinterpret_cast<const char*>(row_values) + kGemvPrefetchValues;
  for (int64_t o = 0; o < count * static_cast<int64_t>(sizeof(T)); o += 64) {
    _mm_prefetch(pv + o, _MM_HINT_T0);
  }
}

// A very sparse row (under 1 kept weight per 128 columns; the walk's branches
// mispredict about once per value, so denser rows are compressed): walk_row_sum's
// sum goes to lane 0 of `lanes` (the others 0), as the other rows' 16 lanes of partial
// sums. false: the count is wrong.
template <typename T>
inline bool gemv_walk_row(const uint32_t* b, int64_t words, const T* values, int64_t pos, int64_t count,
                          const float* x, __m512& lanes) {
  float s = 0.0f;
  if (!walk_row_sum(b, words, values, pos, count, x, s)) {
    return false;
  }
  lanes = _mm512_maskz_mov_ps(1, _mm512_set1_ps(s));
  return true;
}

// A row by gemv_word (x compressed to the kept columns, 16 at a time): its sum in 16
// lanes in `lanes`; returns the position past its values (the caller checks it against
// the count).
template <typename T>
inline int64_t gemv_compress_row(const uint32_t* b, int64_t words, const T* values, int64_t pos, int64_t n_values,
                                 const float* x, __m512& lanes) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t w = 0;
  for (; w + 2 <= words && n_values - pos >= 64; w += 2) {
    gemv_word<false>(b[w], values, pos, n_values, x + 32 * w, a0, a1);
    gemv_word<false>(b[w + 1], values, pos, n_values, x + 32 * w + 32, a2, a3);
  }
  for (; w + 2 <= words; w += 2) {
    gemv_word<true>(b[w], values, pos, n_values, x + 32 * w, a0, a1);
    gemv_word<true>(b[w + 1], values, pos, n_values, x + 32 * w + 32, a2, a3);
  }
  if (w < words) {
    gemv_word<true>(b[w], values, pos, n_values, x + 32 * w, a0, a1);
  }
  lanes = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
  return pos;
}

// The one-row kernels sum each row in 16 lanes and reduce the lanes of up to 16 rows
// at once: sums[j] = the lanes of row j added (a fixed tree, the same for every row
// whatever its place or the other rows, so results do not depend on the blocking),
// stored to out[0, n). Four levels of pairwise shuffles + adds, 30 shuffles for 16
// rows where one reduction per row takes 4 each; a reduction per row cost about 20% of
// a 768-column row (in-cache microbenchmark).
inline void store_row_sums(__m512* sums, int64_t n, float* out) {  // n <= kBitmapGemvMaxRows = 16
  for (int64_t j = n; j < 16; ++j) {
    sums[j] = _mm512_setzero_ps();
  }
  __m512 t[8], w[4], y[2];
  for (int i = 0; i < 8; ++i) {  // rows 2i, 2i+1: lanes 0-7 / 8-15, their 128-bit quarters q0+q2, q1+q3
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(sums[2 * i], sums[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // rows 4i .. 4i+3: one quarter each
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // inside each quarter: lanes 0+2, 1+3 of two rows
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0x44), _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], 0xEE));
  }
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  // Row r's sum is in lane 4 (r % 4) + r / 4.
  const __m512 rows = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), s);
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1u), rows);
}

template <typename T>
int64_t gemv(
    const void* values_v,
    int64_t n_values,
    const int32_t* row_ptr,
    const int32_t* bits,
    int64_t words,
    int64_t n_rows,
    const float* x,
    float* out) {
  const T* values = static_cast<const T*>(values_v);
  __m512 sums[kBitmapGemvMaxRows];
  for (int64_t j = 0; j < n_rows; ++j) {
    const uint32_t* b = reinterpret_cast<const uint32_t*>(bits + j * words);
    const int64_t start = row_ptr[j];
    const int64_t count = row_ptr[j + 1] - start;
    if (count * 4 < words) {
      if (!gemv_walk_row(b, words, values, start, count, x, sums[j])) {
        return j;
      }
    } else if (gemv_compress_row(b, words, values, start, n_values, x, sums[j]) - start != count) {
      return j;
    }
  }
  store_row_sums(sums, n_rows, out);
  return -1;
}

#if defined(__GNUC__) || defined(__clang__)
// AVX512-VBMI2 (Ice Lake, Zen 4 and newer): one byte compress lists a word's kept
// columns (0-31), a two-register permute picks them from x; 3 shuffles per word
// where gemv_word takes two 16-lane compresses, and one FMA for up to 16 kept
// columns (a second one past 16). In cache, single thread (Zen 5, before the
// batched row reduction): 11-17% faster than gemv_word at 10-25% density, 4% at
// 37%, half as fast at 50% (the second FMA's branch), so rows denser than 1/3 keep
// gemv_word (benchmarks/RESULTS.md).
#define MULTIFLOW_VBMI2_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512vbmi2")))

template <bool Checked, typename T>
MULTIFLOW_VBMI2_TARGET inline void gemv_word_vbmi2(
    uint32_t u, const T* values, int64_t& pos, int64_t n_values, const float* xw, __m512& a0, __m512& a1) {
  const __m256i columns = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
                                           21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  const int n = popcount32(u);
  const __m256i kept = _mm256_maskz_compress_epi8(static_cast<__mmask32>(u), columns);
  const __m512 x_lo = _mm512_loadu_ps(xw);
  const __m512 x_hi = _mm512_loadu_ps(xw + 16);
  const __m512 x0 = _mm512_permutex2var_ps(x_lo, _mm512_cvtepu8_epi32(_mm256_castsi256_si128(kept)), x_hi);
  const __m512 v0 = Checked ? load_values16(values, pos, n_values) : load_values16_unchecked(values + pos);
  a0 = _mm512_mask3_fmadd_ps(v0, x0, a0, kLowMasks.m[n < 16 ? n : 16]);
  if (n > 16) {
    const __m512 x1 = _mm512_permutex2var_ps(x_lo, _mm512_cvtepu8_epi32(_mm256_extracti128_si256(kept, 1)), x_hi);
    const __m512 v1 = Checked ? load_values16(values, pos + 16, n_values) : load_values16_unchecked(values + pos + 16);
    a1 = _mm512_mask3_fmadd_ps(v1, x1, a1, kLowMasks.m[n - 16]);
  }
  pos += n;
}

// gemv with gemv_word_vbmi2 on rows of at most 1/3 density (the others as gemv). A
// function of its own, not a flag of gemv: its target adds VBMI2, which gemv's must not.
template <typename T>
MULTIFLOW_VBMI2_TARGET int64_t gemv_vbmi2(
    const void* values_v,
    int64_t n_values,
    const int32_t* row_ptr,
    const int32_t* bits,
    int64_t words,
    int64_t n_rows,
    const float* x,
    float* out) {
  const T* values = static_cast<const T*>(values_v);
  __m512 sums[kBitmapGemvMaxRows];
  for (int64_t j = 0; j < n_rows; ++j) {
    const uint32_t* b = reinterpret_cast<const uint32_t*>(bits + j * words);
    const int64_t start = row_ptr[j];
    const int64_t count = row_ptr[j + 1] - start;
    prefetch_row_ahead(b, words, values + start, count);
    int64_t pos = start;
    if (count * 4 < words) {
      if (!gemv_walk_row(b, words, values, start, count, x, sums[j])) {
        return j;
      }
      continue;
    }
    if (3 * count > 32 * words) {
      pos = gemv_compress_row(b, words, values, start, n_values, x, sums[j]);
    } else {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
      int64_t w = 0;
      for (; w + 2 <= words && n_values - pos >= 64; w += 2) {
        gemv_word_vbmi2<false>(b[w], values, pos, n_values, x + 32 * w, a0, a1);
        gemv_word_vbmi2<false>(b[w + 1], values, pos, n_values, x + 32 * w + 32, a2, a3);
      }
      for (; w < words; ++w) {
        gemv_word_vbmi2<true>(b[w], values, pos, n_values, x + 32 * w, a0, a1);
      }
      sums[j] = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    }
    if (pos - start != count) {
      return j;
    }
  }
  store_row_sums(sums, n_rows, out);
  return -1;
}

// Whether the kernels with a VBMI2 variant take it: where the CPU has AVX512-VBMI2,
// unless MULTIFLOW_CPU_VBMI2=0.
inline bool use_vbmi2() {
  static const bool vbmi2 = [] {
    const char* env = std::getenv("MULTIFLOW_CPU_VBMI2");
    __builtin_cpu_init();  // idempotent; needed if this runs before libgcc's own constructor
    return __builtin_cpu_supports("avx512vbmi2") && !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return vbmi2;
}

// The one-row kernel for this CPU: gemv_vbmi2 or gemv.
template <typename T>
BitmapGemvFn pick_gemv() {
  return use_vbmi2() ? &gemv_vbmi2<T> : &gemv<T>;
}
#else
inline bool use_vbmi2() {
  return false;
}

template <typename T>
BitmapGemvFn pick_gemv() {
  return &gemv<T>;
}
#endif

// --- Several rows of x (BitmapSpmmFn) ---------------------------------------
// A weight row's kept columns are listed first (each 16-column half: the
// column numbers compressed in a register, stored whole at the running end of
// the list: the next half overwrites the lanes past its count), for every row
// of the block. Then each kept weight, broadcast, meets the 16-lane vectors of
// x rows at its column, for up to four 16-row groups per pass (each weight and
// column number loaded once per pass), pass by pass over the block's rows:
// four accumulators per group, a fixed trip count (no data-dependent branch
// per weight).

// 16-row groups per pass of the transposed-x kernel.
constexpr int64_t kSpmmPass = 4;

// Column numbers of the set bits of b[0, words) into idx; returns their count.
inline int64_t list_columns(const uint32_t* b, int64_t words, int32_t* idx) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t w = 0; w < words; ++w) {
    const uint32_t u = b[w];
    const __m512i c0 = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(32 * w)));
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(static_cast<__mmask16>(u), c0));
    n += popcount32(u & 0xFFFFu);
    const __m512i c1 = _mm512_add_epi32(c0, _mm512_set1_epi32(16));
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(static_cast<__mmask16>(u >> 16), c1));
    n += popcount32(u >> 16);
  }
  return n;
}

// out_g[l] for the G 16-row groups starting at xg (group stride gs floats) of
// sum_k v[k] * xg[idx[k]][l]: four accumulators per group (k mod 4), summed
// (0 + 1) + (2 + 3).
template <int G, typename T>
inline void spmm_groups(const T* v, const int32_t* idx, int64_t n, const float* xg, int64_t gs, float* out_g) {
  constexpr int U = 4;
  __m512 a[G][U];
  for (int g = 0; g < G; ++g) {
    for (int q = 0; q < U; ++q) {
      a[g][q] = _mm512_setzero_ps();
    }
  }
  int64_t k = 0;
  for (; k + U <= n; k += U) {
    for (int q = 0; q < U; ++q) {
      const __m512 w = _mm512_set1_ps(static_cast<float>(v[k + q]));
      const float* col = xg + static_cast<int64_t>(idx[k + q]) * kBitmapSpmmGroup;
      for (int g = 0; g < G; ++g) {
        a[g][q] = _mm512_fmadd_ps(w, _mm512_loadu_ps(col + g * gs), a[g][q]);
      }
    }
  }
  for (int q = 0; k < n; ++k, ++q) {
    const __m512 w = _mm512_set1_ps(static_cast<float>(v[k]));
    const float* col = xg + static_cast<int64_t>(idx[k]) * kBitmapSpmmGroup;
    for (int g = 0; g < G; ++g) {
      a[g][q] = _mm512_fmadd_ps(w, _mm512_loadu_ps(col + g * gs), a[g][q]);
    }
  }
  for (int g = 0; g < G; ++g) {
    _mm512_storeu_ps(out_g + g * kBitmapSpmmGroup,
                     _mm512_add_ps(_mm512_add_ps(a[g][0], a[g][1]), _mm512_add_ps(a[g][2], a[g][3])));
  }
}

#endif

#if !defined(CPU_CAPABILITY_AVX512)
// --- Several rows of x (BitmapSpmmFn), AVX2 / baseline ---------------------------
// As the AVX-512 kernel: the column lists first (AVX2: per byte of a word, the
// positions of its set bits from a 256-entry table, stored whole; baseline: a
// count-trailing-zeros walk), then each kept weight, broadcast, meets the
// 16-row vectors of x at its column (16 / kLanes vectors per group): two groups
// per pass, two accumulators per group (the 16 AVX2 registers hold them).
constexpr int64_t kSpmmPass = 2;

#if defined(CPU_CAPABILITY_AVX2)
struct SetBitPositions {  // pos[k][i] = the i-th set bit of k (0 past popcount(k))
  int32_t pos[256][8];
};

constexpr SetBitPositions make_set_bit_positions() {
  SetBitPositions t{};
  for (int k = 0; k < 256; ++k) {
    int n = 0;
    for (int l = 0; l < 8; ++l) {
      if ((k >> l) & 1) {
        t.pos[k][n++] = l;
      }
    }
  }
  return t;
}

alignas(32) constexpr SetBitPositions kSetBits = make_set_bit_positions();

inline int64_t list_columns(const uint32_t* b, int64_t words, int32_t* idx) {
  int64_t n = 0;
  for (int64_t w = 0; w < words; ++w) {
    const uint32_t u = b[w];
    for (int q = 0; q < 4; ++q) {
      const uint32_t k = (u >> (8 * q)) & 0xFFu;
      const __m256i base = _mm256_set1_epi32(static_cast<int32_t>(32 * w + 8 * q));
      const __m256i pos = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSetBits.pos[k]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + n), _mm256_add_epi32(pos, base));
      n += popcount32(k);
    }
  }
  return n;
}
#else
inline int64_t list_columns(const uint32_t* b, int64_t words, int32_t* idx) {
  int64_t n = 0;
  for (int64_t w = 0; w < words; ++w) {
    uint32_t u = b[w];
    while (u) {
      idx[n++] = static_cast<int32_t>(32 * w + ctz32(u));
      u &= u - 1;
    }
  }
  return n;
}
#endif

template <int G, typename T>
inline void spmm_groups(const T* v, const int32_t* idx, int64_t n, const float* xg, int64_t gs, float* out_g) {
  static_assert(kBitmapSpmmGroup % kLanes == 0, "a 16-row group is whole vectors");
  constexpr int V = static_cast<int>(kBitmapSpmmGroup / kLanes);
  FloatVec a[G][2][V];
  for (int g = 0; g < G; ++g) {
    for (int q = 0; q < 2; ++q) {
      for (int u = 0; u < V; ++u) {
        a[g][q][u] = FloatVec(0.0f);
      }
    }
  }
  auto add = [&](int64_t k, int q) {  // q: a constant at each call, the registers stay put
    const FloatVec w(static_cast<float>(v[k]));
    const float* col = xg + static_cast<int64_t>(idx[k]) * kBitmapSpmmGroup;
    for (int g = 0; g < G; ++g) {
      for (int u = 0; u < V; ++u) {
        a[g][q][u] = at::vec::fmadd(w, FloatVec::loadu(col + g * gs + u * kLanes), a[g][q][u]);
      }
    }
  };
  int64_t k = 0;
  for (; k + 2 <= n; k += 2) {
    add(k, 0);
    add(k + 1, 1);
  }
  if (k < n) {
    add(k, 0);
  }
  for (int g = 0; g < G; ++g) {
    for (int u = 0; u < V; ++u) {
      (a[g][0][u] + a[g][1][u]).store(out_g + g * kBitmapSpmmGroup + u * kLanes);
    }
  }
}
#endif

// The transposed-x kernel (BitmapSpmmFn), every ISA: list_columns, spmm_groups
// and kSpmmPass come from the ISA's section above.
template <typename T>
int64_t spmm(
    const void* values_v,
    const int32_t* row_ptr,
    const int32_t* bits,
    int64_t words,
    int64_t n_rows,
    const float* xt,
    int64_t m,
    int32_t* idx,
    float* out) {
  const T* values = static_cast<const T*>(values_v);
  const int64_t groups = (m + kBitmapSpmmGroup - 1) / kBitmapSpmmGroup;
  const int64_t gs = words * 32 * kBitmapSpmmGroup;  // floats per 16-row group of xt
  const int64_t list = words * 32 + kBitmapSpmmGroup;  // ints per column list
  const uint32_t* b = reinterpret_cast<const uint32_t*>(bits);
  for (int64_t j = 0; j < n_rows; ++j) {
    if (list_columns(b + j * words, words, idx + j * list) != row_ptr[j + 1] - row_ptr[j]) {
      return j;
    }
  }
  // Passes of up to four 16-row groups outside, weight rows inside: the pass's
  // columns of xt serve every row of the block while they are in cache.
  alignas(64) float sums[kSpmmPass * kBitmapSpmmGroup];
  for (int64_t g0 = 0; g0 < groups; g0 += kSpmmPass) {
    const float* xg = xt + g0 * gs;
    const int64_t in_pass = std::min<int64_t>(kSpmmPass, groups - g0);
    const int64_t rows_here = std::min(kSpmmPass * kBitmapSpmmGroup, m - g0 * kBitmapSpmmGroup);
    for (int64_t j = 0; j < n_rows; ++j) {
      const T* v = values + row_ptr[j];  // inside the tensor: the count matched
      const int64_t n = row_ptr[j + 1] - row_ptr[j];
      const int32_t* cols = idx + j * list;
      switch (in_pass) {
        case 4: spmm_groups<kSpmmPass == 4 ? 4 : 1>(v, cols, n, xg, gs, sums); break;
        case 3: spmm_groups<kSpmmPass == 4 ? 3 : 1>(v, cols, n, xg, gs, sums); break;
        case 2: spmm_groups<2>(v, cols, n, xg, gs, sums); break;
        default: spmm_groups<1>(v, cols, n, xg, gs, sums); break;
      }
      for (int64_t l = 0; l < rows_here; ++l) {
        out[j * m + g0 * kBitmapSpmmGroup + l] = sums[l];
      }
    }
  }
  return -1;
}

// For each row i of x and weight row j < R: the two accumulators at
// scratch[(i * R + j) * kBitmapScratchPerRow] += dense[j] . x_i over `cols` (a
// multiple of 32) columns. Each load of x feeds R weight rows.
template <int R>
inline void dot_segment(
    const float (*dense)[kBitmapSegWords * 32], int64_t cols, const float* x, int64_t m, int64_t ldx, float* scratch) {
  static_assert(2 * kLanes <= kBitmapScratchPerRow, "scratch holds two vectors per (x row, weight row)");
  for (int64_t i = 0; i < m; ++i) {
    float* acc_i = scratch + i * R * kBitmapScratchPerRow;
    FloatVec acc0[R];
    FloatVec acc1[R];
    for (int j = 0; j < R; ++j) {
      acc0[j] = FloatVec::loadu(acc_i + j * kBitmapScratchPerRow);
      acc1[j] = FloatVec::loadu(acc_i + j * kBitmapScratchPerRow + kLanes);
    }
    const float* xi = x + i * ldx;
    for (int64_t c = 0; c < cols; c += 2 * kLanes) {
      const FloatVec x0 = FloatVec::loadu(xi + c);
      const FloatVec x1 = FloatVec::loadu(xi + c + kLanes);
      for (int j = 0; j < R; ++j) {
        acc0[j] = at::vec::fmadd(FloatVec::loadu(dense[j] + c), x0, acc0[j]);
        acc1[j] = at::vec::fmadd(FloatVec::loadu(dense[j] + c + kLanes), x1, acc1[j]);
      }
    }
    for (int j = 0; j < R; ++j) {
      acc0[j].store(acc_i + j * kBitmapScratchPerRow);
      acc1[j].store(acc_i + j * kBitmapScratchPerRow + kLanes);
    }
  }
}

template <typename T, int R>
void rows_dot_segments(
    const T* values,
    const T* values_end,
    const int32_t* row_ptr,
    const int32_t* bits,
    int64_t words,
    const float* x,
    int64_t m,
    int64_t ldx,
    float* scratch,
    float* out) {
  alignas(64) float dense[R][kBitmapSegWords * 32];
  std::fill(scratch, scratch + m * R * kBitmapScratchPerRow, 0.0f);
  const T* v[R];
  for (int j = 0; j < R; ++j) {
    v[j] = values + row_ptr[j];
  }
  for (int64_t w0 = 0; w0 < words; w0 += kBitmapSegWords) {
    const int64_t nw = std::min(kBitmapSegWords, words - w0);
    for (int j = 0; j < R; ++j) {
      v[j] = decode_segment(v[j], values_end, bits + j * words + w0, nw, dense[j]);
    }
    dot_segment<R>(dense, nw * 32, x + w0 * 32, m, ldx, scratch);
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int j = 0; j < R; ++j) {
      const float* acc = scratch + (i * R + j) * kBitmapScratchPerRow;
      float s = 0.0f;
      for (int64_t l = 0; l < 2 * kLanes; ++l) {
        s += acc[l];
      }
      out[j * m + i] = s;
    }
  }
}

template <typename T>
void rows_dot(
    const void* values,
    int64_t n_values,
    const int32_t* row_ptr,
    const int32_t* bits,
    int64_t words,
    int64_t n_rows,
    const float* x,
    int64_t m,
    int64_t ldx,
    float* scratch,
    float* out) {
  static_assert(32 % (2 * kLanes) == 0, "a word's 32 columns are whole vector pairs");
  const T* vals = static_cast<const T*>(values);
  const T* vals_end = vals + n_values;
#if defined(CPU_CAPABILITY_AVX512)
  if (m <= kRegisterRows) {
    for (int64_t j = 0; j < n_rows; ++j) {
      const T* vj = vals + row_ptr[j];
      const int32_t* bj = bits + j * words;
      switch (m) {
        case 1: row_dot_registers<T, 1>(vj, vals_end, bj, words, x, ldx, out + j * m); break;
        case 2: row_dot_registers<T, 2>(vj, vals_end, bj, words, x, ldx, out + j * m); break;
        case 3: row_dot_registers<T, 3>(vj, vals_end, bj, words, x, ldx, out + j * m); break;
        case 4: row_dot_registers<T, 4>(vj, vals_end, bj, words, x, ldx, out + j * m); break;
        default: break;
      }
    }
    return;
  }
#endif
  switch (n_rows) {
    case 4: rows_dot_segments<T, 4>(vals, vals_end, row_ptr, bits, words, x, m, ldx, scratch, out); break;
    case 3: rows_dot_segments<T, 3>(vals, vals_end, row_ptr, bits, words, x, m, ldx, scratch, out); break;
    case 2: rows_dot_segments<T, 2>(vals, vals_end, row_ptr, bits, words, x, m, ldx, scratch, out); break;
    case 1: rows_dot_segments<T, 1>(vals, vals_end, row_ptr, bits, words, x, m, ldx, scratch, out); break;
    default: break;
  }
}

// --- Format conversions (BitmapPackRowFn / BitmapUnpackRowFn), every ISA -------
// E is the element's bits (uint32_t: float32; uint16_t: float16 / bfloat16):
// bits are copied, never converted.

// One word's kept elements of a weight row, in column order (a count-trailing-zeros walk).
template <typename E>
inline E* pack_word_scalar(const E* w, uint32_t u, E* out) {
  while (u) {
    *out++ = w[ctz32(u)];
    u &= u - 1;
  }
  return out;
}

// One word's n_cols (<= 32) columns of a dense row: zeros, then the next value at each set
// bit (a bit at or past n_cols, which the caller has refused, would write nothing).
template <typename E>
inline const E* unpack_word_scalar(const E* v, uint32_t u, int64_t n_cols, E* out) {
  std::fill(out, out + n_cols, E{0});
  while (u) {
    const int c = ctz32(u);
    const E e = *v++;
    if (c < n_cols) {
      out[c] = e;
    }
    u &= u - 1;
  }
  return v;
}

#if defined(CPU_CAPABILITY_AVX512)
// Lanes of 16 elements (vec_load_impl.h): whole loads and stores, masked ones only at a
// row's last partial half (pack) or within 16 values of the tensor's end (unpack): a
// masked load that misses the cache is 2.5x slower than a whole one on Zen 5 (4096 x
// 4096 float32 pack, one thread: 5.8 ms masked, 2.4 ms whole).

// Per 16-bit half of each word: the 16 columns loaded (masked to the half's bits in the
// row's last word), the kept lanes compressed in a register (not the microcoded memory
// form), stored whole while 16 lanes still fit in the row's values (the next half
// overwrites the lanes past its count), masked to the count near the end.
template <typename E>
void pack_row(const void* w_v, int64_t cols, const int32_t* bits, void* out_v, int64_t n) {
  const E* w = static_cast<const E*>(w_v);
  E* out = static_cast<E*>(out_v);
  E* const end = out + n;
  const int64_t words = (cols + 31) / 32;
  for (int64_t wd = 0; wd < words; ++wd) {
    const uint32_t u = static_cast<uint32_t>(bits[wd]);
    for (int h = 0; h < 2; ++h) {
      const auto k = static_cast<__mmask16>(u >> (16 * h));
      if (k == 0) {  // also keeps the pointer below inside the row
        continue;
      }
      const int64_t c0 = 32 * wd + 16 * h;
      const __m512i kept =
          _mm512_maskz_compress_epi32(k, c0 + 16 <= cols ? load_lanes(w + c0) : load_lanes(w + c0, k));
      const int pc = popcount32(k);
      if (end - out >= 16) {
        store_lanes(out, kept);
      } else {
        store_lanes(out, static_cast<__mmask16>((1u << pc) - 1u), kept);
      }
      out += pc;
    }
  }
}

// Per 16-bit half of each word: 16 values (masked to popcount lanes within 16 of the
// tensor's end) expanded to the half's set lanes in a register, zeros elsewhere, stored
// whole (masked to the row's columns in its last word).
template <typename E>
void unpack_row(const void* values, const void* values_end, const int32_t* bits, int64_t cols, void* out_v) {
  const E* v = static_cast<const E*>(values);
  const E* const v_end = static_cast<const E*>(values_end);
  E* out = static_cast<E*>(out_v);
  const int64_t words = (cols + 31) / 32;
  for (int64_t wd = 0; wd < words; ++wd) {
    const uint32_t u = static_cast<uint32_t>(bits[wd]);
    for (int h = 0; h < 2; ++h) {
      const auto k = static_cast<__mmask16>(u >> (16 * h));
      const int pc = popcount32(k);
      const __m512i packed = v_end - v >= 16 ? load_lanes(v) : load_lanes(v, static_cast<__mmask16>((1u << pc) - 1u));
      const __m512i lanes = _mm512_maskz_expand_epi32(k, packed);
      const int64_t c0 = 32 * wd + 16 * h;
      if (c0 + 16 <= cols) {
        store_lanes(out + c0, lanes);
      } else if (c0 < cols) {
        store_lanes(out + c0, static_cast<__mmask16>((1u << (cols - c0)) - 1u), lanes);
      }
      v += pc;
    }
  }
}
#if defined(__GNUC__) || defined(__clang__)
// 16-bit elements with AVX512-VBMI2: a whole word (32 lanes of 16 bits) per step, one
// compress / expand in 16-bit lanes instead of two in 32-bit lanes with a widening and a
// narrowing each (768 x 768 at 25% density, one thread, Zen 5: pack 74 -> 24 us, unpack
// 79 -> 23 us in a stand-alone loop).
MULTIFLOW_VBMI2_TARGET void pack_row16_vbmi2(const void* w_v, int64_t cols, const int32_t* bits, void* out_v,
                                             int64_t n) {
  const uint16_t* w = static_cast<const uint16_t*>(w_v);
  uint16_t* out = static_cast<uint16_t*>(out_v);
  uint16_t* const end = out + n;
  const int64_t words = (cols + 31) / 32;
  for (int64_t wd = 0; wd < words; ++wd) {
    const auto k = static_cast<__mmask32>(static_cast<uint32_t>(bits[wd]));
    const __m512i row = 32 * wd + 32 <= cols ? _mm512_loadu_si512(w + 32 * wd) : _mm512_maskz_loadu_epi16(k, w + 32 * wd);
    const __m512i kept = _mm512_maskz_compress_epi16(k, row);
    const int pc = popcount32(k);
    if (end - out >= 32) {
      _mm512_storeu_si512(out, kept);
    } else {
      _mm512_mask_storeu_epi16(out, static_cast<__mmask32>((uint64_t{1} << pc) - 1u), kept);
    }
    out += pc;
  }
}

MULTIFLOW_VBMI2_TARGET void unpack_row16_vbmi2(const void* values, const void* values_end, const int32_t* bits,
                                               int64_t cols, void* out_v) {
  const uint16_t* v = static_cast<const uint16_t*>(values);
  const uint16_t* const v_end = static_cast<const uint16_t*>(values_end);
  uint16_t* out = static_cast<uint16_t*>(out_v);
  const int64_t words = (cols + 31) / 32;
  for (int64_t wd = 0; wd < words; ++wd) {
    const auto k = static_cast<__mmask32>(static_cast<uint32_t>(bits[wd]));
    const int pc = popcount32(k);
    const __m512i packed = v_end - v >= 32 ? _mm512_loadu_si512(v)
                                           : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << pc) - 1u), v);
    const __m512i lanes = _mm512_maskz_expand_epi16(k, packed);
    const int64_t c0 = 32 * wd;
    if (c0 + 32 <= cols) {
      _mm512_storeu_si512(out + c0, lanes);
    } else {
      _mm512_mask_storeu_epi16(out + c0, static_cast<__mmask32>((uint64_t{1} << (cols - c0)) - 1u), lanes);
    }
    v += pc;
  }
}
#endif

BitmapPackRowFn pick_pack16() {
#if defined(__GNUC__) || defined(__clang__)
  if (use_vbmi2()) {
    return &pack_row16_vbmi2;
  }
#endif
  return &pack_row<uint16_t>;
}

BitmapUnpackRowFn pick_unpack16() {
#if defined(__GNUC__) || defined(__clang__)
  if (use_vbmi2()) {
    return &unpack_row16_vbmi2;
  }
#endif
  return &unpack_row<uint16_t>;
}
#elif defined(CPU_CAPABILITY_AVX2)
// Lanes of 8 elements: vec_load_impl.h.

// Whole words per byte: 8 columns loaded, the kept ones moved to the front by a permute
// from the set-bit-position table (kSetBits), stored whole while 8 lanes still fit in
// the row's values, else through a copy; the last partial word scalar (no load past the
// row).
template <typename E>
void pack_row(const void* w_v, int64_t cols, const int32_t* bits, void* out_v, int64_t n) {
  const E* w = static_cast<const E*>(w_v);
  E* out = static_cast<E*>(out_v);
  E* const end = out + n;
  const int64_t full = cols / 32;
  for (int64_t wd = 0; wd < full; ++wd) {
    const uint32_t u = static_cast<uint32_t>(bits[wd]);
    for (int q = 0; q < 4; ++q) {
      const uint32_t k = (u >> (8 * q)) & 0xFFu;
      const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSetBits.pos[k]));
      const __m256i kept = _mm256_permutevar8x32_epi32(load_lanes(w + 32 * wd + 8 * q), idx);
      const int pc = popcount32(k);
      if (end - out >= 8) {
        store_lanes(out, kept);
      } else {
        alignas(32) E tmp[8];
        store_lanes(tmp, kept);
        std::copy(tmp, tmp + pc, out);
      }
      out += pc;
    }
  }
  if (full * 32 < cols) {
    pack_word_scalar(w + 32 * full, static_cast<uint32_t>(bits[full]), out);
  }
}

// Whole words per byte: 8 values (through a copy within 8 of the tensor's end) permuted
// to the byte's set lanes (kExpand), zeros elsewhere, stored whole; the last partial word
// scalar.
template <typename E>
void unpack_row(const void* values, const void* values_end, const int32_t* bits, int64_t cols, void* out_v) {
  const E* v = static_cast<const E*>(values);
  const E* const v_end = static_cast<const E*>(values_end);
  E* out = static_cast<E*>(out_v);
  const int64_t full = cols / 32;
  for (int64_t wd = 0; wd < full; ++wd) {
    const uint32_t u = static_cast<uint32_t>(bits[wd]);
    for (int q = 0; q < 4; ++q) {
      const uint32_t k = (u >> (8 * q)) & 0xFFu;
      const int pc = popcount32(k);
      __m256i packed;
      if (v_end - v >= 8) {
        packed = load_lanes(v);
      } else {
        alignas(32) E tmp[8] = {};
        std::copy(v, v + pc, tmp);
        packed = load_lanes(tmp);
      }
      store_lanes(out + 32 * wd + 8 * q, expand8(packed, k));
      v += pc;
    }
  }
  if (full * 32 < cols) {
    unpack_word_scalar(v, static_cast<uint32_t>(bits[full]), cols - 32 * full, out + 32 * full);
  }
}
#else
template <typename E>
void pack_row(const void* w_v, int64_t cols, const int32_t* bits, void* out_v, int64_t /*n*/) {
  const E* w = static_cast<const E*>(w_v);
  E* out = static_cast<E*>(out_v);
  for (int64_t wd = 0; 32 * wd < cols; ++wd) {
    out = pack_word_scalar(w + 32 * wd, static_cast<uint32_t>(bits[wd]), out);
  }
}

template <typename E>
void unpack_row(const void* values, const void* /*values_end*/, const int32_t* bits, int64_t cols, void* out_v) {
  const E* v = static_cast<const E*>(values);
  E* out = static_cast<E*>(out_v);
  for (int64_t wd = 0; 32 * wd < cols; ++wd) {
    v = unpack_word_scalar(v, static_cast<uint32_t>(bits[wd]), std::min<int64_t>(32, cols - 32 * wd), out + 32 * wd);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// --- One row of x (BitmapGemvFn), AVX2 --------------------------------------------
// Per byte k of a word: x's 8 columns are permuted to k's kept ones (kSetBits, the
// transposed-x kernel's table) and meet the next popcount(k) values, the lanes past
// them zeroed (x is finite, so they add 0); one accumulator per byte of a word. Rows
// under 1 kept weight per 128 columns walk their set bits, as on AVX-512. A row's
// lanes are added in a fixed order. The values load is a plain 8-lane load while 8
// values are left in the tensor, else a bounded copy.
struct LaneMasks8 {  // m[n][l] = all ones for l < n
  int32_t m[9][8];
};

constexpr LaneMasks8 make_lane_masks8() {
  LaneMasks8 t{};
  for (int n = 0; n <= 8; ++n) {
    for (int l = 0; l < 8; ++l) {
      t.m[n][l] = l < n ? -1 : 0;
    }
  }
  return t;
}

alignas(32) constexpr LaneMasks8 kLaneMasks8 = make_lane_masks8();

template <typename T>
inline __m256 values8(const T* values, int64_t pos, int64_t n_values) {
  if (n_values - pos >= 8) {
    return load_as_float(values + pos);
  }
  alignas(32) float tail[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t i = 0; i < n_values - pos; ++i) {
    tail[i] = static_cast<float>(values[pos + i]);
  }
  return _mm256_load_ps(tail);
}

inline float sum8(__m256 v) {  // ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <typename T>
int64_t gemv(
    const void* values_v,
    int64_t n_values,
    const int32_t* row_ptr,
    const int32_t* bits,
    int64_t words,
    int64_t n_rows,
    const float* x,
    float* out) {
  const T* values = static_cast<const T*>(values_v);
  for (int64_t j = 0; j < n_rows; ++j) {
    const uint32_t* b = reinterpret_cast<const uint32_t*>(bits + j * words);
    const int64_t start = row_ptr[j];
    const int64_t count = row_ptr[j + 1] - start;
    int64_t pos = start;
    if (count * 4 < words) {
      if (!walk_row_sum(b, words, values, start, count, x, out[j])) {
        return j;
      }
      continue;
    }
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t w = 0; w < words; ++w) {
      const uint32_t u = b[w];
      for (int q = 0; q < 4; ++q) {
        const uint32_t k = (u >> (8 * q)) & 0xFFu;
        const int n = popcount32(k);
        const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kSetBits.pos[k]));
        const __m256 xk = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 32 * w + 8 * q), idx);
        const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(kLaneMasks8.m[n]));
        acc[q] = _mm256_fmadd_ps(_mm256_and_ps(values8(values, pos, n_values), keep), xk, acc[q]);
        pos += n;
      }
    }
    if (pos - start != count) {
      return j;
    }
    out[j] = sum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
  return -1;
}
#endif

}  // namespace bitmap
}  // namespace

BitmapTiles MULTIFLOW_ISA_FN(bitmap_tiles)() {
#if defined(CPU_CAPABILITY_AVX512)
  return BitmapTiles{&bitmap::rows_dot<float>, &bitmap::rows_dot<c10::Half>, &bitmap::rows_dot<c10::BFloat16>,
                     bitmap::pick_gemv<float>(), bitmap::pick_gemv<c10::Half>(), bitmap::pick_gemv<c10::BFloat16>(),
                     &bitmap::spmm<float>,     &bitmap::spmm<c10::Half>,     &bitmap::spmm<c10::BFloat16>,
                     &bitmap::pack_row<uint32_t>, bitmap::pick_pack16(),
                     &bitmap::unpack_row<uint32_t>, bitmap::pick_unpack16()};
#elif defined(CPU_CAPABILITY_AVX2)
  return BitmapTiles{&bitmap::rows_dot<float>, &bitmap::rows_dot<c10::Half>, &bitmap::rows_dot<c10::BFloat16>,
                     &bitmap::gemv<float>,     &bitmap::gemv<c10::Half>,     &bitmap::gemv<c10::BFloat16>,
                     &bitmap::spmm<float>,     &bitmap::spmm<c10::Half>,     &bitmap::spmm<c10::BFloat16>,
                     &bitmap::pack_row<uint32_t>, &bitmap::pack_row<uint16_t>,
                     &bitmap::unpack_row<uint32_t>, &bitmap::unpack_row<uint16_t>};
#else
  return BitmapTiles{&bitmap::rows_dot<float>, &bitmap::rows_dot<c10::Half>, &bitmap::rows_dot<c10::BFloat16>,
                     nullptr,                  nullptr,                      nullptr,
                     &bitmap::spmm<float>,     &bitmap::spmm<c10::Half>,     &bitmap::spmm<c10::BFloat16>,
                     &bitmap::pack_row<uint32_t>, &bitmap::pack_row<uint16_t>,
                     &bitmap::unpack_row<uint32_t>, &bitmap::unpack_row<uint16_t>};
#endif
}

}  // namespace multiflow::cpu
