// The inner loop of sq_sum_accumulate_ on CPU, for one ISA. Included only by
// the isa_*.cpp files, after they set CPU_CAPABILITY (no include guard on
// purpose: once per ISA translation unit). See isa.h.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu/act_stats_tile.h"
#include "cpu/isa.h"
#include "cpu/vec_load_impl.h"

namespace multiflow::cpu {
namespace {  // internal linkage: every ISA's copy stays its own

template <typename scalar_t>
void sq_sum_tile(
    const void* x_,
    int64_t row_stride,
    const bool* mask,
    int64_t n_tokens,
    int64_t width,
    float* out) {
  static_assert(kSqSumColBlock % kLanes == 0, "a tile must hold whole vectors");
  constexpr int64_t kMaxVecs = kSqSumColBlock / kLanes;

  const auto* x = static_cast<const scalar_t*>(x_);
  const int64_t n_full = width / kLanes;             // whole vectors in a row segment
  const int64_t n_tail = width - n_full * kLanes;    // 0 .. kLanes-1 leftover columns

  // Float32 sums in three levels, like torch's own cascade sum: squares go
  // into `fresh`, which is flushed into `mid` every kFlush kept tokens, which
  // is flushed into `total` every kFlush^2. Each sum then adds at most a few
  // dozen terms of similar size, so the rounding error stays near plain
  // torch's instead of growing with the token count. The order is fixed by
  // the tile's data alone. Per token: 16 (AVX-512) or 32 (AVX2, default)
  // independent FMA chains, enough to hide the FMA latency; the three arrays
  // (3 KiB) stay in L1.
  constexpr int64_t kFlush = 16;
  FloatVec fresh[kMaxVecs], mid[kMaxVecs], total[kMaxVecs];
  const int64_t n_vecs = n_full + (n_tail > 0 ? 1 : 0);
  for (int64_t v = 0; v < n_vecs; ++v) {
    fresh[v] = mid[v] = total[v] = FloatVec(0.0f);
  }

  int64_t kept = 0;
  for (int64_t t = 0; t < n_tokens; ++t) {
    // Masked tokens (padding) are skipped in place: nothing is gathered or copied.
    if (mask != nullptr && !mask[t]) {
      continue;
    }
    const scalar_t* row = x + t * row_stride;
    for (int64_t v = 0; v < n_full; ++v) {
      const FloatVec a = load_as_float(row + v * kLanes);
      fresh[v] = at::vec::fmadd(a, a, fresh[v]);
    }
    if (n_tail > 0) {
      // Zero-pad the leftover columns into one vector (0^2 adds nothing), so
      // the tail takes the same vector path and never reads past the row.
      scalar_t padded[kLanes] = {};
      std::memcpy(padded, row + n_full * kLanes, n_tail * sizeof(scalar_t));
      const FloatVec a = load_as_float(padded);
      fresh[n_full] = at::vec::fmadd(a, a, fresh[n_full]);
    }
    if (++kept % kFlush == 0) {
      for (int64_t v = 0; v < n_vecs; ++v) {
        mid[v] = mid[v] + fresh[v];
        fresh[v] = FloatVec(0.0f);
      }
      if (kept % (kFlush * kFlush) == 0) {
        for (int64_t v = 0; v < n_vecs; ++v) {
          total[v] = total[v] + mid[v];
          mid[v] = FloatVec(0.0f);
        }
      }
    }
  }

  // The tile's sums go into out once, so a large running total in out does not
  // swallow the small per-token squares.
  for (int64_t v = 0; v < n_vecs; ++v) {
    const int64_t count = (v < n_full) ? kLanes : n_tail;
    float* dst = out + v * kLanes;
    const FloatVec tile_sum = total[v] + (mid[v] + fresh[v]);
    (FloatVec::loadu(dst, count) + tile_sum).store(dst, count);
  }
}

}  // namespace

SqSumTiles MULTIFLOW_ISA_FN(sq_sum_tiles)() {
  return SqSumTiles{
      &sq_sum_tile<float>,
      &sq_sum_tile<c10::Half>,
      &sq_sum_tile<c10::BFloat16>,
  };
}

}  // namespace multiflow::cpu
