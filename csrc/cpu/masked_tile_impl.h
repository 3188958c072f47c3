// The GEMM micro-kernel of masked_linear on CPU, for one ISA. Included only by
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

}  // namespace masked
}  // namespace

MaskedTiles MULTIFLOW_ISA_FN(masked_tiles)() {
  return MaskedTiles{&masked::gemm_tile};
}

}  // namespace multiflow::cpu
