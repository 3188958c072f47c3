// flow_importance / flow_scores on CPU: the interface between the driver
// (flow.cpp: the tiling, the parallel passes and the reductions) and the
// per-ISA inner loops (flow_tile_impl.h, compiled once per ISA, see isa.h).
//
// A tile is (a block of rows) x (at most kFlowColBlock columns) of one layer's
// weight, read as rows of `cols` contiguous elements `row_stride` apart.
#pragma once

#include <cstdint>

namespace multiflow::cpu {

// Columns per tile: a tile's column sums (kFlowColBlock doubles, 32 KiB) and
// its slice of r (16 KiB) stay in L1/L2 while its rows stream from memory.
inline constexpr int64_t kFlowColBlock = 4096;

// max over the tile of |float(w_ij)|; NaN if any element is NaN (torch.max's rule).
using FlowAbsMaxFn = float (*)(const void* w, int64_t row_stride, int64_t rows, int64_t cols);

// A_ij = (|float(w_ij)| * w_scale) * r[j] in float32 (two roundings, in that
// order, as the reference computes it). Writes row_sums[i] = sum_j double(A_ij)
// for i < rows and col_sums[j] = sum_i double(A_ij) for j < cols, each summed in
// an order fixed by the tile's shape alone.
using FlowImportanceFn = void (*)(
    const void* w,
    int64_t row_stride,
    int64_t rows,
    int64_t cols,
    float w_scale,
    const float* r,
    double* row_sums,
    double* col_sums);

// out[i * out_stride + j] = (imp_out[i] * (|float(w_ij)| * w_scale)) * imp_in[j],
// float32 products in that order.
using FlowScoresFn = void (*)(
    const void* w,
    int64_t row_stride,
    int64_t rows,
    int64_t cols,
    float w_scale,
    const float* imp_out,
    const float* imp_in,
    float* out,
    int64_t out_stride);

struct FlowTileFns {
  FlowAbsMaxFn abs_max;
  FlowImportanceFn importance;
  FlowScoresFn scores;
};

struct FlowTiles {
  FlowTileFns f32;
  FlowTileFns f16;
  FlowTileFns bf16;
};

FlowTiles flow_tiles_default();
FlowTiles flow_tiles_avx2();
FlowTiles flow_tiles_avx512();

}  // namespace multiflow::cpu
