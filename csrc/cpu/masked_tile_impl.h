// The per-ISA kernels of masked_linear on CPU (the GEMM micro-kernel, the few-row
// forward, the masked row copy), for one ISA. Included only by
// the isa_*.cpp files, after they set CPU_CAPABILITY (no include guard on
// purpose: once per ISA translation unit). See isa.h.
//
// Register blocking: a panel of kRows rows x 2 vectors of columns stays in
// registers (12 accumulators: 12 of AVX2's 16 ymm registers, with 2 for B and
// 1 for the broadcast of A); per step of p, 2 loads of B feed 2 * kRows FMAs.
// The B panel (depth x 2 vectors) is reused by every row panel while it sits
// in L1. Each c[i, j] is a chain of FMAs over p ascending, so the result is
// independent of the thread count and of which rows share a panel.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "cpu/isa.h"
#include "cpu/masked_tile.h"
#include "cpu/vec_load_impl.h"

namespace multiflow::cpu {
namespace {
namespace masked {

constexpr int kRows = 6;

template <int R>
inline void panel(
    const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth) {
  FloatVec acc0[R];
  FloatVec acc1[R];
  for (int i = 0; i < R; ++i) {
    acc0[i] = FloatVec::loadu(c + i * ldc);
    acc1[i] = FloatVec::loadu(c + i * ldc + kLanes);
  }
  for (int64_t p = 0; p < depth; ++p) {
    const FloatVec b0 = FloatVec::loadu(b + p * ldb);
    const FloatVec b1 = FloatVec::loadu(b + p * ldb + kLanes);
    for (int i = 0; i < R; ++i) {
      const FloatVec ai(a[i * a_rs + p * a_cs]);
      acc0[i] = at::vec::fmadd(ai, b0, acc0[i]);
      acc1[i] = at::vec::fmadd(ai, b1, acc1[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    acc0[i].store(c + i * ldc);
    acc1[i].store(c + i * ldc + kLanes);
  }
}

void gemm_tile(
    const float* a,
    int64_t a_rs,
    int64_t a_cs,
    const float* b,
    int64_t ldb,
    float* c,
    int64_t ldc,
    int64_t rows,
    int64_t cols,
    int64_t depth) {
  static_assert(kMaskedColPad % (2 * kLanes) == 0, "column padding must be whole panels");
  for (int64_t j = 0; j < cols; j += 2 * kLanes) {
    int64_t i = 0;
    for (; i + kRows <= rows; i += kRows) {
      panel<kRows>(a + i * a_rs, a_rs, a_cs, b + j, ldb, c + i * ldc + j, ldc, depth);
    }
    const float* ai = a + i * a_rs;
    float* ci = c + i * ldc + j;
    switch (rows - i) {
      case 5: panel<5>(ai, a_rs, a_cs, b + j, ldb, ci, ldc, depth); break;
      case 4: panel<4>(ai, a_rs, a_cs, b + j, ldb, ci, ldc, depth); break;
      case 3: panel<3>(ai, a_rs, a_cs, b + j, ldb, ci, ldc, depth); break;
      case 2: panel<2>(ai, a_rs, a_cs, b + j, ldb, ci, ldc, depth); break;
      case 1: panel<1>(ai, a_rs, a_cs, b + j, ldb, ci, ldc, depth); break;
      default: break;
    }
  }
}

// --- Few rows of x (MaskedGemvFn) ----------------------------------------------

// bit c of a word: the weight at column c is kept.
inline bool kept(const int32_t* bits, int64_t c) {
  return (static_cast<uint32_t>(bits[c >> 5]) >> (c & 31)) & 1u;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// v where the lane's bit of lane_bits (the kLanes bits of its columns) is set, else +0.0.
inline FloatVec keep_lanes(const FloatVec& v, uint32_t lane_bits) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(lane_bits), v);
#else
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i keep =
      _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(lane_bits)), lane_bit), lane_bit);
  return _mm256_and_ps(v, _mm256_castsi256_ps(keep));
#endif
}

// Whole words: per vector of kLanes columns, the weights widened, the pruned ones zeroed,
// then one FMA per row of x (two accumulators per row, alternating vectors); the row's
// last partial word in scalar code. Each output: its lanes added in order, then the tail.
template <typename T, int M>
void gemv_rows(const T* w, const int32_t* bits, int64_t k, const float* x, float* out) {
  constexpr int kVecs = static_cast<int>(32 / kLanes);  // vectors per word
  static_assert(kVecs % 2 == 0, "two accumulators per row take alternate vectors");
  FloatVec acc[M][2];
  for (int i = 0; i < M; ++i) {
    acc[i][0] = acc[i][1] = FloatVec(0.0f);
  }
  const int64_t full = k / 32;
  for (int64_t wd = 0; wd < full; ++wd) {
    const uint32_t u = static_cast<uint32_t>(bits[wd]);
    for (int h = 0; h < kVecs; ++h) {
      const int64_t c = 32 * wd + h * kLanes;
      const FloatVec wv = keep_lanes(load_as_float(w + c), (u >> (h * kLanes)) & ((1u << kLanes) - 1u));
      for (int i = 0; i < M; ++i) {
        acc[i][h & 1] = at::vec::fmadd(wv, FloatVec::loadu(x + i * k + c), acc[i][h & 1]);
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    alignas(64) float lanes[kLanes];
    (acc[i][0] + acc[i][1]).store(lanes);
    float s = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) {
      s += lanes[l];
    }
    for (int64_t c = 32 * full; c < k; ++c) {
      s += (kept(bits, c) ? static_cast<float>(w[c]) : 0.0f) * x[i * k + c];
    }
    out[i] = s;
  }
}
#else
template <typename T, int M>
void gemv_rows(const T* w, const int32_t* bits, int64_t k, const float* x, float* out) {
  float s[M] = {};
  for (int64_t c = 0; c < k; ++c) {
    const float wc = kept(bits, c) ? static_cast<float>(w[c]) : 0.0f;
    for (int i = 0; i < M; ++i) {
      s[i] += wc * x[i * k + c];
    }
  }
  for (int i = 0; i < M; ++i) {
    out[i] = s[i];
  }
}
#endif

// MaskedCopyFn: whole vectors while they fit (their kLanes bits lie in one word, as
// c0 % 32 == 0 and kLanes divides 32), the rest scalar.
template <typename T>
void masked_copy(const void* src_v, const int32_t* bits, int64_t c0, int64_t n, float* dst) {
  static_assert(32 % kLanes == 0, "a vector's lane bits lie in one mask word (and kLanes < 32)");
  const T* src = static_cast<const T*>(src_v);
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  for (; j + kLanes <= n; j += kLanes) {
    const int64_t c = c0 + j;
    const uint32_t lane_bits = (static_cast<uint32_t>(bits[c >> 5]) >> (c & 31)) & ((1u << kLanes) - 1u);
    keep_lanes(load_as_float(src + j), lane_bits).store(dst + j);
  }
#endif
  for (; j < n; ++j) {
    dst[j] = kept(bits, c0 + j) ? static_cast<float>(src[j]) : 0.0f;
  }
}

template <typename T>
void gemv(const void* w_v, const int32_t* bits, int64_t k, const float* x, int64_t m, float* out) {
  const T* w = static_cast<const T*>(w_v);
  switch (m) {
    case 1: gemv_rows<T, 1>(w, bits, k, x, out); break;
    case 2: gemv_rows<T, 2>(w, bits, k, x, out); break;
    case 3: gemv_rows<T, 3>(w, bits, k, x, out); break;
    case 4: gemv_rows<T, 4>(w, bits, k, x, out); break;
    case 5: gemv_rows<T, 5>(w, bits, k, x, out); break;
    case 6: gemv_rows<T, 6>(w, bits, k, x, out); break;
    case 7: gemv_rows<T, 7>(w, bits, k, x, out); break;
    case 8: gemv_rows<T, 8>(w, bits, k, x, out); break;
    default: break;
  }
}
static_assert(kMaskedGemvRows == 8, "gemv's switch covers 1..kMaskedGemvRows rows");

}  // namespace masked
}  // namespace

MaskedTiles MULTIFLOW_ISA_FN(masked_tiles)() {
  return MaskedTiles{&masked::gemm_tile,
                     &masked::masked_copy<float>,
                     &masked::masked_copy<c10::Half>,
                     &masked::masked_copy<c10::BFloat16>,
                     &masked::gemv<float>,
                     &masked::gemv<c10::Half>,
                     &masked::gemv<c10::BFloat16>};
}

}  // namespace multiflow::cpu
