// The inner loops of flow_importance / flow_scores on CPU, for one ISA.
// Included only by the isa_*.cpp files, after they set CPU_CAPABILITY (no
// include guard on purpose: once per ISA translation unit). See isa.h.
//
// Exactness. Every float32 product is computed as the reference writes it:
// (|w| * w_scale) * r and (imp_out * (|w| * w_scale)) * imp_in, one IEEE
// multiply each (lane-wise, so vector and scalar lanes round alike; a product
// of products is never contracted into an FMA). Only the float64 sums differ
// in order from torch's; see flow.cpp for why that leaves the float32 means equal.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/flow_tile.h"
#include "cpu/isa.h"
#include "cpu/vec_load_impl.h"

namespace multiflow::cpu {
namespace {  // internal linkage: every ISA's copy stays its own
namespace flow_tile {

static_assert(kFlowColBlock % kLanes == 0, "a tile must hold whole vectors");

// |float(p[0 .. kLanes))|: fp16 / bf16 widen exactly to float32.
template <typename scalar_t>
inline FloatVec load_abs(const scalar_t* p) {
  return load_as_float(p).abs();
}

// The same for the last `count` < kLanes elements of a row, zero padded (never
// reads past the row).
template <typename scalar_t>
inline FloatVec load_abs_tail(const scalar_t* p, int64_t count) {
  scalar_t padded[kLanes] = {};
  std::memcpy(padded, p, count * sizeof(scalar_t));
  return load_abs(padded);
}

template <typename scalar_t>
float abs_max_tile(const void* w_, int64_t row_stride, int64_t rows, int64_t cols) {
  const auto* w = static_cast<const scalar_t*>(w_);
  const int64_t n_full = cols / kLanes;
  const int64_t n_tail = cols - n_full * kLanes;
  // Two chains hide the latency of max; at::vec::maximum propagates NaN.
  FloatVec m0(0.0f), m1(0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = w + i * row_stride;
    int64_t v = 0;
    for (; v + 1 < n_full; v += 2) {
      m0 = at::vec::maximum(m0, load_abs(row + v * kLanes));
      m1 = at::vec::maximum(m1, load_abs(row + (v + 1) * kLanes));
    }
    if (v < n_full) {
      m0 = at::vec::maximum(m0, load_abs(row + v * kLanes));
    }
    if (n_tail > 0) {
      m1 = at::vec::maximum(m1, load_abs_tail(row + n_full * kLanes, n_tail));  // pads with |0|
    }
  }
  // Across lanes in scalar code (NaN first, as torch.max).
  float lanes[2 * kLanes];
  m0.store(lanes);
  m1.store(lanes + kLanes);
  float m = 0.0f;
  for (int64_t k = 0; k < 2 * kLanes; ++k) {
    if (std::isnan(lanes[k])) {
      return lanes[k];
    }
    m = lanes[k] > m ? lanes[k] : m;
  }
  return m;
}

template <typename scalar_t>
void importance_tile(
    const void* w_,
    int64_t row_stride,
    int64_t rows,
    int64_t cols,
    float w_scale,
    const float* r,
    double* row_sums,
    double* col_sums) {
  const auto* w = static_cast<const scalar_t*>(w_);
  const int64_t n_full = cols / kLanes;
  const int64_t n_tail = cols - n_full * kLanes;
  const FloatVec scale(w_scale);
  for (int64_t j = 0; j < cols; ++j) {
    col_sums[j] = 0.0;
  }

  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = w + i * row_stride;
    // kLanes float64 partial sums of the row (lane k takes columns k mod kLanes),
    // added up in lane order at the end: a fixed order, vectorisable.
    double row_acc[kLanes] = {};
    for (int64_t v = 0; v < n_full; ++v) {
      const int64_t c = v * kLanes;
      float a[kLanes];
      ((load_abs(row + c) * scale) * FloatVec::loadu(r + c)).store(a);
      double* col = col_sums + c;
      for (int64_t k = 0; k < kLanes; ++k) {
        const double d = a[k];
        col[k] += d;
        row_acc[k] += d;
      }
    }
    if (n_tail > 0) {
      const int64_t c = n_full * kLanes;
      float a[kLanes];
      ((load_abs_tail(row + c, n_tail) * scale) * FloatVec::loadu(r + c, n_tail)).store(a);
      for (int64_t k = 0; k < n_tail; ++k) {
        const double d = a[k];
        col_sums[c + k] += d;
        row_acc[k] += d;
      }
    }
    double s = 0.0;
    for (int64_t k = 0; k < kLanes; ++k) {
      s += row_acc[k];
    }
    row_sums[i] = s;
  }
}

template <typename scalar_t>
void scores_tile(
    const void* w_,
    int64_t row_stride,
    int64_t rows,
    int64_t cols,
    float w_scale,
    const float* imp_out,
    const float* imp_in,
    float* out,
    int64_t out_stride) {
  const auto* w = static_cast<const scalar_t*>(w_);
  const int64_t n_full = cols / kLanes;
  const int64_t n_tail = cols - n_full * kLanes;
  const FloatVec scale(w_scale);
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = w + i * row_stride;
    float* dst = out + i * out_stride;
    const FloatVec io(imp_out[i]);
    for (int64_t v = 0; v < n_full; ++v) {
      const int64_t c = v * kLanes;
      ((io * (load_abs(row + c) * scale)) * FloatVec::loadu(imp_in + c)).store(dst + c);
    }
    if (n_tail > 0) {
      const int64_t c = n_full * kLanes;
      ((io * (load_abs_tail(row + c, n_tail) * scale)) * FloatVec::loadu(imp_in + c, n_tail))
          .store(dst + c, n_tail);
    }
  }
}

template <typename scalar_t>
constexpr FlowTileFns fns_for() {
  return FlowTileFns{&abs_max_tile<scalar_t>, &importance_tile<scalar_t>, &scores_tile<scalar_t>};
}

}  // namespace flow_tile
}  // namespace

FlowTiles MULTIFLOW_ISA_FN(flow_tiles)() {
  return FlowTiles{
      flow_tile::fns_for<float>(),
      flow_tile::fns_for<c10::Half>(),
      flow_tile::fns_for<c10::BFloat16>(),
  };
}

}  // namespace multiflow::cpu
