// sq_sum_accumulate_ on CPU: split the (tokens x features) problem into tiles,
// run them with at::parallel_for, and reduce the per-chunk partial sums.
//
// Tiling. A tile is (a chunk of consecutive tokens) x (kSqSumColBlock feature
// columns). Tiles over columns feed the threads when there are many features;
// chunks over tokens feed them when there are few features and many tokens
// (e.g. F = 64 and 100k tokens would otherwise be a single tile).
//
// Determinism. The tiling depends only on the shape, never on the thread
// count: each tile sums its tokens in order, chunk partials are added in chunk
// order, so the result is bitwise the same with 1 or 64 threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "act_stats.h"
#include "ceil_div.h"
#include "cpu/act_stats_tile.h"
#include "cpu/dispatch_activation.h"
#include "cpu/isa.h"

namespace multiflow::cpu {
namespace {

// A chunk has at least this many tokens, so its partial row (F floats) is
// small next to the data it summarises ...
constexpr int64_t kMinChunkTokens = 256;
// ... and there are at most this many chunks, bounding the partial buffer to
// kMaxChunks * F floats whatever the token count.
constexpr int64_t kMaxChunks = 64;
// Below about this many elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelElements = int64_t{1} << 15;

const SqSumTiles& tiles() {
  static const SqSumTiles table = MULTIFLOW_ISA_TABLE(sq_sum_tiles);
  return table;
}

SqSumTileFn tile_for(at::ScalarType dtype) {
  return for_activation_dtype("multiflow::sq_sum_accumulate_ (x)", tiles(), dtype);
}

void sq_sum_accumulate_cpu(
    const at::Tensor& acc,
    const at::Tensor& x,
    const std::optional<at::Tensor>& token_mask) {
  const SqSumProblem p = prepare_sq_sum(acc, x, token_mask);
  const int64_t n_tokens = p.n_tokens;
  const int64_t n_features = p.n_features;
  if (n_tokens == 0 || n_features == 0) {
    return;
  }

  const SqSumTileFn tile = tile_for(p.x.scalar_type());
  const auto* x_bytes = static_cast<const char*>(p.x.const_data_ptr());
  const int64_t x_elem_size = p.x.element_size();
  const bool* mask = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;
  float* acc_ptr = acc.mutable_data_ptr<float>();

  const int64_t chunk_tokens = std::max(kMinChunkTokens, ceil_div(n_tokens, kMaxChunks));
  const int64_t n_chunks = ceil_div(n_tokens, chunk_tokens);
  const int64_t n_col_blocks = ceil_div(n_features, kSqSumColBlock);

  // With one chunk the tiles add straight into acc (each column belongs to
  // exactly one tile). With several, each tile writes its own row of the
  // partial buffer and a second pass adds the rows into acc in chunk order.
  at::Tensor partial;
  float* partial_ptr = nullptr;
  if (n_chunks > 1) {
    partial = at::zeros({n_chunks, n_features}, acc.options());
    partial_ptr = partial.mutable_data_ptr<float>();
  }

  const int64_t tile_elements = std::min(chunk_tokens, n_tokens) * std::min(kSqSumColBlock, n_features);
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / tile_elements);
  at::parallel_for(0, n_chunks * n_col_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t chunk = i / n_col_blocks;
      const int64_t t0 = chunk * chunk_tokens;
      const int64_t c0 = (i % n_col_blocks) * kSqSumColBlock;
      float* out = (n_chunks > 1 ? partial_ptr + chunk * n_features : acc_ptr) + c0;
      tile(
          x_bytes + (t0 * p.row_stride + c0) * x_elem_size,
          p.row_stride,
          mask != nullptr ? mask + t0 : nullptr,
          std::min(chunk_tokens, n_tokens - t0),
          std::min(kSqSumColBlock, n_features - c0),
          out);
    }
  });

  if (n_chunks > 1) {
    // Sum the chunk partials first, then add once into acc (as a tile does).
    // At most kMaxChunks * F floats: memory-light, so left to the compiler.
    const int64_t reduce_grain = std::max<int64_t>(1, kMinParallelElements / n_chunks);
    at::parallel_for(0, n_features, reduce_grain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        float s = 0.0f;
        for (int64_t c = 0; c < n_chunks; ++c) {
          s += partial_ptr[c * n_features + j];
        }
        acc_ptr[j] += s;
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CPU, m) {
  m.impl("sq_sum_accumulate_", &sq_sum_accumulate_cpu);
}

}  // namespace multiflow::cpu
