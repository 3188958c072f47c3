// The per-ISA kernels of masked_linear on CPU (the GEMM micro-kernel, the few-row
// forward, the masked row copy), for one ISA. Included only by
// the isa_*.cpp files, after they set CPU_CAPABILITY (no include guard on
// purpose: once per ISA translation unit). See isa.h.
//
// Register blocking: a panel of kRows rows x V vectors of columns stays in
// registers: AVX-512 V = 4 (24 accumulators of its 32 zmm registers, 4 for B, 1
// for the broadcast of A: per step of p, 4 loads of B and 6 broadcasts feed 24
// FMAs; 2.7x the throughput of V = 2 on Zen 5, ~0.43 TFLOP/s on 2 cores), a last
// 2-vector panel where the columns end; AVX2 and the baseline V = 2 (12 of
// AVX2's 16 ymm registers). The B panel (depth x V vectors) is reused by every
// row panel while it sits in L1. Each c[i, j] is a chain of FMAs over p ascending, so the result is
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

// R rows x V vectors of columns in registers.
template <int R, int V>
inline void panel(
    const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t depth) {
  FloatVec acc[R][V];
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < V; ++v) {
      acc[i][v] = FloatVec::loadu(c + i * ldc + v * kLanes);
    }
  }
  for (int64_t p = 0; p < depth; ++p) {
    FloatVec bv[V];
    for (int v = 0; v < V; ++v) {
      bv[v] = FloatVec::loadu(b + p * ldb + v * kLanes);
    }
    for (int i = 0; i < R; ++i) {
      const FloatVec ai(a[i * a_rs + p * a_cs]);
      for (int v = 0; v < V; ++v) {
        acc[i][v] = at::vec::fmadd(ai, bv[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int v = 0; v < V; ++v) {
      acc[i][v].store(c + i * ldc + v * kLanes);
    }
  }
}

// All rows of a V-vector column panel: kRows at a time, then the rest.
template <int V>
inline void column_panel(const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb, float* c,
                         int64_t ldc, int64_t rows, int64_t depth) {
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows) {
    panel<kRows, V>(a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, depth);
  }
  const float* ai = a + i * a_rs;
  float* ci = c + i * ldc;
  switch (rows - i) {
    case 5: panel<5, V>(ai, a_rs, a_cs, b, ldb, ci, ldc, depth); break;
    case 4: panel<4, V>(ai, a_rs, a_cs, b, ldb, ci, ldc, depth); break;
    case 3: panel<3, V>(ai, a_rs, a_cs, b, ldb, ci, ldc, depth); break;
    case 2: panel<2, V>(ai, a_rs, a_cs, b, ldb, ci, ldc, depth); break;
    case 1: panel<1, V>(ai, a_rs, a_cs, b, ldb, ci, ldc, depth); break;
    default: break;
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
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // 6 rows x 4 vectors: 24 of the 32 registers accumulate, 4 FMAs per load of A.
  for (; j + 4 * kLanes <= cols; j += 4 * kLanes) {
    column_panel<4>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, rows, depth);
  }
#endif
  for (; j < cols; j += 2 * kLanes) {
    column_panel<2>(a, a_rs, a_cs, b + j, ldb, c + j, ldc, rows, depth);
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
  return _mm256_and_ps(v, _mm256_castsi256_ps(byte_lane_mask(lane_bits)));
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
                     {&masked::masked_copy<float>, &masked::masked_copy<c10::Half>, &masked::masked_copy<c10::BFloat16>},
                     {&masked::gemv<float>, &masked::gemv<c10::Half>, &masked::gemv<c10::BFloat16>}};
}

}  // namespace multiflow::cpu
