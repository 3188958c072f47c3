// Loads shared by the per-ISA inner loops (<family>_tile_impl.h), for one ISA.
// Included only through those headers, by the isa_*.cpp files after they set
// CPU_CAPABILITY. Unlike the tile headers it is included once per translation
// unit (#pragma once: every family's loops in that unit use the same copy),
// and each isa_*.cpp is its own unit, so every ISA still gets its own.
//
// The names live in multiflow::cpu's anonymous namespace (internal linkage:
// nothing here becomes a symbol that another ISA's object could define too),
// which the families' own namespaces below multiflow::cpu all see.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "vec_load_impl.h is per-ISA: include it only from an isa_*.cpp (see isa.h)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace multiflow::cpu {
namespace {  // internal linkage: every ISA's copy stays its own

using FloatVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = FloatVec::size();

// FloatVec::size() consecutive elements, converted to float32 lanes
// (fp16 / bf16 widen exactly).
inline FloatVec load_as_float(const float* p) {
  return FloatVec::loadu(p);
}
inline FloatVec load_as_float(const c10::Half* p) {
  FloatVec v;
  at::vec::load_fp32_from_fp16(p, v);
  return v;
}
inline FloatVec load_as_float(const c10::BFloat16* p) {
  FloatVec v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
}

// The format conversions copy elements by their bits (uint32_t: float32, uint16_t:
// float16 / bfloat16): kLanes of them as 32-bit lanes, the 2-byte ones zero-extended
// and narrowed back exactly.
#if defined(CPU_CAPABILITY_AVX512)
using Lanes = __m512i;  // 16 elements

inline Lanes load_lanes(const uint32_t* p) {
  return _mm512_loadu_si512(p);
}
inline Lanes load_lanes(const uint16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store_lanes(uint32_t* p, Lanes v) {
  _mm512_storeu_si512(p, v);
}
inline void store_lanes(uint16_t* p, Lanes v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(v));
}
// Masked to the lanes of k: the others are never read (0 in the result) or written.
inline Lanes load_lanes(const uint32_t* p, __mmask16 k) {
  return _mm512_maskz_loadu_epi32(k, p);
}
inline Lanes load_lanes(const uint16_t* p, __mmask16 k) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
}
inline void store_lanes(uint32_t* p, __mmask16 k, Lanes v) {
  _mm512_mask_storeu_epi32(p, k, v);
}
inline void store_lanes(uint16_t* p, __mmask16 k, Lanes v) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(v));
}
#elif defined(CPU_CAPABILITY_AVX2)
// All ones in lane l where bit l of the byte k is set, zeros elsewhere (AVX2 has no mask
// registers: the per-lane select of a mask byte).
inline __m256i byte_lane_mask(uint32_t k) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(k)), lane_bit), lane_bit);
}

using Lanes = __m256i;  // 8 elements

inline Lanes load_lanes(const uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline Lanes load_lanes(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store_lanes(uint32_t* p, Lanes v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}
inline void store_lanes(uint16_t* p, Lanes v) {
  // packus saturates signed 32-bit lanes to 0..65535: exact for zero-extended ones.
  const __m128i narrow = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow);
}
#endif

}  // namespace
}  // namespace multiflow::cpu
