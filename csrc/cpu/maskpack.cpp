// pack_mask / unpack_mask on CPU: split the (rows x cols) bools into tiles, run
// them with at::parallel_for, each with the per-ISA inner loop.
//
// Tiling. A tile is (a block of consecutive rows) x (kMaskPackColBlock
// columns), holding about kTileBools bools: column blocks feed the threads
// when rows are few and long (one flattened weight), row blocks when they are
// many and short. Every word and every output bool belongs to exactly one
// tile, and no tile reduces anything: the result is the same whatever the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ceil_div.h"
#include "cpu/isa.h"
#include "cpu/maskpack_tile.h"
#include "maskpack.h"

namespace multiflow::cpu {
namespace {

// Bools per tile: enough work to pay for a parallel task, little enough that
// a 4096 x 4096 mask still makes hundreds of tiles.
constexpr int64_t kTileBools = int64_t{1} << 15;

const MaskPackTiles& tiles() {
  static const MaskPackTiles table = MULTIFLOW_ISA_TABLE(mask_pack_tiles);
  return table;
}

// Calls tile(r0, c0, n_rows, n_cols) for every tile of a (rows x cols) grid of bools, in parallel.
template <typename TileFn>
void for_each_tile(int64_t rows, int64_t cols, const TileFn& tile) {
  if (rows == 0 || cols == 0) {
    return;
  }
  const int64_t block_cols = std::min(cols, kMaskPackColBlock);
  const int64_t block_rows = std::max<int64_t>(1, kTileBools / block_cols);
  const int64_t n_col_blocks = ceil_div(cols, block_cols);
  const int64_t n_tiles = ceil_div(rows, block_rows) * n_col_blocks;
  at::parallel_for(0, n_tiles, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r0 = (i / n_col_blocks) * block_rows;
      const int64_t c0 = (i % n_col_blocks) * block_cols;
      tile(r0, c0, std::min(block_rows, rows - r0), std::min(block_cols, cols - c0));
    }
  });
}

at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  const PackProblem p = prepare_pack_mask(mask);
  const PackTileFn pack = tiles().pack;
  const bool* in = p.mask.const_data_ptr<bool>();
  int32_t* out = p.bits.mutable_data_ptr<int32_t>();
  const int64_t words = p.bits.size(1);
  // Column blocks are whole words (kMaskPackColBlock % 32 == 0), so a tile's
  // words start at word c0 / 32 of its rows.
  for_each_tile(p.rows, p.cols, [&](int64_t r0, int64_t c0, int64_t n_rows, int64_t n_cols) {
    pack(in + r0 * p.row_stride + c0, p.row_stride, n_rows, n_cols, out + r0 * words + c0 / 32, words);
  });
  return p.bits;
}

at::Tensor unpack_mask_cpu(const at::Tensor& bits, int64_t cols) {
  const UnpackProblem p = prepare_unpack_mask(bits, cols);
  const UnpackTileFn unpack = tiles().unpack;
  const int32_t* in = p.bits.const_data_ptr<int32_t>();
  bool* out = p.mask.mutable_data_ptr<bool>();
  const int64_t words = p.bits.size(1);
  for_each_tile(p.rows, p.cols, [&](int64_t r0, int64_t c0, int64_t n_rows, int64_t n_cols) {
    unpack(in + r0 * words + c0 / 32, words, n_rows, n_cols, out + r0 * p.cols + c0, p.cols);
  });
  return p.mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CPU, m) {
  m.impl("pack_mask", &pack_mask_cpu);
  m.impl("unpack_mask", &unpack_mask_cpu);
}

}  // namespace multiflow::cpu
