// The inner loops of pack_mask / unpack_mask on CPU, for one ISA. Included
// only by the isa_*.cpp files, after they set CPU_CAPABILITY (no include guard
// on purpose: once per ISA translation unit). See isa.h.
//
// One "step" turns kStep bools into kStep / 32 words or back:
//   AVX-512 (BW, VL)  64 bytes <-> a 64-bit mask register (test / maskz_set1)
//   AVX2              32 bytes <-> compare with 0 + movemask / shuffle + compare
//   default           8 bytes as one uint64 <-> 8 bits with a multiply (portable
//                     C++, any CPU, any byte order)
// The last partial word of a row goes through a zero-padded 32-byte buffer, so
// nothing is read or written past a row's `cols` bools.
#include <cstdint>
#include <cstring>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "cpu/isa.h"
#include "cpu/maskpack_tile.h"

namespace multiflow::cpu {
// Internal linkage: every ISA's copy stays its own. The named namespace keeps
// these short names apart from the other ops' inner loops in the same file.
namespace {
namespace maskpack {

// ---- 32 bools <-> one word: the portable bit tricks (every ISA's remainder path).

// 8 bytes as a uint64 whose byte k (k = 0 least significant) is bool k.
inline uint64_t load_bytes8(const bool* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  return v;
}

inline void store_bytes8(bool* p, uint64_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap64(v);
#endif
  std::memcpy(p, &v, sizeof(v));
}

constexpr uint64_t kLowBitOfEachByte = 0x0101010101010101ull;

// Bits 0..7 = bytes 0..7 != 0. The ORs fold each byte onto its own bit 0 (a
// bool byte other than 0/1 still counts as true); the multiply then moves bit 0
// of byte k to bit 56 + k. Its partial products land on distinct bits
// (8i - 7j = 8i' - 7j' forces i = i', j = j'), so no carries disturb the top byte.
inline uint32_t gather8(uint64_t bytes) {
  bytes |= bytes >> 4;
  bytes |= bytes >> 2;
  bytes |= bytes >> 1;
  bytes &= kLowBitOfEachByte;
  return static_cast<uint32_t>((bytes * 0x0102040810204080ull) >> 56);
}

// The inverse: byte k = bit k of `bits` (0 or 1). The multiply copies the byte
// into all 8 bytes, the AND keeps bit k in byte k, and adding 0x7F sets a
// byte's top bit exactly when that bit was set (no carry leaves the byte).
inline uint64_t scatter8(uint32_t bits) {
  const uint64_t spread = (static_cast<uint64_t>(bits & 0xFF) * kLowBitOfEachByte) & 0x8040201008040201ull;
  return ((spread + 0x7F7F7F7F7F7F7F7Full) >> 7) & kLowBitOfEachByte;
}

inline int32_t pack_word_portable(const bool* p) {
  uint32_t w = 0;
  for (int k = 0; k < 4; ++k) {
    w |= gather8(load_bytes8(p + 8 * k)) << (8 * k);
  }
  return static_cast<int32_t>(w);
}

inline void unpack_word_portable(int32_t word, bool* p) {
  const auto w = static_cast<uint32_t>(word);
  for (int k = 0; k < 4; ++k) {
    store_bytes8(p + 8 * k, scatter8(w >> (8 * k)));
  }
}

// ---- One step per ISA.

#if defined(CPU_CAPABILITY_AVX512)

constexpr int64_t kStep = 64;

inline void pack_step(const bool* p, int32_t* words) {
  const __m512i v = _mm512_loadu_si512(p);
  const uint64_t bits = _mm512_test_epi8_mask(v, v);  // bit k = byte k != 0
  words[0] = static_cast<int32_t>(static_cast<uint32_t>(bits));
  words[1] = static_cast<int32_t>(static_cast<uint32_t>(bits >> 32));
}

inline void unpack_step(const int32_t* words, bool* p) {
  const uint64_t bits = static_cast<uint64_t>(static_cast<uint32_t>(words[0])) |
                        (static_cast<uint64_t>(static_cast<uint32_t>(words[1])) << 32);
  _mm512_storeu_si512(p, _mm512_maskz_set1_epi8(bits, 1));
}

#elif defined(CPU_CAPABILITY_AVX2)

constexpr int64_t kStep = 32;

inline void pack_step(const bool* p, int32_t* words) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i is_zero = _mm256_cmpeq_epi8(v, _mm256_setzero_si256());
  words[0] = ~_mm256_movemask_epi8(is_zero);  // bit k = byte k != 0
}

inline void unpack_step(const int32_t* words, bool* p) {
  // Byte k takes byte k / 8 of the word (the shuffle works within each 128-bit
  // half, and both halves hold the broadcast word), then tests its bit k % 8.
  const __m256i byte_of_word = _mm256_setr_epi8(
      0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
      2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit_of_byte = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(words[0]), byte_of_word);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit_of_byte), bit_of_byte);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_and_si256(set, _mm256_set1_epi8(1)));
}

#else

constexpr int64_t kStep = 32;

inline void pack_step(const bool* p, int32_t* words) {
  words[0] = pack_word_portable(p);
}

inline void unpack_step(const int32_t* words, bool* p) {
  unpack_word_portable(words[0], p);
}

#endif

static_assert(kStep % 32 == 0 && kMaskPackColBlock % kStep == 0, "a tile must hold whole steps");

// ---- The tiles.

void pack_tile(
    const bool* mask,
    int64_t mask_stride,
    int64_t rows,
    int64_t cols,
    int32_t* words,
    int64_t words_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const bool* in = mask + r * mask_stride;
    int32_t* out = words + r * words_stride;
    int64_t c = 0;
    for (; c + kStep <= cols; c += kStep) {
      pack_step(in + c, out + c / 32);
    }
    for (; c + 32 <= cols; c += 32) {  // AVX-512 only: one whole word left
      out[c / 32] = pack_word_portable(in + c);
    }
    if (c < cols) {  // the padding bits of the last word come from the zeros
      bool padded[32] = {};
      std::memcpy(padded, in + c, static_cast<size_t>(cols - c));
      out[c / 32] = pack_word_portable(padded);
    }
  }
}

void unpack_tile(
    const int32_t* words,
    int64_t words_stride,
    int64_t rows,
    int64_t cols,
    bool* mask,
    int64_t mask_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* in = words + r * words_stride;
    bool* out = mask + r * mask_stride;
    int64_t c = 0;
    for (; c + kStep <= cols; c += kStep) {
      unpack_step(in + c / 32, out + c);
    }
    for (; c + 32 <= cols; c += 32) {
      unpack_word_portable(in[c / 32], out + c);
    }
    if (c < cols) {
      bool unpacked[32];
      unpack_word_portable(in[c / 32], unpacked);
      std::memcpy(out + c, unpacked, static_cast<size_t>(cols - c));
    }
  }
}

}  // namespace maskpack
}  // namespace

MaskPackTiles MULTIFLOW_ISA_FN(mask_pack_tiles)() {
  return MaskPackTiles{&maskpack::pack_tile, &maskpack::unpack_tile};
}

}  // namespace multiflow::cpu
