// The row kernels of sparse24_linear, sparse24_pack and sparse24_unpack on
// CPU, for one ISA. Included only by the isa_*.cpp files, after they set
// CPU_CAPABILITY (no include guard on purpose: once per ISA translation unit).
// See isa.h and sparse24_tile.h. The conversions (pack / unpack) are at the
// end, after the linear kernel whose steps and step_index they share.
//
// Only the named positions are multiplied, as the sparse tensor cores do: a
// step is one vector of values (kLanes of them, widened to float32: 2 metadata
// words on AVX-512, 1 on AVX2 and the default build), and the x element each
// value meets is gathered from the step's window of 2 * kLanes columns of x.
// Value k of a step sits in chunk k / 2 and its position is bits 2k .. 2k + 1
// of the step's metadata (its words as one little-endian number), so its column
// in the window is 4 * (k / 2) + ((bits >> 2k) & 3): a variable shift of the
// broadcast metadata gives every lane's index at once.
//   AVX-512  _mm512_permutex2var_ps: 16 lanes from the 32 floats of the window;
//   AVX2     _mm256_permutevar8x32_ps in each 8-float half of the window (lanes
//            0-3 index the low half, 4-7 the high one), then a blend;
//   default  scalar loads of the 8 columns.
// Each step meets every row of x in registers: a block of R weight rows x MR
// rows of x keeps R * MR vector accumulators for the whole row, so values and
// metadata stream through once per block of x rows, and the window of x is
// loaded once per step for the R weight rows.
//
// A row's last step, when in % (2 * kLanes) != 0, has fewer values: they are
// copied into a zero-padded buffer of kLanes, so no load runs past the row; x
// is zero-padded to whole windows (kSparse24XPadCols), so those lanes add 0.
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
#include "cpu/sparse24_chunk.h"
#include "cpu/sparse24_tile.h"
#include "cpu/vec_load_impl.h"

namespace multiflow::cpu {
namespace {
namespace sparse24 {

constexpr int64_t kWordCols = 16;
constexpr int64_t kStepValues = kLanes;  // 16 (AVX-512) or 8
constexpr int64_t kStepCols = 2 * kLanes;
constexpr int64_t kStepWords = kStepCols / kWordCols;
static_assert(kStepCols % kWordCols == 0 && kStepCols <= kSparse24XPadCols, "a step is whole metadata words");

// Weight rows x rows of x per register block: R * MR accumulators (8 of
// AVX-512's 32 registers, 4 of AVX2's 16, which also hold the window of x and
// the R value and index vectors).
constexpr int kBlockW = 2;
constexpr int kBlockX = kLanes == 16 ? 4 : 2;
static_assert(kBlockW == 2, "rows_dot picks blocks of 2 or 1 weight rows");

// Software prefetch of the values this many steps ahead (2 KiB of float32): the
// hardware prefetchers alone leave a single-token product well short of the
// memory bandwidth when several rows stream at once.
constexpr int64_t kPrefetchValues = 512;

inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// The window of x: 32 columns in two registers; an index: 16 lanes of 0..31.
struct Window {
  __m512 lo, hi;
};
using Index = __m512i;

inline Window load_window(const float* x) {
  return Window{_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)};
}

inline Index step_index(uint32_t bits) {
  const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i chunk = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i position = _mm512_and_si512(
      _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(bits)), shift), _mm512_set1_epi32(3));
  return _mm512_add_epi32(chunk, position);
}

inline FloatVec gather(const Window& x, const Index& index) {
  return _mm512_permutex2var_ps(x.lo, index, x.hi);
}
#elif defined(CPU_CAPABILITY_AVX2)
// The window of x: 16 columns in two registers; an index: lanes 0-3 into the
// low half, 4-7 into the high half (0..7 each).
struct Window {
  __m256 lo, hi;
};
using Index = __m256i;

inline Window load_window(const float* x) {
  return Window{_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)};
}

inline Index step_index(uint32_t bits) {
  const __m256i shift = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i chunk = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i position = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(bits)), shift), _mm256_set1_epi32(3));
  return _mm256_add_epi32(chunk, position);
}

inline FloatVec gather(const Window& x, const Index& index) {
  return _mm256_blend_ps(_mm256_permutevar8x32_ps(x.lo, index), _mm256_permutevar8x32_ps(x.hi, index), 0xF0);
}
#else
// The window of x in place; an index: the columns of the step's values.
using Window = const float*;
struct Index {
  int32_t col[kStepValues];
};

inline Window load_window(const float* x) {
  return x;
}

inline Index step_index(uint32_t bits) {
  Index index;
  for (int64_t k = 0; k < kStepValues; ++k) {
    index.col[k] = static_cast<int32_t>(4 * (k / 2) + ((bits >> (2 * k)) & 3u));
  }
  return index;
}

inline FloatVec gather(Window x, const Index& index) {
  alignas(64) float lanes[kStepValues];
  for (int64_t k = 0; k < kStepValues; ++k) {
    lanes[k] = x[index.col[k]];
  }
  return FloatVec::loadu(lanes);
}
#endif

// The step's metadata words as one number (a row's words are contiguous).
inline uint32_t step_bits(const uint16_t* words) {
  if constexpr (kStepWords == 2) {
    return static_cast<uint32_t>(words[0]) | (static_cast<uint32_t>(words[1]) << 16);
  } else {
    return words[0];
  }
}

// The R weight rows of a register block: their values and metadata, and their
// last step when it is partial (zero-padded values, the words there are).
template <typename T>
struct RowBlock {
  const T* values[kBlockW];
  const uint16_t* metadata[kBlockW];
  int64_t full_steps;
  bool has_tail;
  T tail_values[kBlockW][kStepValues];
  uint32_t tail_bits[kBlockW];
};

// acc[j][i] += the step's products of weight row j with x row i.
template <typename T, int R, int MR>
inline void accumulate_step(const T* const* v, const uint32_t* bits, const float* x, int64_t ldx, FloatVec (*acc)[MR]) {
  FloatVec values[R];
  Index index[R];
  for (int j = 0; j < R; ++j) {
    values[j] = load_as_float(v[j]);
    index[j] = step_index(bits[j]);
  }
  for (int i = 0; i < MR; ++i) {
    const Window window = load_window(x + i * ldx);
    for (int j = 0; j < R; ++j) {
      acc[j][i] = at::vec::fmadd(values[j], gather(window, index[j]), acc[j][i]);
    }
  }
}

// out[j * ldo + i] = W_j . x_i for j < R, i < MR.
template <typename T, int R, int MR>
void dot_block(const RowBlock<T>& rows, const float* x, int64_t ldx, float* out, int64_t ldo) {
  FloatVec acc[R][MR];
  for (int j = 0; j < R; ++j) {
    for (int i = 0; i < MR; ++i) {
      acc[j][i] = FloatVec(0.0f);
    }
  }
  const T* v[R];
  uint32_t bits[R];
  for (int64_t s = 0; s < rows.full_steps; ++s) {
    for (int j = 0; j < R; ++j) {
      v[j] = rows.values[j] + s * kStepValues;
      bits[j] = step_bits(rows.metadata[j] + s * kStepWords);
      prefetch(v[j] + kPrefetchValues);
    }
    accumulate_step<T, R, MR>(v, bits, x + s * kStepCols, ldx, acc);
  }
  if (rows.has_tail) {
    for (int j = 0; j < R; ++j) {
      v[j] = rows.tail_values[j];
      bits[j] = rows.tail_bits[j];
    }
    accumulate_step<T, R, MR>(v, bits, x + rows.full_steps * kStepCols, ldx, acc);
  }
  for (int j = 0; j < R; ++j) {
    for (int i = 0; i < MR; ++i) {
      alignas(64) float lanes[kLanes];
      acc[j][i].store(lanes);
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
  const int64_t full_steps = cols / kStepCols;
  const int64_t tail_values = half - full_steps * kStepValues;
  const int64_t tail_words = words - full_steps * kStepWords;
  const int64_t n_blocks = (n_rows + kBlockW - 1) / kBlockW;
  for (int64_t b = 0; b < n_blocks; ++b) {
    RowBlock<T>& rows = blocks[b];
    rows.full_steps = full_steps;
    rows.has_tail = tail_values > 0;
    std::memset(rows.tail_values, 0, sizeof(rows.tail_values));
    for (int64_t j = 0; j < std::min<int64_t>(kBlockW, n_rows - b * kBlockW); ++j) {
      const int64_t r = b * kBlockW + j;
      rows.values[j] = vals + r * half;
      rows.metadata[j] = meta + r * words;
      if (rows.has_tail) {
        std::memcpy(rows.tail_values[j], rows.values[j] + full_steps * kStepValues, tail_values * sizeof(T));
        // The padding chunks name x's zero padding: whatever their bits, they add 0.
        uint32_t bits = 0;
        for (int64_t w = 0; w < tail_words; ++w) {
          bits |= static_cast<uint32_t>(rows.metadata[j][full_steps * kStepWords + w]) << (16 * w);
        }
        rows.tail_bits[j] = bits;
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

// ---- sparse24_pack / sparse24_unpack: one row, by the elements' bits.

// Chunk by chunk, as plainly as the format reads: the default ISA's whole row,
// and the remainder of a row (fewer than kStepCols columns) on the vector ISAs.
// Packs the words from word_begin on.
template <typename E>
bool pack_words_scalar(const E* w, const uint8_t* mask, int64_t cols, E* values, uint16_t* metadata,
                       int64_t word_begin) {
  const int64_t chunks = cols / 4;
  bool ok = true;
  for (int64_t word = word_begin; 4 * word < chunks; ++word) {
    uint32_t bits = 0;
    for (int64_t q = 4 * word; q < std::min(chunks, 4 * word + 4); ++q) {
      const uint32_t keep = keep_pattern(mask + 4 * q);
      const ChunkPick pick = kChunkPicks.pick[keep];
      ok &= pick.valid;
      const int p0 = first_position(pick.code), p1 = second_position(pick.code);
      // All ones where the position is kept, zero for a filler: no branch on the mask.
      const auto keep0 = static_cast<E>(0u - ((keep >> p0) & 1u));
      const auto keep1 = static_cast<E>(0u - ((keep >> p1) & 1u));
      values[2 * q] = static_cast<E>(w[4 * q + p0] & keep0);
      values[2 * q + 1] = static_cast<E>(w[4 * q + p1] & keep1);
      bits |= static_cast<uint32_t>(pick.code) << (4 * (q - 4 * word));
    }
    metadata[word] = static_cast<uint16_t>(bits);
  }
  return ok;
}

// Unpacks the words from word_begin on, word by word, each read once (a loop
// over chunks from a chunk_begin, taking q / 4 and q % 4 of a q the compiler
// cannot prove non-negative, was a fifth slower on the default ISA).
template <typename E>
void unpack_words_scalar(const E* v, const uint16_t* metadata, int64_t cols, E* out, int64_t word_begin) {
  const int64_t chunks = cols / 4;
  for (int64_t word = word_begin; 4 * word < chunks; ++word) {
    uint32_t codes = metadata[word];  // the chunk's code in bits 0-3
    for (int64_t q = 4 * word; q < std::min(chunks, 4 * word + 4); ++q, codes >>= 4) {
      E* o = out + 4 * q;
      o[0] = o[1] = o[2] = o[3] = E{0};
      o[first_position(codes)] = v[2 * q];
      o[second_position(codes)] = v[2 * q + 1];
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The vector ISAs convert a step of kStepCols columns (kStepValues values,
// kStepWords metadata words) at a time: the same steps as the linear kernel,
// whose step_index gives pack the weight column of every value.
//
// pack: the step's mask bytes compare with zero into a keep pattern (bit c:
// column c kept); byte b of it (2 chunks) looks up byte b of the step's
// metadata and whether both chunks keep at most 2 (kBytePicks, 256 entries);
// the values are a permute of the step's weights by step_index, zeroed where
// the column is a filler (its keep bit is clear).
// unpack: each output lane computes its chunk's code from the broadcast
// metadata: lane p of a chunk takes the chunk's second value if the second
// position is p, else its first if the first is p, else 0 (the order of the
// scalar writes, so equal positions and any of the 16 codes give its bits),
// as one permute of the step's values with a zeroing mask.
//
// Elements travel in 32-bit lanes, float32 bits as they are, 16-bit ones
// zero-extended on the load and narrowed back on the store: one lane width,
// so one index computation serves both element sizes. The exception is
// AVX-512's unpack of 16-bit elements, which computes its indices in 16-bit
// lanes and writes a step with one vpermw, no widening or narrowing (768 x 768
// float16 on one thread: 0.040 ms with them, 0.027 without).

struct BytePicks {
  uint8_t code[256];   // the two chunks' codes, the first in bits 0-3
  uint8_t valid[256];  // 1: both keep at most 2
};

constexpr BytePicks make_byte_picks() {
  BytePicks t{};
  for (uint32_t keep = 0; keep < 256; ++keep) {
    const ChunkPick lo = kChunkPicks.pick[keep & 15u], hi = kChunkPicks.pick[keep >> 4];
    t.code[keep] = static_cast<uint8_t>(lo.code | (hi.code << 4));
    t.valid[keep] = lo.valid && hi.valid ? 1 : 0;
  }
  return t;
}

constexpr BytePicks kBytePicks = make_byte_picks();

// The step's metadata (its words as one little-endian number) from its keep
// pattern; ok &= every chunk keeps at most 2.
inline uint32_t step_codes(uint32_t keep, bool& ok) {
  uint32_t bits = 0;
  uint32_t valid = 1;
  for (int64_t b = 0; b < kStepCols / 8; ++b) {
    const uint32_t byte = (keep >> (8 * b)) & 0xFFu;
    bits |= static_cast<uint32_t>(kBytePicks.code[byte]) << (8 * b);
    valid &= kBytePicks.valid[byte];
  }
  ok &= valid != 0;
  return bits;
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Lanes, load_lanes, store_lanes: 16 elements in 32-bit lanes (vec_load_impl.h).

// Bit c of the keep pattern: mask byte c != 0, for the step's 32 columns.
inline uint32_t step_keep(const uint8_t* mask) {
  const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask));
  return _mm256_test_epi8_mask(m, m);
}

// values[k] = weight column index[k] of the step (0..31) where kept, else 0.
template <typename E>
inline void pack_values(const E* w, uint32_t keep, const Index& index, E* values) {
  const __m512i kept_bit = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(keep)), index);
  const __mmask16 kept = _mm512_test_epi32_mask(kept_bit, _mm512_set1_epi32(1));
  store_lanes(values, _mm512_maskz_permutex2var_epi32(kept, load_lanes(w), index, load_lanes(w + 16)));
}

// 16 columns (4 chunks, codes in the 16 bits of `word`) from the 16 value
// lanes, of which the chunks' 8 start at lane `first`.
inline Lanes unpack_lanes(const Lanes& values, uint32_t word, int first) {
  const __m512i chunk_shift = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
  const __m512i position = _mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const __m512i chunk_value = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  const __m512i code = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), chunk_shift);
  const __mmask16 is_first = _mm512_cmpeq_epi32_mask(_mm512_and_si512(code, _mm512_set1_epi32(3)), position);
  const __mmask16 is_second =
      _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_srli_epi32(code, 2), _mm512_set1_epi32(3)), position);
  const __m512i base = _mm512_add_epi32(chunk_value, _mm512_set1_epi32(first));
  const __m512i index = _mm512_mask_add_epi32(base, is_second, base, _mm512_set1_epi32(1));
  return _mm512_maskz_permutexvar_epi32(static_cast<__mmask16>(is_first | is_second), index, values);
}

// The step: 2 words, 16 values, 32 columns.
inline void unpack_step(const uint32_t* v, uint32_t bits, uint32_t* out) {
  const Lanes values = load_lanes(v);
  store_lanes(out, unpack_lanes(values, bits & 0xFFFFu, 0));
  store_lanes(out + 16, unpack_lanes(values, bits >> 16, 8));
}

// 16-bit elements: the same lanes computed in 16-bit lanes (BW has the shifts,
// compares and vpermw), so one permute writes the step's 32 columns, with no
// widening or narrowing.
inline void unpack_step(const uint16_t* v, uint32_t bits, uint16_t* out) {
  const __m512i chunk_shift = _mm512_set_epi16(12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0,
                                               12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0);
  const __m512i position = _mm512_set1_epi64(0x0003000200010000ll);
  const __m512i chunk_value = _mm512_set_epi16(15, 15, 15, 15, 13, 13, 13, 13, 11, 11, 11, 11, 9, 9, 9, 9,
                                               7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1);
  const __m512i three = _mm512_set1_epi16(3);
  const __m512i words = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(bits & 0xFFFFu)),
                                           _mm256_set1_epi16(static_cast<int16_t>(bits >> 16)), 1);
  const __m512i code = _mm512_srlv_epi16(words, chunk_shift);
  const __mmask32 is_first = _mm512_cmpeq_epi16_mask(_mm512_and_si512(code, three), position);
  const __mmask32 is_second = _mm512_cmpeq_epi16_mask(_mm512_and_si512(_mm512_srli_epi16(code, 2), three), position);
  // chunk_value is the second value of each chunk: one less picks the first.
  const __m512i index = _mm512_mask_sub_epi16(chunk_value, ~is_second, chunk_value, _mm512_set1_epi16(1));
  const __m512i values = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  _mm512_storeu_si512(out, _mm512_maskz_permutexvar_epi16(is_first | is_second, index, values));
}
#elif defined(CPU_CAPABILITY_AVX2)
// Lanes, load_lanes, store_lanes: 8 elements in 32-bit lanes (vec_load_impl.h).

// Bit c of the keep pattern: mask byte c != 0, for the step's 16 columns.
inline uint32_t step_keep(const uint8_t* mask) {
  const __m128i m = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mask));
  return ~static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(m, _mm_setzero_si128()))) & 0xFFFFu;
}

// values[k] = weight column of value k (index: lanes 0-3 in the low 8
// columns, 4-7 in the high 8) where kept, else 0.
template <typename E>
inline void pack_values(const E* w, uint32_t keep, const Index& index, E* values) {
  const __m256i column = _mm256_add_epi32(index, _mm256_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8));
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i kept_bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(keep)), column), one);
  const __m256i kept = _mm256_cmpeq_epi32(kept_bit, one);
  const __m256i picked = _mm256_blend_epi32(_mm256_permutevar8x32_epi32(load_lanes(w), index),
                                            _mm256_permutevar8x32_epi32(load_lanes(w + 8), index), 0xF0);
  store_lanes(values, _mm256_and_si256(picked, kept));
}

// 8 columns (2 chunks, codes in the 8 bits of `byte`) from the 8 value lanes,
// of which the chunks' 4 start at lane `first`.
inline Lanes unpack_lanes(const Lanes& values, uint32_t byte, int first) {
  const __m256i chunk_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i position = _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3);
  const __m256i chunk_value = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i three = _mm256_set1_epi32(3);
  const __m256i code = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(byte)), chunk_shift);
  const __m256i is_first = _mm256_cmpeq_epi32(_mm256_and_si256(code, three), position);
  const __m256i is_second = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srli_epi32(code, 2), three), position);
  // is_second is -1 where true: subtracting it picks the chunk's second value.
  const __m256i index = _mm256_sub_epi32(_mm256_add_epi32(chunk_value, _mm256_set1_epi32(first)), is_second);
  return _mm256_and_si256(_mm256_permutevar8x32_epi32(values, index), _mm256_or_si256(is_first, is_second));
}

// The step: 1 word, 8 values, 16 columns.
template <typename E>
inline void unpack_step(const E* v, uint32_t bits, E* out) {
  const Lanes values = load_lanes(v);
  store_lanes(out, unpack_lanes(values, bits & 0xFFu, 0));
  store_lanes(out + 8, unpack_lanes(values, (bits >> 8) & 0xFFu, 4));
}
#endif

template <typename E>
bool pack_row(const E* w, const uint8_t* mask, int64_t cols, E* values, uint16_t* metadata) {
  int64_t c = 0;
  bool ok = true;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  for (; c + kStepCols <= cols; c += kStepCols) {
    const uint32_t keep = step_keep(mask + c);
    const uint32_t bits = step_codes(keep, ok);
    uint16_t* words = metadata + c / kWordCols;
    for (int64_t k = 0; k < kStepWords; ++k) {
      words[k] = static_cast<uint16_t>(bits >> (16 * k));
    }
    pack_values(w + c, keep, step_index(bits), values + c / 2);
  }
#endif
  return pack_words_scalar(w, mask, cols, values, metadata, c / kWordCols) && ok;
}

template <typename E>
void unpack_row(const E* values, const uint16_t* metadata, int64_t cols, E* out) {
  int64_t c = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  for (; c + kStepCols <= cols; c += kStepCols) {
    unpack_step(values + c / 2, step_bits(metadata + c / kWordCols), out + c);
  }
#endif
  unpack_words_scalar(values, metadata, cols, out, c / kWordCols);
}

}  // namespace sparse24
}  // namespace

Sparse24Tiles MULTIFLOW_ISA_FN(sparse24_tiles)() {
  return Sparse24Tiles{
      &sparse24::rows_dot<float>, &sparse24::rows_dot<c10::Half>, &sparse24::rows_dot<c10::BFloat16>,
      &sparse24::pack_row<uint32_t>, &sparse24::pack_row<uint16_t>,
      &sparse24::unpack_row<uint32_t>, &sparse24::unpack_row<uint16_t>};
}

}  // namespace multiflow::cpu
