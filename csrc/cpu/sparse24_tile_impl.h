// The row kernel of sparse24_linear on CPU, for one ISA. Included only by the
// isa_*.cpp files, after they set CPU_CAPABILITY (no include guard on purpose:
// once per ISA translation unit). See isa.h and sparse24_tile.h.
//
// The unit is one metadata word: 16 columns, 8 values. Decoding a word into 16
// dense float32 lanes (zeros at the unnamed positions):
//   AVX-512  the 8 values (widened) in one register, _mm512_maskz_expand_ps to
//            the 16-bit lane mask of the word's positions (a 256-entry table per
//            byte): positions are increasing, so expand puts each value in place;
//   AVX2     per byte of the word (two chunks, 8 lanes), _mm256_permutevar8x32_ps
//            from a 256-entry index table, lanes that name no value zeroed by
//            the index's sign bit;
//   default  zero 16 floats, then two scalar stores per chunk.
// Each decoded word meets every row of x in registers: a block of R weight rows
// x MR rows of x keeps R * MR accumulators (of 16 lanes) for the whole row, so
// the values and metadata stream through once per block of x rows, x is loaded
// once per word for R weight rows, and nothing is written until the row ends.
// The memory-bound case (a few rows of x) is one block of x rows.
//
// A row's last word, when in % 16 != 0, has fewer than 8 values: they are copied
// into a zero-padded buffer of 8 (its padding chunks named (0, 1)), so no load
// runs past the row; the zero padding of x makes those lanes add 0.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "cpu/isa.h"
#include "cpu/sparse24_tile.h"
#include "cpu/vec_load_impl.h"

namespace multiflow::cpu {
namespace {
namespace sparse24 {

constexpr int64_t kWordCols = 16;
constexpr int64_t kWordValues = 8;
constexpr int kVecsPerWord = static_cast<int>(kWordCols / kLanes);  // 1 (AVX-512) or 2
static_assert(kWordCols % kLanes == 0, "a word's 16 columns are whole vectors");

// Weight rows x rows of x per register block: R * MR * kVecsPerWord accumulators
// (8 of AVX-512's 32 registers, 8 of AVX2's 16).
constexpr int kBlockW = 2;
constexpr int kBlockX = 4 / kVecsPerWord;
static_assert(kBlockW == 2, "rows_dot picks blocks of 2 or 1 weight rows");

// Software prefetch of the values this many words ahead (2 KiB of float32): the
// hardware prefetchers alone leave a single-token product well short of the
// memory bandwidth when several rows stream at once.
constexpr int64_t kPrefetchWords = 64;

inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// The positions of a chunk's two values in its 4-bit code.
constexpr int first_position(uint32_t code) {
  return static_cast<int>(code & 3u);
}
constexpr int second_position(uint32_t code) {
  return static_cast<int>((code >> 2) & 3u);
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The word's 8 values widened exactly to float32 (fp16 by F16C, bf16 by a shift).
inline __m256 load8(const float* v) {
  return _mm256_loadu_ps(v);
}
inline __m256 load8(const c10::Half* v) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
}
inline __m256 load8(const c10::BFloat16* v) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// For a metadata byte (chunks 0 and 1 of a word's half): the lanes its values
// go to, bit 4c + p for position p of chunk c.
struct LaneMasks {
  uint8_t lanes[256];
};

constexpr LaneMasks make_lane_masks() {
  LaneMasks t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t lanes = 0;
    for (uint32_t c = 0; c < 2; ++c) {
      const uint32_t code = (b >> (4 * c)) & 15u;
      lanes |= ((1u << first_position(code)) | (1u << second_position(code))) << (4 * c);
    }
    t.lanes[b] = static_cast<uint8_t>(lanes);
  }
  return t;
}

constexpr LaneMasks kLaneMasks = make_lane_masks();

template <typename T>
inline void decode_word(const T* v, uint32_t word, FloatVec* out) {
  const uint32_t lo = kLaneMasks.lanes[word & 0xFFu], hi = kLaneMasks.lanes[(word >> 8) & 0xFFu];
  const auto lanes = static_cast<__mmask16>(lo | (hi << 8));
  // At most 2 lanes per chunk, so expand takes at most the 8 defined elements.
  out[0] = _mm512_maskz_expand_ps(lanes, _mm512_castps256_ps512(load8(v)));
}
#elif defined(CPU_CAPABILITY_AVX2)
// For a metadata byte: lane 4c + l takes value 2c (l the first position of
// chunk c) or 2c + 1 (the second); other lanes have the sign bit set (zero).
struct PermuteTable {
  int32_t index[256][8];
};

constexpr PermuteTable make_permute_table() {
  PermuteTable t{};
  for (uint32_t b = 0; b < 256; ++b) {
    for (uint32_t c = 0; c < 2; ++c) {
      const uint32_t code = (b >> (4 * c)) & 15u;
      for (int l = 0; l < 4; ++l) {
        const int32_t first = static_cast<int32_t>(2 * c), second = first + 1;
        t.index[b][4 * c + l] = l == first_position(code) ? first : l == second_position(code) ? second : INT32_MIN;
      }
    }
  }
  return t;
}

alignas(32) constexpr PermuteTable kPermute = make_permute_table();

inline __m256 expand_byte(__m256 values, uint32_t byte, int first_value) {
  const __m256i index = _mm256_add_epi32(
      _mm256_load_si256(reinterpret_cast<const __m256i*>(kPermute.index[byte])), _mm256_set1_epi32(first_value));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(values, index), _mm256_setzero_ps(), _mm256_castsi256_ps(index));
}

template <typename T>
inline void decode_word(const T* v, uint32_t word, FloatVec* out) {
  const __m256 values = load8(v);
  out[0] = expand_byte(values, word & 0xFFu, 0);
  out[1] = expand_byte(values, (word >> 8) & 0xFFu, 4);
}
#else
template <typename T>
inline void decode_word(const T* v, uint32_t word, FloatVec* out) {
  alignas(64) float dense[kWordCols] = {};
  for (int c = 0; c < 4; ++c) {
    const uint32_t code = (word >> (4 * c)) & 15u;
    dense[4 * c + first_position(code)] = static_cast<float>(v[2 * c]);
    dense[4 * c + second_position(code)] = static_cast<float>(v[2 * c + 1]);
  }
  for (int k = 0; k < kVecsPerWord; ++k) {
    out[k] = FloatVec::loadu(dense + k * kLanes);
  }
}
#endif

// The R weight rows of a register block: their values and metadata, and their
// last word when it is partial (tail_values: R * 8 values, zero-padded).
template <typename T>
struct RowBlock {
  const T* values[kBlockW];
  const uint16_t* metadata[kBlockW];
  int64_t full_words;
  bool has_tail;
  T tail_values[kBlockW][kWordValues];
  uint16_t tail_word[kBlockW];
};

// acc[j][i] += W_j . x_i over one word: R decodes, then MR * kVecsPerWord loads of x.
template <typename T, int R, int MR>
inline void accumulate_word(
    const T* const* v, const uint32_t* words, const float* x, int64_t ldx, FloatVec (*acc)[MR][kVecsPerWord]) {
  FloatVec w[R][kVecsPerWord];
  for (int j = 0; j < R; ++j) {
    decode_word(v[j], words[j], w[j]);
  }
  for (int i = 0; i < MR; ++i) {
    for (int k = 0; k < kVecsPerWord; ++k) {
      const FloatVec xv = FloatVec::loadu(x + i * ldx + k * kLanes);
      for (int j = 0; j < R; ++j) {
        acc[j][i][k] = at::vec::fmadd(w[j][k], xv, acc[j][i][k]);
      }
    }
  }
}

// out[j * ldo + i] = W_j . x_i for j < R, i < MR.
template <typename T, int R, int MR>
void dot_block(const RowBlock<T>& rows, const float* x, int64_t ldx, float* out, int64_t ldo) {
  FloatVec acc[R][MR][kVecsPerWord];
  for (int j = 0; j < R; ++j) {
    for (int i = 0; i < MR; ++i) {
      for (int k = 0; k < kVecsPerWord; ++k) {
        acc[j][i][k] = FloatVec(0.0f);
      }
    }
  }
  const T* v[R];
  uint32_t words[R];
  for (int64_t w = 0; w < rows.full_words; ++w) {
    for (int j = 0; j < R; ++j) {
      v[j] = rows.values[j] + w * kWordValues;
      words[j] = rows.metadata[j][w];
      prefetch(v[j] + kPrefetchWords * kWordValues);
    }
    accumulate_word<T, R, MR>(v, words, x + w * kWordCols, ldx, acc);
  }
  if (rows.has_tail) {
    for (int j = 0; j < R; ++j) {
      v[j] = rows.tail_values[j];
      words[j] = rows.tail_word[j];
    }
    accumulate_word<T, R, MR>(v, words, x + rows.full_words * kWordCols, ldx, acc);
  }
  for (int j = 0; j < R; ++j) {
    for (int i = 0; i < MR; ++i) {
      FloatVec s = acc[j][i][0];
      for (int k = 1; k < kVecsPerWord; ++k) {
        s = s + acc[j][i][k];
      }
      alignas(64) float lanes[kLanes];
      s.store(lanes);
      float total = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) {
        total += lanes[l];
      }
      out[j * ldo + i] = total;
    }
  }
}

template <typename T, int R>
void dot_block_any_x(int64_t mr, const RowBlock<T>& rows, const float* x, int64_t ldx, float* out, int64_t ldo) {
  static_assert(kBlockX == 2 || kBlockX == 4, "x blocks of 2 or 4 rows");
  switch (mr) {
    case 1: dot_block<T, R, 1>(rows, x, ldx, out, ldo); break;
    case 2: dot_block<T, R, 2>(rows, x, ldx, out, ldo); break;
    default:
      if constexpr (kBlockX == 4) {
        if (mr == 3) {
          dot_block<T, R, 3>(rows, x, ldx, out, ldo);
        } else {
          dot_block<T, R, 4>(rows, x, ldx, out, ldo);
        }
      }
      break;
  }
}

template <typename T>
void rows_dot(
    const void* values,
    const int16_t* metadata,
    int64_t cols,
    int64_t n_rows,
    const float* x,
    int64_t m,
    int64_t ldx,
    float* out) {
  const T* vals = static_cast<const T*>(values);
  const uint16_t* meta = reinterpret_cast<const uint16_t*>(metadata);
  const int64_t words = (cols + kWordCols - 1) / kWordCols;
  const int64_t half = cols / 2;
  // The call's weight rows in register blocks of kBlockW, their tails ready.
  constexpr int64_t kBlocks = (kSparse24RowsPerCall + kBlockW - 1) / kBlockW;
  RowBlock<T> blocks[kBlocks];
  const int64_t full_words = cols / kWordCols;
  // The tail word's values and chunks; its padding chunks become (0, 1) = 0b0100.
  const int64_t tail_values = half - full_words * kWordValues;
  const uint32_t tail_chunks_mask = (1u << (4 * (tail_values / 2))) - 1u;
  const int64_t n_blocks = (n_rows + kBlockW - 1) / kBlockW;
  for (int64_t b = 0; b < n_blocks; ++b) {
    RowBlock<T>& rows = blocks[b];
    rows.full_words = full_words;
    rows.has_tail = full_words < words;
    std::memset(rows.tail_values, 0, sizeof(rows.tail_values));
    for (int64_t j = 0; j < std::min<int64_t>(kBlockW, n_rows - b * kBlockW); ++j) {
      const int64_t r = b * kBlockW + j;
      rows.values[j] = vals + r * half;
      rows.metadata[j] = meta + r * words;
      if (rows.has_tail) {
        std::memcpy(rows.tail_values[j], rows.values[j] + full_words * kWordValues, tail_values * sizeof(T));
        const uint32_t word = rows.metadata[j][full_words];
        rows.tail_word[j] = static_cast<uint16_t>((word & tail_chunks_mask) | (0x4444u & ~tail_chunks_mask));
      }
    }
  }
  // x blocks outside, weight blocks inside: a block of x rows stays in cache
  // while the call's weight rows (from memory once, then from L2) pass it.
  for (int64_t i0 = 0; i0 < m; i0 += kBlockX) {
    const int64_t mr = std::min<int64_t>(kBlockX, m - i0);
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t j0 = b * kBlockW;
      float* o = out + j0 * m + i0;
      if (n_rows - j0 >= 2) {
        dot_block_any_x<T, 2>(mr, blocks[b], x + i0 * ldx, ldx, o, m);
      } else {
        dot_block_any_x<T, 1>(mr, blocks[b], x + i0 * ldx, ldx, o, m);
      }
    }
  }
}

}  // namespace sparse24
}  // namespace

Sparse24Tiles MULTIFLOW_ISA_FN(sparse24_tiles)() {
  return Sparse24Tiles{
      &sparse24::rows_dot<float>, &sparse24::rows_dot<c10::Half>, &sparse24::rows_dot<c10::BFloat16>};
}

}  // namespace multiflow::cpu
