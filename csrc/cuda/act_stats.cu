// sq_sum_accumulate_ on CUDA.
//
// Layout. x is read as (n_tokens, n_features) rows with contiguous features
// (see act_stats.h). A block is kCols feature columns wide and kRows warps
// tall: the 32 lanes of a warp read 32 consecutive features of one token
// (coalesced), the kRows warps walk the block's token chunk kRows rows apart.
// grid.x covers the features, grid.y the token chunks, so there are enough
// blocks for the GPU both with many features and with many tokens.
//
// Determinism. No atomics: each thread sums its rows in order, the block adds
// its kRows warp sums in order, and with several chunks the per-chunk sums go
// to a partial buffer that a second kernel adds into acc in chunk order. The
// chunking depends only on the shape, so repeated runs agree bitwise.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "act_stats.h"
#include "ceil_div.h"

namespace multiflow::cuda {
namespace {

constexpr int kCols = 32;  // one warp across the features
constexpr int kRows = 8;   // warps per block, down the tokens
// Chunks of at least kMinChunkTokens tokens (32 loads per thread, several in
// flight thanks to the unrolled loop), and at most kMaxChunks of them so the
// partial buffer stays small (kMaxChunks * F floats).
constexpr int64_t kMinChunkTokens = 256;
constexpr int64_t kMaxChunks = 512;
constexpr int kReduceThreads = 256;
constexpr int kFlush = 16;

template <typename scalar_t>
__global__ void __launch_bounds__(kCols * kRows) sq_sum_chunks_kernel(
    const scalar_t* __restrict__ x,
    int64_t row_stride,
    const bool* __restrict__ mask,
    int64_t n_tokens,
    int64_t n_features,
    int64_t chunk_tokens,
    float* __restrict__ out,  // acc when add_into_out, else partial (n_chunks, F)
    bool add_into_out) {
  __shared__ float warp_sums[kRows][kCols];

  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * chunk_tokens;
  const int64_t t1 = min(n_tokens, t0 + chunk_tokens);

  // Two-level sum (flushed every kFlush rows) so that long chunks keep the
  // rounding error near that of torch's cascade sum.
  float outer = 0.0f;
  float inner = 0.0f;
  if (col < n_features) {
    int rows = 0;
#pragma unroll 4
    for (int64_t t = t0 + threadIdx.y; t < t1; t += kRows) {
      // Every lane of the warp reads the same mask byte: one broadcast load.
      if (mask == nullptr || mask[t]) {
        const float v = static_cast<float>(x[t * row_stride + col]);
        inner = fmaf(v, v, inner);
      }
      if (++rows == kFlush) {
        outer += inner;
        inner = 0.0f;
        rows = 0;
      }
    }
  }
  warp_sums[threadIdx.y][threadIdx.x] = outer + inner;
  __syncthreads();

  if (threadIdx.y == 0 && col < n_features) {
    float total = 0.0f;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      total += warp_sums[r][threadIdx.x];
    }
    if (add_into_out) {
      out[col] += total;  // one chunk: this block alone owns these columns of acc
    } else {
      out[static_cast<int64_t>(blockIdx.y) * n_features + col] = total;
    }
  }
}

// acc[j] += sum over chunks c, in order, of partial[c, j].
__global__ void add_chunk_sums_kernel(
    const float* __restrict__ partial,
    int64_t n_chunks,
    int64_t n_features,
    float* __restrict__ acc) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n_features) {
    return;
  }
  float outer = 0.0f;
  float inner = 0.0f;
  for (int64_t c = 0; c < n_chunks; ++c) {
    inner += partial[c * n_features + col];
    if ((c + 1) % kFlush == 0) {
      outer += inner;
      inner = 0.0f;
    }
  }
  acc[col] += outer + inner;
}

void sq_sum_accumulate_cuda(
    const at::Tensor& acc,
    const at::Tensor& x,
    const std::optional<at::Tensor>& token_mask) {
  const SqSumProblem p = prepare_sq_sum(acc, x, token_mask);
  if (p.n_tokens == 0 || p.n_features == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const int64_t chunk_tokens = std::max(kMinChunkTokens, ceil_div(p.n_tokens, kMaxChunks));
  const int64_t n_chunks = ceil_div(p.n_tokens, chunk_tokens);
  const int64_t n_col_blocks = ceil_div(p.n_features, kCols);
  TORCH_CHECK(
      n_col_blocks <= std::numeric_limits<int32_t>::max(),
      "multiflow::sq_sum_accumulate_: too many features for one launch: ", p.n_features);

  float* acc_ptr = acc.mutable_data_ptr<float>();
  at::Tensor partial;
  float* out = acc_ptr;
  if (n_chunks > 1) {
    // Every (chunk, column) is written by exactly one block: no zeroing needed.
    partial = at::empty({n_chunks, p.n_features}, acc.options());
    out = partial.mutable_data_ptr<float>();
  }
  const bool* mask = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;

  const dim3 grid(static_cast<unsigned>(n_col_blocks), static_cast<unsigned>(n_chunks));
  const dim3 block(kCols, kRows);
  const auto launch = [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    sq_sum_chunks_kernel<scalar_t><<<grid, block, 0, stream>>>(
        p.x.const_data_ptr<scalar_t>(),
        p.row_stride,
        mask,
        p.n_tokens,
        p.n_features,
        chunk_tokens,
        out,
        /*add_into_out=*/n_chunks == 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (p.x.scalar_type()) {  // prepare_sq_sum has already rejected the rest
    case at::kFloat:
      launch(float{});
      break;
    case at::kHalf:
      launch(c10::Half{});
      break;
    case at::kBFloat16:
      launch(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "multiflow::sq_sum_accumulate_: no CUDA kernel for x of dtype ", p.x.scalar_type());
  }

  if (n_chunks > 1) {
    const auto reduce_blocks = static_cast<unsigned>(ceil_div(p.n_features, kReduceThreads));
    add_chunk_sums_kernel<<<reduce_blocks, kReduceThreads, 0, stream>>>(
        out, n_chunks, p.n_features, acc_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CUDA, m) {
  m.impl("sq_sum_accumulate_", &sq_sum_accumulate_cuda);
}

}  // namespace multiflow::cuda
