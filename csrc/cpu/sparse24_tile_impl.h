// The row kernel of sparse24_linear on CPU, for one ISA. Included only by the
// isa_*.cpp files, after they set CPU_CAPABILITY (no include guard on purpose:
// once per ISA translation unit). See isa.h and sparse24_tile.h.
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

}  // namespace sparse24
}  // namespace

Sparse24Tiles MULTIFLOW_ISA_FN(sparse24_tiles)() {
  return Sparse24Tiles{
      &sparse24::rows_dot<float>, &sparse24::rows_dot<c10::Half>, &sparse24::rows_dot<c10::BFloat16>};
}

}  // namespace multiflow::cpu
