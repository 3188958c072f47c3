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
// to a partial buffer that a second kernel adds into acc in a fixed order. The
// chunking depends only on the shape, on whether x allows 16-byte loads and (on that
// path) on the GPU model, so repeated runs on one GPU agree bitwise.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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
constexpr int64_t kMinVecChunkTokens = 64;
constexpr int kBatch = 4;  // rows per load batch of the 16-byte path
constexpr int64_t kWaves = 2;  // full waves of resident blocks the 16-byte path aims for
constexpr int kFlush = 16;

// A running sum in two levels: terms go to `inner`, which is added to `outer` every kFlush
// steps, so that long runs keep the rounding error near that of torch's cascade sum.
struct TwoLevelSum {
  float outer = 0.0f;
  float inner = 0.0f;
  int steps = 0;
  __device__ __forceinline__ void step() {  // after each term (or skipped term)
    if (++steps == kFlush) {
      outer += inner;
      inner = 0.0f;
      steps = 0;
    }
  }
  __device__ __forceinline__ float total() const { return outer + inner; }
};

// A block of kR x kCols threads, thread (y, x) holding a partial sum of column x: thread
// (0, x) gets the column's total (the kR partials added in order y = 0, 1, ...); the other
// threads get 0.
template <int kR>
__device__ __forceinline__ float column_total(float (&sums)[kR][kCols], float partial) {
  sums[threadIdx.y][threadIdx.x] = partial;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.y == 0) {
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      total += sums[r][threadIdx.x];
    }
  }
  return total;
}

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

  TwoLevelSum s;  // over the thread's rows, a step per row (kept or not)
  if (col < n_features) {
#pragma unroll 4
    for (int64_t t = t0 + threadIdx.y; t < t1; t += kRows) {
      // Every lane of the warp reads the same mask byte: one broadcast load.
      if (mask == nullptr || mask[t]) {
        const float v = static_cast<float>(x[t * row_stride + col]);
        s.inner = fmaf(v, v, s.inner);
      }
      s.step();
    }
  }
  const float total = column_total(warp_sums, s.total());
  if (threadIdx.y == 0 && col < n_features) {
    if (add_into_out) {
      out[col] += total;  // one chunk: this block alone owns these columns of acc
    } else {
      out[static_cast<int64_t>(blockIdx.y) * n_features + col] = total;
    }
  }
}

// 16-byte loads: V = 16 / sizeof(scalar_t) consecutive features per thread (4 float32, 8
// float16 / bfloat16), so a warp reads 512 contiguous bytes of a row per load instead of
// 128 (float32) or 64 (16-bit). Used when x's data pointer is 16-byte aligned and both
// n_features and row_stride are multiples of V. Each thread keeps V two-level sums; a
// column's summation order is the one of sq_sum_chunks_kernel (a thread's rows in order,
// then the kRows warp sums in order).
template <typename scalar_t>
struct Vec16 {
  static constexpr int kWidth = 16 / sizeof(scalar_t);
};

__device__ __forceinline__ void unpack16(const uint4& raw, float (&v)[4], float /*tag*/) {
  v[0] = __uint_as_float(raw.x);
  v[1] = __uint_as_float(raw.y);
  v[2] = __uint_as_float(raw.z);
  v[3] = __uint_as_float(raw.w);
}

__device__ __forceinline__ void unpack16(const uint4& raw, float (&v)[8], c10::BFloat16 /*tag*/) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little endian: the lower half is the earlier element
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack16(const uint4& raw, float (&v)[8], c10::Half /*tag*/) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], sizeof(h));
    const float2 f = __half22float2(h);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kCols * kRows) sq_sum_chunks_vec_kernel(
    const scalar_t* __restrict__ x,
    int64_t row_stride,
    const bool* __restrict__ mask,
    int64_t n_tokens,
    int64_t n_features,
    int64_t chunk_tokens,
    float* __restrict__ out,
    bool add_into_out) {
  constexpr int V = Vec16<scalar_t>::kWidth;
  constexpr int kBlockCols = kCols * V;
  __shared__ float warp_sums[kRows][kBlockCols];

  const int64_t block_col0 = static_cast<int64_t>(blockIdx.x) * kBlockCols;
  const int64_t col0 = block_col0 + static_cast<int64_t>(threadIdx.x) * V;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * chunk_tokens;
  const int64_t t1 = min(n_tokens, t0 + chunk_tokens);

  float outer[V];
  float inner[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    outer[i] = 0.0f;
    inner[i] = 0.0f;
  }
  if (col0 < n_features) {  // n_features % V == 0: the whole vector is in range
    // kBatch rows per step, double buffered: the mask bytes and 16-byte vectors of the
    // next batch are loaded before the current batch is summed, so 4-8 loads are in
    // flight per thread (a branch per row would wait for each load in turn; without
    // the second buffer the compiler interleaves loads and uses, 2 in flight). A row
    // that is masked out or past the chunk loads nothing and counts as zeros:
    // fmaf(0, 0, s) == s exactly, so the sums are those of skipping it.
    static_assert(kFlush % kBatch == 0, "a flush falls between batches");
    const auto load_batch = [&](int64_t t, uint4 (&raw)[kBatch]) {
      bool keep[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int64_t tb = t + b * kRows;
        keep[b] = tb < t1 && (mask == nullptr || mask[tb]);
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        raw[b] = keep[b] ? __ldg(reinterpret_cast<const uint4*>(x + (t + b * kRows) * row_stride + col0))
                         : make_uint4(0u, 0u, 0u, 0u);
      }
    };
    int rows = 0;
    int64_t t = t0 + threadIdx.y;
    uint4 cur[kBatch];
    load_batch(t, cur);
    for (; t < t1; t += kRows * kBatch) {
      uint4 next[kBatch];
      load_batch(t + kRows * kBatch, next);  // all predicated off past the chunk
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        float v[V];
        unpack16(cur[b], v, scalar_t{});
#pragma unroll
        for (int i = 0; i < V; ++i) {
          inner[i] = fmaf(v[i], v[i], inner[i]);
        }
        cur[b] = next[b];
      }
      rows += kBatch;
      if (rows == kFlush) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          outer[i] += inner[i];
          inner[i] = 0.0f;
        }
        rows = 0;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    warp_sums[threadIdx.y][threadIdx.x * V + i] = outer[i] + inner[i];
  }
  __syncthreads();

  for (int c = threadIdx.y * kCols + threadIdx.x; c < kBlockCols; c += kCols * kRows) {
    const int64_t col = block_col0 + c;
    if (col < n_features) {
      float total = 0.0f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        total += warp_sums[r][c];
      }
      if (add_into_out) {
        out[col] += total;
      } else {
        out[static_cast<int64_t>(blockIdx.y) * n_features + col] = total;
      }
    }
  }
}

// acc[j] += the sum over chunks c of partial[c, j]: kSumRows threads per column, thread y
// summing chunks y, y + kSumRows, ... in order (two-level), then thread 0 adding the
// kSumRows sums in order: a fixed order (deterministic), and about n_chunks / kSumRows
// dependent loads per thread instead of n_chunks.
constexpr int kSumRows = 32;

__global__ void __launch_bounds__(kCols * kSumRows) add_chunk_sums_kernel(
    const float* __restrict__ partial,
    int64_t n_chunks,
    int64_t n_features,
    float* __restrict__ acc) {
  __shared__ float sums[kSumRows][kCols];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  TwoLevelSum s;
  if (col < n_features) {
    for (int64_t c = threadIdx.y; c < n_chunks; c += kSumRows) {
      s.inner += partial[c * n_features + col];
      s.step();
    }
  }
  const float total = column_total(sums, s.total());
  if (threadIdx.y == 0 && col < n_features) {
    acc[col] += total;
  }
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

  // The 16-byte path when x's layout allows it (see sq_sum_chunks_vec_kernel).
  const int64_t width = 16 / static_cast<int64_t>(p.x.element_size());
  const bool vec = reinterpret_cast<std::uintptr_t>(p.x.const_data_ptr()) % 16 == 0 &&
      p.n_features % width == 0 && p.row_stride % width == 0;
  const int64_t n_col_blocks = ceil_div(p.n_features, kCols * (vec ? width : 1));
  TORCH_CHECK(
      n_col_blocks <= std::numeric_limits<int32_t>::max(),
      "multiflow::sq_sum_accumulate_: too many features for one launch: ", p.n_features);
  float* acc_ptr = acc.mutable_data_ptr<float>();
  const bool* mask = p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr;

  const auto run = [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const auto kernel = vec ? sq_sum_chunks_vec_kernel<scalar_t> : sq_sum_chunks_kernel<scalar_t>;
    // Chunks: at least kMinChunkTokens tokens and at most kMaxChunks. On the 16-byte path
    // (whose blocks cover `width` times more columns) chunks of at least
    // kMinVecChunkTokens tokens, as many as make about kWaves full waves of resident
    // blocks on this GPU (a partial last wave runs latency bound). The chunking, and so
    // the rounding, depends on the shape, the layout and the GPU model: repeated calls
    // on one GPU agree bitwise.
    int64_t chunk_tokens = std::max(kMinChunkTokens, ceil_div(p.n_tokens, kMaxChunks));
    if (vec) {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kCols * kRows, 0));
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const int64_t target_blocks = kWaves * sms * std::max(per_sm, 1);
      const int64_t want_chunks = std::clamp<int64_t>(target_blocks / n_col_blocks, 1, kMaxChunks);
      chunk_tokens =
          std::max({kMinVecChunkTokens, ceil_div(p.n_tokens, want_chunks), ceil_div(p.n_tokens, kMaxChunks)});
    }
    const int64_t n_chunks = ceil_div(p.n_tokens, chunk_tokens);
    at::Tensor partial;
    float* out = acc_ptr;
    if (n_chunks > 1) {
      // Every (chunk, column) is written by exactly one block: no zeroing needed.
      partial = at::empty({n_chunks, p.n_features}, acc.options());
      out = partial.mutable_data_ptr<float>();
    }
    const dim3 grid(static_cast<unsigned>(n_col_blocks), static_cast<unsigned>(n_chunks));
    kernel<<<grid, dim3(kCols, kRows), 0, stream>>>(
        p.x.const_data_ptr<scalar_t>(),
        p.row_stride,
        mask,
        p.n_tokens,
        p.n_features,
        chunk_tokens,
        out,
        /*add_into_out=*/n_chunks == 1);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (n_chunks > 1) {
      const auto reduce_blocks = static_cast<unsigned>(ceil_div(p.n_features, static_cast<int64_t>(kCols)));
      add_chunk_sums_kernel<<<reduce_blocks, dim3(kCols, kSumRows), 0, stream>>>(
          out, n_chunks, p.n_features, acc_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  switch (p.x.scalar_type()) {  // prepare_sq_sum has already rejected the rest
    case at::kFloat:
      run(float{});
      break;
    case at::kHalf:
      run(c10::Half{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "multiflow::sq_sum_accumulate_: no CUDA kernel for x of dtype ", p.x.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CUDA, m) {
  m.impl("sq_sum_accumulate_", &sq_sum_accumulate_cuda);
}

}  // namespace multiflow::cuda
