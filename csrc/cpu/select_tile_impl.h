// The inner loops of the selection ops on CPU, for one ISA. Included only by
// the isa_*.cpp files, after they set CPU_CAPABILITY (no include guard on
// purpose: once per ISA translation unit). See isa.h and select_tile.h.
//
// Loads and conversions (float16/bfloat16 -> float32, the flow score's
// products) use at::vec; the loops over float32 blocks (order keys, counts,
// comparisons, compaction) are plain loops that the compiler vectorises for
// the translation unit's ISA.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#include "cpu/isa.h"
#include "cpu/select_tile.h"
#include "cpu/vec_load_impl.h"
#include "select_key.h"

namespace multiflow::cpu {
namespace select_tile {
namespace {  // internal linkage: every ISA's copy stays its own

template <typename scalar_t>
void to_float(const void* src_, int64_t n, bool absolute, float* out) {
  const auto* src = static_cast<const scalar_t*>(src_);
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    const FloatVec v = load_as_float(src + e);
    (absolute ? v.abs() : v).store(out + e);
  }
  for (; e < n; ++e) {
    const float v = static_cast<float>(src[e]);
    out[e] = absolute ? std::fabs(v) : v;
  }
}

template <typename scalar_t>
void flow_score(const void* w_, int64_t n, float imp_out_i, float scale, const float* imp_in, float* out) {
  // Three roundings, in the reference's order: |w| * scale (exact: a power of
  // two), then * imp_out_i, then * imp_in[j]. Products only, so no FMA
  // contraction can change them.
  const auto* w = static_cast<const scalar_t*>(w_);
  const FloatVec o(imp_out_i);
  const FloatVec s(scale);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const FloatVec a = load_as_float(w + j).abs() * s;
    ((o * a) * FloatVec::loadu(imp_in + j)).store(out + j);
  }
  for (; j < n; ++j) {
    out[j] = (imp_out_i * (std::fabs(static_cast<float>(w[j])) * scale)) * imp_in[j];
  }
}

void float_keys(const float* f, int64_t n, bool absolute, uint32_t* keys) {
  if (absolute) {
    for (int64_t e = 0; e < n; ++e) {
      keys[e] = key_of_float(std::fabs(f[e]));
    }
    return;
  }
  for (int64_t e = 0; e < n; ++e) {
    keys[e] = key_of_float(f[e]);
  }
}

int64_t count_at_most(const float* f, int64_t n, float threshold) {
  int32_t count = 0;  // n <= kSelectBlock
  for (int64_t e = 0; e < n; ++e) {
    count += f[e] <= threshold ? 1 : 0;
  }
  return count;
}

void greater_than(const float* f, int64_t n, float threshold, bool* out) {
  for (int64_t e = 0; e < n; ++e) {
    out[e] = f[e] > threshold;
  }
}

void histogram(
    const uint32_t* keys, int64_t n, int high_shift, uint32_t prefix, int shift, uint32_t digit_mask, uint32_t* hist) {
  // kHistogramCopies histograms, used round-robin: runs of equal digits (ties,
  // or weights crowded into a few binades) then increment different counters,
  // instead of queueing on one counter's store-to-load latency.
  static_assert(kHistogramCopies == 4, "the loops below are unrolled for 4 copies");
  uint32_t* h0 = hist;
  uint32_t* h1 = hist + kRadixBuckets;
  uint32_t* h2 = hist + 2 * kRadixBuckets;
  uint32_t* h3 = hist + 3 * kRadixBuckets;
  int64_t e = 0;
  if (high_shift >= 32) {
    for (; e + 4 <= n; e += 4) {
      ++h0[(keys[e] >> shift) & digit_mask];
      ++h1[(keys[e + 1] >> shift) & digit_mask];
      ++h2[(keys[e + 2] >> shift) & digit_mask];
      ++h3[(keys[e + 3] >> shift) & digit_mask];
    }
    for (; e < n; ++e) {
      ++h0[(keys[e] >> shift) & digit_mask];
    }
    return;
  }
  const auto count = [&](uint32_t* h, uint32_t key) {
    if ((key >> high_shift) == prefix) {
      ++h[(key >> shift) & digit_mask];
    }
  };
  for (; e + 4 <= n; e += 4) {
    count(h0, keys[e]);
    count(h1, keys[e + 1]);
    count(h2, keys[e + 2]);
    count(h3, keys[e + 3]);
  }
  for (; e < n; ++e) {
    count(h0, keys[e]);
  }
}

int64_t gather(const uint32_t* keys, int64_t n, int high_shift, uint32_t prefix, uint32_t* out) {
  int64_t count = 0;
  int64_t e = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // 16 keys at a time: compare, compress the matches to the front of a
  // register, store all 16 lanes (count <= e, so out[count + 15] stays below
  // out[n]; the lanes past the matches are overwritten later or ignored).
  // Compressing in a register, not to memory: vpcompressd to memory is
  // microcoded and slow on some CPUs (AMD Zen 4).
  const __m512i want = _mm512_set1_epi32(static_cast<int>(prefix));
  const __m128i by = _mm_cvtsi32_si128(high_shift);
  for (; e + 16 <= n; e += 16) {
    const __m512i k = _mm512_loadu_si512(keys + e);
    const __mmask16 match = _mm512_cmpeq_epi32_mask(_mm512_srl_epi32(k, by), want);
    _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi32(match, k));
    count += __builtin_popcount(static_cast<unsigned>(match));
  }
#endif
  // Branch-free compaction: every key is written, only matches advance.
  for (; e < n; ++e) {
    const uint32_t key = keys[e];
    out[count] = key;
    count += (key >> high_shift) == prefix ? 1 : 0;
  }
  return count;
}

// keep[j] for one group of m keys: its rank (how many keys of the group come
// before it in a stable descending sort) is below n.
template <int64_t M>
inline void nm_group_by_rank(const uint32_t* u, int64_t n, int64_t m_runtime, bool* keep) {
  const int64_t m = M > 0 ? M : m_runtime;
  for (int64_t j = 0; j < m; ++j) {
    int64_t rank = 0;
    for (int64_t i = 0; i < m; ++i) {
      rank += (u[i] > u[j] || (u[i] == u[j] && i < j)) ? 1 : 0;
    }
    keep[j] = rank < n;
  }
}

void nm_row(const uint32_t* keys, int64_t n_groups, int64_t n, int64_t m, bool* keep) {
  if (m == 4) {  // 2:4 and 1:4, the formats sparse tensor cores read: fully unrolled
    for (int64_t g = 0; g < n_groups; ++g) {
      nm_group_by_rank<4>(keys + 4 * g, n, 4, keep + 4 * g);
    }
    return;
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    nm_group_by_rank<0>(keys + m * g, n, m, keep + m * g);
  }
}

}  // namespace
}  // namespace select_tile

SelectTiles MULTIFLOW_ISA_FN(select_tiles)() {
  using namespace select_tile;
  return SelectTiles{
      {&to_float<float>, &to_float<c10::Half>, &to_float<c10::BFloat16>},
      {&flow_score<float>, &flow_score<c10::Half>, &flow_score<c10::BFloat16>},
      &float_keys,
      &count_at_most,
      &greater_than,
      &histogram,
      &gather,
      &nm_row,
  };
}

}  // namespace multiflow::cpu
