// The row kernel of bitmap_linear on CPU, for one ISA. Included only by the
// isa_*.cpp files, after they set CPU_CAPABILITY (no include guard on purpose:
// once per ISA translation unit). See isa.h and bitmap_tile.h.
//
// Decoding a segment of 16 words into dense float32 lanes:
//   AVX-512 float32  per 16-bit half of a word, _mm512_maskz_expandloadu_ps puts
//                    the next popcount(half) values at the set lanes, zeros
//                    elsewhere (masked-off lanes are not read: no overrun);
//   everything else  zero the segment, then one scalar store per set bit
//                    (count-trailing-zeros walk), widening half / bf16 exactly.
// Then each row of x is dotted with the segment, two vector accumulators per
// row kept in scratch (loaded and stored once per segment).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
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

// dense[32 w + b] = the next value for every set bit b of bits[w], 0 elsewhere.
template <typename T>
inline const T* decode_segment(const T* v, const int32_t* bits, int64_t n_words, float* dense) {
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

#if defined(CPU_CAPABILITY_AVX512)
inline const float* decode_segment(const float* v, const int32_t* bits, int64_t n_words, float* dense) {
  for (int64_t w = 0; w < n_words; ++w) {
    const uint32_t u = static_cast<uint32_t>(bits[w]);
    const uint32_t lo = u & 0xFFFFu;
    const uint32_t hi = u >> 16;
    _mm512_storeu_ps(dense + 32 * w, _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(lo), v));
    v += popcount32(lo);
    _mm512_storeu_ps(dense + 32 * w + 16, _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(hi), v));
    v += popcount32(hi);
  }
  return v;
}

// Few rows of x (M <= kRegisterRows): no dense segment at all. Each word
// expands straight into two registers, which meet every row of x there; the
// 2 * R accumulators stay in registers for the whole weight row.
constexpr int64_t kRegisterRows = 4;

template <int R>
inline int64_t row_dot_registers(
    const float* values, const int32_t* bits, int64_t words, const float* x, int64_t ldx, float* out) {
  __m512 acc0[R];
  __m512 acc1[R];
  for (int i = 0; i < R; ++i) {
    acc0[i] = _mm512_setzero_ps();
    acc1[i] = _mm512_setzero_ps();
  }
  const float* v = values;
  for (int64_t w = 0; w < words; ++w) {
    const uint32_t u = static_cast<uint32_t>(bits[w]);
    if (u == 0) {
      continue;
    }
    const uint32_t lo = u & 0xFFFFu;
    const uint32_t hi = u >> 16;
    const __m512 w0 = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(lo), v);
    v += popcount32(lo);
    const __m512 w1 = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(hi), v);
    v += popcount32(hi);
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
  return v - values;
}
#endif

// scratch[i] accumulators += dense . x_i over `cols` (a multiple of 32) columns.
inline void dot_segment(const float* dense, int64_t cols, const float* x, int64_t m, int64_t ldx, float* scratch) {
  static_assert(2 * kLanes <= kBitmapScratchPerRow, "scratch holds two vectors per row");
  for (int64_t i = 0; i < m; ++i) {
    float* acc_i = scratch + i * kBitmapScratchPerRow;
    FloatVec acc0 = FloatVec::loadu(acc_i);
    FloatVec acc1 = FloatVec::loadu(acc_i + kLanes);
    const float* xi = x + i * ldx;
    for (int64_t j = 0; j < cols; j += 2 * kLanes) {
      acc0 = at::vec::fmadd(FloatVec::loadu(dense + j), FloatVec::loadu(xi + j), acc0);
      acc1 = at::vec::fmadd(FloatVec::loadu(dense + j + kLanes), FloatVec::loadu(xi + j + kLanes), acc1);
    }
    acc0.store(acc_i);
    acc1.store(acc_i + kLanes);
  }
}

template <typename T>
int64_t row_dot(
    const void* values,
    const int32_t* bits,
    int64_t words,
    const float* x,
    int64_t m,
    int64_t ldx,
    float* scratch,
    float* out) {
  static_assert(32 % (2 * kLanes) == 0, "a word's 32 columns are whole vector pairs");
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const float* vf = static_cast<const float*>(values);
    switch (m) {
      case 1: return row_dot_registers<1>(vf, bits, words, x, ldx, out);
      case 2: return row_dot_registers<2>(vf, bits, words, x, ldx, out);
      case 3: return row_dot_registers<3>(vf, bits, words, x, ldx, out);
      case 4: return row_dot_registers<4>(vf, bits, words, x, ldx, out);
      default: break;
    }
  }
#endif
  alignas(64) float dense[kBitmapSegWords * 32];
  std::fill(scratch, scratch + m * kBitmapScratchPerRow, 0.0f);
  const T* start = static_cast<const T*>(values);
  const T* v = start;
  for (int64_t w0 = 0; w0 < words; w0 += kBitmapSegWords) {
    const int64_t nw = std::min(kBitmapSegWords, words - w0);
    v = decode_segment(v, bits + w0, nw, dense);
    dot_segment(dense, nw * 32, x + w0 * 32, m, ldx, scratch);
  }
  for (int64_t i = 0; i < m; ++i) {
    const float* acc_i = scratch + i * kBitmapScratchPerRow;
    float s = 0.0f;
    for (int64_t l = 0; l < 2 * kLanes; ++l) {
      s += acc_i[l];
    }
    out[i] = s;
  }
  return v - start;
}

}  // namespace bitmap
}  // namespace

BitmapTiles MULTIFLOW_ISA_FN(bitmap_tiles)() {
  return BitmapTiles{&bitmap::row_dot<float>, &bitmap::row_dot<c10::Half>, &bitmap::row_dot<c10::BFloat16>};
}

}  // namespace multiflow::cpu
