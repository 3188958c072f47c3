// sparse24_pack / sparse24_unpack / sparse24_linear on CUDA.
//
// The format (csrc/sparse24.h): values (out, in / 2) hold the two kept weights of
// every 4-column chunk; metadata int16 (out, ceil(in / 16)) holds, per 16 columns of a
// row, the 2-bit positions of those values, exactly the 16-bit half-registers that
// mma.sp.m16n8k32 reads.
//
// pack / unpack: one thread per metadata word (16 columns of one row), grid-stride.
// pack records rows whose mask keeps more than 2 of 4 in a per-row flag; the host
// reads the flags once (one sync: packing is a one-time conversion) and raises a
// ValueError naming the rows; the outputs are then dropped.
//
// sparse24_linear, y = x @ W.T + bias, dispatched on the number of rows m of x:
//
//  * m < kRowsTensorCoresFrom (the memory-bound regime, any dtype): one warp per
//    output row (also the fallback below, in blocks of kRowsGemv rows of x).
//    Lane L reads metadata words L, L + 32, ... of the row and their 8 values each
//    (a warp reads 32 consecutive words: 64 bytes of metadata and 32 * 8 values,
//    contiguous), decodes the positions in registers, gathers the matching
//    elements of x (L1/L2-resident: x is small in this regime) and accumulates
//    up to kRowsGemv rows of x in float32 registers; a warp shuffle reduction
//    ends the row. The weight is read once, about 0.56x the dense fp16 bytes.
//    MULTIFLOW_SPARSE24_GEMV=half gives each row a half-warp instead (two rows per
//    warp, half the warps: on 11008x4096 the warp-per-row grid needs ~1.7 waves of
//    an H200 at this kernel's occupancy); compiled for sm_80 / sm_90 but not yet run
//    on a GPU, so not the default.
//
//  * m >= kRowsTensorCoresFrom, float16 / bfloat16, in % 16 == 0, 16-byte aligned, sm_80+:
//    sparse tensor cores. W is operand A of mma.sp.m16n8k32 (16 output features by
//    32 input columns, stored as 16 x 16 kept values), x^T is operand B (32 columns
//    by 8 tokens). A block of 4 warps computes a 64 (features) x 64 (tokens) tile of
//    y^T, each warp 32 x 32 (2 x 4 mma tiles), k in steps of 32 columns. Values and x
//    are copied to shared memory with cp.async, double buffered; the metadata words
//    of rows g and g + 8 are joined into one 32-bit register per lane (lanes 4g and
//    4g + 1 hold columns 0-15 and 16-31 of the k-step: sparsity selector 0).
//    Padding (rows past out, tokens past m, columns past in) is zero-filled, and its
//    metadata set to positions (0, 1), a valid pattern.
//
//    MULTIFLOW_SPARSE24_GEMM=tile128 runs linear_mma128_kernel instead (128 x 128
//    tiles, ldmatrix, a 3-stage pipeline; see there), =wgmma linear_wgmma_kernel (the
//    same tiles on Hopper's warpgroup wgmma.mma_async.sp; sm_90a builds only): compiled,
//    not yet run on a GPU, so not the default.
//
//  * anything else (float32 with many rows: the 2:4 tensor-core path is for 16-bit
//    types; unaligned shapes; GPUs older than sm_80): the warp-per-row kernel over
//    blocks of kRowsGemv rows of x, reading the weight once per block. Correct, not
//    fast. No path decodes to dense: each multiplies only the positions the metadata
//    names (an inf / NaN of x at a position a row does not name never reaches that
//    row, as on CPU; zero-filled positions are named).
//
// Determinism: no atomics; every output element is summed by one thread (or one
// warp, in a fixed shuffle order).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <sstream>
#include <string>

#include "ceil_div.h"
#include "cuda/cp_async.cuh"
#include "cuda/env_switch.h"
#include "dtypes.h"
#include "format_args.h"
#include "sparse24.h"

namespace multiflow::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlocksPerSm = 32;
// Rows of x per launch of the warp-per-row kernel (its float32 accumulators per lane).
constexpr int64_t kRowsGemv = 16;
// Rows of x up to which sparse24_linear runs the warp-per-row kernel when the
// tensor-core path could take them. Measured on an H200 (fp16, 2026-11-28,
// benchmarks/RESULTS.md): the warp kernel's time grows faster than m (4096x4096: 0.017
// ms at 1 row, 0.039 at 4, 0.215 at 16; 11008x4096: 0.030, 0.098, 0.424), while mma.sp
// at 64 rows took 0.063 / 0.077 ms (a 64-token tile costs the same for 5 rows as for 64).
constexpr int64_t kRowsTensorCoresFrom = 5;
// A metadata word whose 4 chunks all name positions (0, 1): 0b0100 per chunk.
constexpr uint32_t kFillerWord = 0x4444u;

int64_t grid_for(int64_t items, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, static_cast<int64_t>(threads)), sms * kBlocksPerSm));
}

// Metadata word i of a (rows, words) table: its row, first column and how many of
// its 4 chunks lie inside the row (fewer only in a row's last word, in % 16 != 0).
struct WordAt {
  int64_t r;
  int64_t c0;
  int chunks;
};

__device__ __forceinline__ WordAt word_at(int64_t i, int64_t words, int64_t cols) {
  const int64_t r = i / words;
  const int64_t c0 = (i % words) * kSparse24WordCols;
  return {r, c0, static_cast<int>((cols - c0) / 4 < 4 ? (cols - c0) / 4 : 4)};
}

// ---- pack / unpack: one thread per (row, metadata word).

template <typename raw_t>
__global__ void pack_kernel(
    const raw_t* __restrict__ weight,
    const uint8_t* __restrict__ mask,
    raw_t* __restrict__ values,
    int16_t* __restrict__ metadata,
    int32_t* __restrict__ bad_rows,
    int64_t rows,
    int64_t cols,
    int64_t words) {
  const int64_t half = cols / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [r, c0, chunks] = word_at(i, words, cols);
    uint32_t word = 0;
    for (int q = 0; q < chunks; ++q) {
      const int64_t base = r * cols + c0 + 4 * q;
      int pos[2] = {0, 0};
      int kept = 0;
      for (int j = 0; j < 4; ++j) {
        if (mask[base + j] != 0) {
          if (kept < 2) {
            pos[kept] = j;
          }
          ++kept;
        }
      }
      if (kept > 2) {
        bad_rows[r] = 1;
        kept = 2;
      }
      raw_t v[2] = {0, 0};
      for (int k = 0; k < kept; ++k) {
        v[k] = weight[base + pos[k]];
      }
      // Fill up with the lowest unused positions (value 0), keeping pos[0] < pos[1].
      for (int j = 0; kept < 2; ++j) {
        if (kept == 1 && pos[0] == j) {
          continue;
        }
        pos[kept] = j;
        v[kept] = 0;
        ++kept;
      }
      if (pos[0] > pos[1]) {
        const int tp = pos[0];
        pos[0] = pos[1];
        pos[1] = tp;
        const raw_t tv = v[0];
        v[0] = v[1];
        v[1] = tv;
      }
      const int64_t out = r * half + c0 / 2 + 2 * q;
      values[out] = v[0];
      values[out + 1] = v[1];
      word |= static_cast<uint32_t>(pos[0] | (pos[1] << 2)) << (4 * q);
    }
    metadata[i] = static_cast<int16_t>(static_cast<uint16_t>(word));
  }
}

template <typename raw_t>
__global__ void unpack_kernel(
    const raw_t* __restrict__ values,
    const int16_t* __restrict__ metadata,
    raw_t* __restrict__ dense,
    int64_t rows,
    int64_t cols,
    int64_t words) {
  const int64_t half = cols / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [r, c0, chunks] = word_at(i, words, cols);
    const uint32_t word = static_cast<uint16_t>(metadata[i]);
    for (int q = 0; q < chunks; ++q) {
      raw_t out[4] = {0, 0, 0, 0};
      const uint32_t nib = (word >> (4 * q)) & 0xFu;
      const int64_t v = r * half + c0 / 2 + 2 * q;
      // A corrupt nibble with equal positions keeps the second value (as on CPU).
      out[nib & 3u] = values[v];
      out[(nib >> 2) & 3u] = values[v + 1];
      raw_t* dst = dense + r * cols + c0 + 4 * q;
      for (int j = 0; j < 4; ++j) {
        dst[j] = out[j];
      }
    }
  }
}

// ---- linear, few rows: one warp per output row.

template <typename scalar_t>
__device__ __forceinline__ float to_float(scalar_t v) {
  return static_cast<float>(v);
}

// The 8 values of one metadata word (16 columns): one 16-byte load for 16-bit
// types (two for float32) where aligned, else element by element.
template <typename scalar_t>
__device__ __forceinline__ void load8(const scalar_t* p, bool vec, int n, float (&v)[8]) {
  if (vec) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(scalar_t));
#pragma unroll
    for (int h = 0; h < 8 / kPer; ++h) {
      alignas(16) scalar_t tmp[kPer];
      *reinterpret_cast<uint4*>(tmp) = __ldg(reinterpret_cast<const uint4*>(p) + h);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        v[h * kPer + k] = to_float(tmp[k]);
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      v[k] = k < n ? to_float(p[k]) : 0.f;
    }
  }
}

// kLanes lanes per output row: 32 (a warp, the default) or 16 (two rows per warp,
// MULTIFLOW_SPARSE24_GEMV=half: half the warps, for layers whose warp-per-row grid
// takes more than one wave of the GPU; not yet measured, see sparse24_gemv_lanes).
template <typename scalar_t, int kM, int kLanes>
__global__ void linear_gemv_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ values,
    const int16_t* __restrict__ metadata,
    const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ y,
    int64_t m,
    int64_t rows,
    int64_t cols,
    bool vec) {
  static_assert(kLanes == 32 || kLanes == 16, "a row takes a warp or a half-warp");
  constexpr int kRowsPerWarp = 32 / kLanes;
  const int lane = threadIdx.x & 31;
  const int sub = lane & (kLanes - 1);  // the lane within its row's group
  const int64_t words = (cols + kSparse24WordCols - 1) / kSparse24WordCols;
  const int64_t half = cols / 2;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  // Warp-uniform loop over the warp's rows (all lanes reach the shuffles below).
  for (int64_t r0 = ((blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5) * kRowsPerWarp; r0 < rows;
       r0 += warps * kRowsPerWarp) {
    const int64_t r = r0 + lane / kLanes;
    const bool live = r < rows;
    float acc[kM];
#pragma unroll
    for (int mi = 0; mi < kM; ++mi) {
      acc[mi] = 0.f;
    }
    const scalar_t* vrow = values + (live ? r : 0) * half;
    const int16_t* mrow = metadata + (live ? r : 0) * words;
    for (int64_t wd = sub; live && wd < words; wd += kLanes) {
      const uint32_t word = static_cast<uint16_t>(__ldg(mrow + wd));
      const int64_t c0 = wd * kSparse24WordCols;
      const int chunks = static_cast<int>((cols - c0) / 4 < 4 ? (cols - c0) / 4 : 4);
      float v[8];
      load8(vrow + c0 / 2, vec, 2 * chunks, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (q < chunks) {
          const int64_t c = c0 + 4 * q;
          const int i0 = static_cast<int>((word >> (4 * q)) & 3u);
          const int i1 = static_cast<int>((word >> (4 * q + 2)) & 3u);
#pragma unroll
          for (int mi = 0; mi < kM; ++mi) {
            if (mi < m) {
              const scalar_t* xr = x + mi * cols + c;
              acc[mi] = fmaf(v[2 * q], to_float(xr[i0]), acc[mi]);
              acc[mi] = fmaf(v[2 * q + 1], to_float(xr[i1]), acc[mi]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int mi = 0; mi < kM; ++mi) {
      float s = acc[mi];
#pragma unroll
      for (int off = kLanes / 2; off > 0; off >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, off);
      }
      if (sub == 0 && live && mi < m) {
        if (bias != nullptr) {
          s += to_float(bias[r]);
        }
        y[mi * rows + r] = static_cast<scalar_t>(s);
      }
    }
  }
}

// ---- linear, many rows: mma.sp on sparse tensor cores (float16 / bfloat16).

constexpr int kTileOut = 64;   // output features per block
constexpr int kTileTok = 64;   // tokens (rows of x) per block
constexpr int kStepCols = 32;  // input columns per k-step (16 kept values per row)
constexpr int kMmaThreads = 128;
// Shared-memory row strides in elements, padded so the fragment loads of the 8
// lane groups fall in distinct banks.
constexpr int kAStride = 24;  // 16 values + 8
constexpr int kXStride = 40;  // 32 columns + 8

template <typename scalar_t>
struct MmaTiles {
  scalar_t a[2][kTileOut * kAStride];
  scalar_t x[2][kTileTok * kXStride];
  uint16_t meta[2][kTileOut * 2];
};

template <bool kBf16>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBf16) {
    asm volatile(
        "mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  } else {
    asm volatile(
        "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
  }
#else
  __trap();
#endif
}

// Preconditions (checked on the host): cols % 16 == 0; values, x 16-byte aligned.
template <typename scalar_t, bool kBf16>
__global__ void __launch_bounds__(kMmaThreads) linear_mma_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ values,
    const int16_t* __restrict__ metadata,
    const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ y,
    int64_t m,
    int64_t rows,
    int64_t cols,
    int steps) {  // ceil(cols / kStepCols)
  __shared__ __align__(16) MmaTiles<scalar_t> s;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;  // group of 4 lanes
  const int t = lane & 3;   // lane in the group
  const int wo = (warp & 1) * 32;   // warp's features in the tile
  const int wt = (warp >> 1) * 32;  // warp's tokens in the tile
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTileTok;  // x: tokens, up to 2^31 - 1 tiles
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTileOut;  // y: features, up to 65535 tiles
  const int64_t half = cols / 2;
  const int64_t words = cols / kSparse24WordCols;

  auto load_step = [&](int stage, int step) {
    const int64_t k0 = static_cast<int64_t>(step) * kStepCols;
    {  // values: 64 rows x 16 kept = 128 pieces of 16 bytes, one per thread
      const int row = tid >> 1;
      const int part = tid & 1;
      const int64_t gr = o0 + row;
      const int64_t gc = k0 / 2 + 8 * part;
      const bool ok = gr < rows && gc < half;
      cp_async16(&s.a[stage][row * kAStride + 8 * part], ok ? values + gr * half + gc : values, ok);
    }
#pragma unroll
    for (int p = 0; p < 2; ++p) {  // x: 64 tokens x 32 columns = 256 pieces, two per thread
      const int piece = tid + p * kMmaThreads;
      const int tok = piece >> 2;
      const int part = piece & 3;
      const int64_t gt = t0 + tok;
      const int64_t gc = k0 + 8 * part;
      const bool ok = gt < m && gc < cols;
      cp_async16(&s.x[stage][tok * kXStride + 8 * part], ok ? x + gt * cols + gc : x, ok);
    }
    {  // metadata: 64 rows x 2 words, plain loads; padding gets the filler pattern
      const int row = tid >> 1;
      const int j = tid & 1;
      const int64_t gr = o0 + row;
      const int64_t wd = k0 / kSparse24WordCols + j;
      s.meta[stage][row * 2 + j] =
          (gr < rows && wd < words) ? static_cast<uint16_t>(metadata[gr * words + wd]) : static_cast<uint16_t>(kFillerWord);
    }
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc[i][j][k] = 0.f;
      }
    }
  }

  load_step(0, 0);
  cp_async_commit();
  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1;
    if (step + 1 < steps) {
      load_step(stage ^ 1, step + 1);
    }
    cp_async_commit();  // possibly empty: keeps "wait for all but the newest" uniform
    cp_async_wait_one();
    __syncthreads();

    const scalar_t* as = s.a[stage];
    const scalar_t* xs = s.x[stage];
    const uint16_t* ms = s.meta[stage];
    uint32_t a[2][4];
    uint32_t e[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = wo + 16 * i + g;
      a[i][0] = *reinterpret_cast<const uint32_t*>(as + r * kAStride + 2 * t);
      a[i][1] = *reinterpret_cast<const uint32_t*>(as + (r + 8) * kAStride + 2 * t);
      a[i][2] = *reinterpret_cast<const uint32_t*>(as + r * kAStride + 2 * t + 8);
      a[i][3] = *reinterpret_cast<const uint32_t*>(as + (r + 8) * kAStride + 2 * t + 8);
      e[i] = static_cast<uint32_t>(ms[r * 2 + (t & 1)]) | (static_cast<uint32_t>(ms[(r + 8) * 2 + (t & 1)]) << 16);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const scalar_t* xr = xs + (wt + 8 * j + g) * kXStride + 2 * t;
      uint32_t b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        b[q] = *reinterpret_cast<const uint32_t*>(xr + 8 * q);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mma_sp<kBf16>(acc[i][j], a[i], b, e[i]);
      }
    }
    __syncthreads();
  }

  // Epilogue: acc[i][j] = y^T rows (features) wo + 16 i + g (+8), columns (tokens)
  // wt + 8 j + 2 t (+1).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t o = o0 + wo + 16 * i + g + 8 * h;
      if (o >= rows) {
        continue;
      }
      const float bo = bias != nullptr ? to_float(bias[o]) : 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t tok = t0 + wt + 8 * j + 2 * t + c;
          if (tok < m) {
            y[tok * rows + o] = static_cast<scalar_t>(acc[i][j][2 * h + c] + bo);
          }
        }
      }
    }
  }
}

// ---- the 128 x 128 tile GEMM (MULTIFLOW_SPARSE24_GEMM=tile128; opt-in, compiled for
// sm_80 / sm_90, not yet run on a GPU).
//
// The 64 x 64 kernel above reaches 130-186 TFLOP/s on an H200 against ~750 for cuBLAS
// dense: per 32-column k-step a warp issues 24 four-byte shared loads for 8 mma.sp, and a
// block streams 6 KiB a step with one copy in flight. This one follows the usual sm_80
// GEMM shape: a block of 8 warps computes a 128 (features) x 128 (tokens) tile of y^T,
// each warp 64 x 32 (4 x 4 mma tiles: 16 mma.sp per 32 columns), fragments loaded with
// ldmatrix.x4 (8 per 32 columns), k in stages of 64 columns, a 3-stage cp.async
// pipeline (87 KiB of dynamic shared memory, 2 blocks per SM on sm_90). The metadata
// words are read into registers one stage ahead (plain loads: a row's words need not be
// 4-byte aligned) and stored to shared memory after the stage's math. The output tile
// is staged through shared memory and written in 16-byte pieces when out % 8 == 0.
// Blocks walk the feature tiles first, so the blocks in flight share a few token tiles
// of x and read the weight (half the dense bytes, L2-resident on the shapes we target)
// from L2. Same fragment layouts and metadata pairing as the 64 x 64 kernel; the same
// zero-fill / filler padding.
namespace tile128 {
constexpr int kOut = 128;                               // features per block
constexpr int kTok = 128;                               // tokens per block
constexpr int kK = 64;                                  // input columns per stage
constexpr int kVals = kK / 2;                           // kept values per row per stage
constexpr int kWords = kK / kSparse24WordCols;          // metadata words per row per stage
constexpr int kStages = 3;
constexpr int kBlockThreads = 256;
constexpr int kAPitch = kVals + 8;   // 80-byte rows: the 8 rows an ldmatrix reads hit distinct banks
constexpr int kXPitch = kK + 8;      // 144-byte rows: likewise
constexpr int kYPitch = kOut + 8;    // the epilogue tile's rows
template <typename scalar_t>
struct Layout {
  static constexpr int kABytes = kOut * kAPitch * static_cast<int>(sizeof(scalar_t));
  static constexpr int kXBytes = kTok * kXPitch * static_cast<int>(sizeof(scalar_t));
  static constexpr int kMetaBytes = kOut * kWords * 2;
  static constexpr int kStageBytes = kABytes + kXBytes + kMetaBytes;
  static constexpr int kBytes = kStages * kStageBytes;
  static_assert(kABytes % 16 == 0 && kXBytes % 16 == 0 && kStageBytes % 16 == 0, "16-byte aligned pieces");
  static_assert(kTok * kYPitch * static_cast<int>(sizeof(scalar_t)) <= kBytes, "the epilogue tile fits");
};
static_assert(kStages == 3, "cp_async_wait_one waits for all but the newest group: kStages - 2 == 1");
}  // namespace tile128

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// ldmatrix.x4: lane l gives the shared address of row (l & 7) of 8x8 matrix l >> 3; r[q]
// receives, in lane l, row l >> 2, elements 2 (l & 3) and + 1 of matrix q.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], unsigned addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#else
  __trap();
#endif
}

// The metadata of the 128 x 128 tile kernels' stages (128 rows, 64 columns: 4 words a row).
// Thread tid (of 256) holds words 2 (tid & 1) and + 1 of row tid >> 1. read() loads them
// from a valid address whatever the bounds, into two registers (joining them there would
// wait for the loads before the stage's math); pair() puts the filler pattern on padding;
// store() writes them pre-paired: the u32 at ((r >> 4) * 4 + w) * 8 + (r & 7) of a stage's
// metadata tile holds word w of rows r (low half) and r + 8 (high half) of each 16-row mma
// tile, one e register (e()).
struct StageMeta {
  static constexpr int kWords = 4;
  int word;            // the first of the thread's two words in a stage
  bool ok;             // the thread's row exists
  int words;           // words per row of the matrix
  const int16_t* src;  // the thread's row (row 0 when it does not exist)
  int at;              // the thread's first half-word in a stage's tile

  __device__ StageMeta(const int16_t* metadata, int64_t o0, int rows_here, int words_in_row, int tid)
      : word(2 * (tid & 1)),
        ok((tid >> 1) < rows_here),
        words(words_in_row),
        src(metadata + (ok ? (o0 + (tid >> 1)) * static_cast<int64_t>(words_in_row) : 0)),
        at(((tid >> 5) * kWords + word) * 16 + ((tid >> 1) & 7) * 2 + ((tid >> 4) & 1)) {}

  __device__ int2 read(int step) const {
    const int wd = step * kWords + word;
    return make_int2(__ldg(src + (wd < words ? wd : 0)), __ldg(src + (wd + 1 < words ? wd + 1 : 0)));
  }

  __device__ uint32_t pair(int step, int2 raw) const {
    const int wd = step * kWords + word;
    const uint32_t lo = ok && wd < words ? static_cast<uint16_t>(raw.x) : kFillerWord;
    const uint32_t hi = ok && wd + 1 < words ? static_cast<uint16_t>(raw.y) : kFillerWord;
    return lo | (hi << 16);
  }

  __device__ void store(uint16_t* tile, uint32_t pair) const {  // words `word` and + 1: 16 halves apart
    tile[at] = static_cast<uint16_t>(pair & 0xffffu);
    tile[at + 16] = static_cast<uint16_t>(pair >> 16);
  }

  // The e register of lane (g, t) for the 16-row mma tile `tile16`, 32-column half u of a
  // stage: rows g (low half) and g + 8 (high half), word 2 u + (t & 1).
  __device__ static uint32_t e(const uint16_t* tile, int tile16, int u, int g, int t) {
    return reinterpret_cast<const uint32_t*>(tile)[(tile16 * kWords + 2 * u + (t & 1)) * 8 + g];
  }
};

// The kept values of the 128 x 128 tile kernels' stages: 128 rows x 32 values (64
// columns), rows kAPitch values apart in shared memory. Thread tid (of 256) copies the
// 16-byte pieces (8 values) of rows row + 64 p, values 8 part .. of each stage, from a
// per-thread pointer with 32-bit offsets (the host sends only cols < 2^24); rows past the
// matrix and columns past cols are zero-filled.
template <typename scalar_t>
struct StageValues {
  static constexpr int kRows = 128;
  static constexpr int kVals = 32;
  static constexpr int kAPitch = kVals + 8;  // 80-byte rows: the 8 rows an ldmatrix reads hit distinct banks
  static constexpr int kThreads = 256;
  static constexpr int kPieces = (kRows * kVals / 8) / kThreads;
  static constexpr int kRowStep = kThreads / (kVals / 8);
  int row;                // the thread's first row in the tile
  int part;               // its piece in a row
  int rows_here;          // rows of the tile inside the matrix
  int stride;             // values between the thread's rows
  const scalar_t* base;   // values: the address a zero-filled piece names
  const scalar_t* src;    // its first row (row 0 of the tile when it does not exist)
  unsigned dst;           // its first piece's byte offset in a stage's values tile

  __device__ StageValues(const scalar_t* values, int64_t o0, int rows_in_tile, int half, int tid)
      : row(tid / (kVals / 8)),
        part(tid % (kVals / 8)),
        rows_here(rows_in_tile),
        stride(kRowStep * half),
        base(values),
        src(values + (o0 + (row < rows_in_tile ? row : 0)) * static_cast<int64_t>(half) + 8 * part),
        dst(static_cast<unsigned>((row * kAPitch + 8 * part) * sizeof(scalar_t))) {}

  // The copies of the stage of columns k0 .. (cols_left = cols - k0) into the values tile at
  // shared address tile.
  __device__ void copy(unsigned tile, int k0, int cols_left) const {
#pragma unroll
    for (int p = 0; p < kPieces; ++p) {
      const bool ok = 16 * part < cols_left && row + kRowStep * p < rows_here;
      cp_async16_at(tile + dst + static_cast<unsigned>(kRowStep * p * kAPitch * sizeof(scalar_t)),
                    ok ? src + (p * stride + k0 / 2) : base, ok);
    }
  }
};

// The 128 x 128 tile kernels' output: the tile of y^T staged in shared memory as
// ys[token][kPitch] (features contiguous) written to y (m x rows, row-major) by the block's
// 256 threads: 16-byte pieces of 8 features when vec_out (rows % 8 == 0: a piece is all
// inside or all outside), else one element each; nothing past m or rows.
template <typename scalar_t, int kPitch>
__device__ __forceinline__ void write_tile(const scalar_t* ys, scalar_t* __restrict__ y, int64_t m, int64_t rows,
                                           int64_t t0, int64_t o0, int tid, bool vec_out) {
  constexpr int kTile = 128;
  constexpr int kThreads = 256;
  if (vec_out) {
#pragma unroll
    for (int p = 0; p < (kTile * kTile / 8) / kThreads; ++p) {
      const int piece = tid + p * kThreads;
      const int tl = piece >> 4;
      const int part = piece & 15;
      const int64_t tok = t0 + tl;
      const int64_t o = o0 + 8 * part;
      if (tok < m && o < rows) {
        *reinterpret_cast<int4*>(y + tok * rows + o) = *reinterpret_cast<const int4*>(ys + tl * kPitch + 8 * part);
      }
    }
  } else {
    for (int p = 0; p < (kTile * kTile) / kThreads; ++p) {
      const int piece = tid + p * kThreads;
      const int tl = piece / kTile;
      const int ol = piece % kTile;
      const int64_t tok = t0 + tl;
      const int64_t o = o0 + ol;
      if (tok < m && o < rows) {
        y[tok * rows + o] = ys[tl * kPitch + ol];
      }
    }
  }
}

// Preconditions: cols % 16 == 0, values and x 16-byte aligned (checked on the host); y
// 16-byte aligned (a fresh at::empty); cols < 2^24; gridDim.x = feature_tiles * token tiles,
// feature tiles first.
template <typename scalar_t, bool kBf16>
__global__ void __launch_bounds__(tile128::kBlockThreads, 2) linear_mma128_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ values,
    const int16_t* __restrict__ metadata,
    const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ y,
    int64_t m,
    int64_t rows,
    int64_t cols,
    int steps,              // ceil(cols / kK)
    int64_t feature_tiles,  // ceil(rows / kOut)
    bool vec_out) {         // rows % 8 == 0: 16-byte output pieces
  using namespace tile128;
  using L = Layout<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int wo = (warp & 1) * 64;   // warp's features in the tile
  const int wt = (warp >> 1) * 32;  // warp's tokens in the tile
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) % feature_tiles) * kOut;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) / feature_tiles) * kTok;
  const int half = static_cast<int>(cols / 2);  // cols < 2^24 (host)
  const int words = static_cast<int>(cols / kSparse24WordCols);

  auto a_tile = [&](int stage) { return reinterpret_cast<scalar_t*>(smem + stage * L::kStageBytes); };
  auto x_tile = [&](int stage) { return reinterpret_cast<scalar_t*>(smem + stage * L::kStageBytes + L::kABytes); };
  auto m_tile = [&](int stage) {
    return reinterpret_cast<uint16_t*>(smem + stage * L::kStageBytes + L::kABytes + L::kXBytes);
  };

  // The thread's copies, the same at every step: the values (StageValues); x pieces (8
  // columns) of tokens x_row + 32 p, part x_part, from a per-thread pointer with 32-bit
  // offsets (the host sends only cols < 2^24).
  static_assert(kVals == StageValues<scalar_t>::kVals && kAPitch == StageValues<scalar_t>::kAPitch &&
                kOut == StageValues<scalar_t>::kRows && kBlockThreads == StageValues<scalar_t>::kThreads,
                "StageValues' tile");
  constexpr int kXPieces = (kTok * kK / 8) / kBlockThreads;
  constexpr int kXRowStep = kBlockThreads / (kK / 8);
  const int x_row = tid / (kK / 8);
  const int x_part = tid % (kK / 8);
  const int rows_here = static_cast<int>(rows - o0 < kOut ? rows - o0 : kOut);  // >= 1
  const int toks_here = static_cast<int>(m - t0 < kTok ? m - t0 : kTok);      // >= 1
  const StageValues<scalar_t> vals(values, o0, rows_here, half, tid);
  const int x_stride = kXRowStep * static_cast<int>(cols);
  // Token x_row of the tile, clamped into the matrix (used only when it exists).
  const scalar_t* x_src = x + (t0 + (x_row < toks_here ? x_row : 0)) * cols + 8 * x_part;
  const unsigned smem0 = smem_addr(smem);
  const unsigned x_dst = smem0 + L::kABytes + static_cast<unsigned>((x_row * kXPitch + 8 * x_part) * sizeof(scalar_t));

  auto copy_tiles = [&](int stage, int step) {
    const int k0 = step * kK;
    const int cols_left = static_cast<int>(cols) - k0;
    const unsigned at = static_cast<unsigned>(stage * L::kStageBytes);
    vals.copy(smem0 + at, k0, cols_left);
#pragma unroll
    for (int p = 0; p < kXPieces; ++p) {
      const bool ok = 8 * x_part < cols_left && x_row + kXRowStep * p < toks_here;
      cp_async16_at(x_dst + at + static_cast<unsigned>(kXRowStep * p * kXPitch * sizeof(scalar_t)),
                    ok ? x_src + (p * x_stride + k0) : x, ok);
    }
  };
  static_assert(kWords == StageMeta::kWords && kOut == 128 && kBlockThreads == 256, "StageMeta's tile");
  const StageMeta meta(metadata, o0, rows_here, words, tid);

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc[i][j][k] = 0.f;
      }
    }
  }

  // Prologue: stages 0 .. kStages - 2 (one commit group each, possibly empty).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) {
      copy_tiles(s, s);
      meta.store(m_tile(s), meta.pair(s, meta.read(s)));
    }
    cp_async_commit();
  }

  for (int step = 0; step < steps; ++step) {
    // Group `step` holds this stage's copies; one newer group may stay in flight.
    cp_async_wait_one();
    // Every thread's copies of this stage have landed and every thread is done with
    // stage (step - 1) % kStages, which is refilled next.
    __syncthreads();
    const int next = step + kStages - 1;
    const int refill = next % kStages;
    int2 raw = make_int2(0, 0);
    if (next < steps) {
      copy_tiles(refill, next);
      raw = meta.read(next);  // in flight during the math below
    }
    cp_async_commit();

    const int stage = step % kStages;
    const unsigned as = smem_addr(a_tile(stage));
    const unsigned xs = smem_addr(x_tile(stage));
#pragma unroll
    for (int u = 0; u < kK / 32; ++u) {  // the mma's k: 32 columns, 16 kept values per row
      uint32_t a[4][4];
      uint32_t e[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        // Matrices 0-3: rows 0-7 / 8-15 of the mma tile, values 0-7 / 8-15 of the k-step
        // (a[0] row g value 2t, a[1] row g + 8, a[2] value 2t + 8, a[3] both).
        const int r = wo + 16 * i + (lane & 7) + 8 * ((lane >> 3) & 1);
        const int c = 16 * u + 8 * (lane >> 4);
        ldmatrix_x4(a[i], as + static_cast<unsigned>((r * kAPitch + c) * sizeof(scalar_t)));
        e[i] = StageMeta::e(m_tile(stage), (wo >> 4) + i, u, g, t);  // as the 64 x 64 kernel's
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // Matrix q: tokens 0-7 of the mma tile, columns 8q .. 8q + 7 of the k-step (b[q]:
        // token g, columns 8q + 2t and + 1).
        uint32_t b[4];
        const int tok = wt + 8 * j + (lane & 7);
        const int c = 32 * u + 8 * (lane >> 3);
        ldmatrix_x4(b, xs + static_cast<unsigned>((tok * kXPitch + c) * sizeof(scalar_t)));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          mma_sp<kBf16>(acc[i][j], a[i], b, e[i]);
        }
      }
    }
    if (next < steps) {
      meta.store(m_tile(refill), meta.pair(next, raw));  // read after the __syncthreads of iteration `next`
    }
  }

  // Epilogue: acc[i][j][2h + c] = y^T at feature wo + 16 i + g + 8 h, token wt + 8 j + 2 t + c.
  cp_async_wait_all();  // only empty groups remain; the tile reuses the stages' memory
  __syncthreads();
  scalar_t* ys = reinterpret_cast<scalar_t*>(smem);  // [kTok][kYPitch]
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ol = wo + 16 * i + g + 8 * h;
      const float bo = (bias != nullptr && o0 + ol < rows) ? to_float(bias[o0 + ol]) : 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          ys[(wt + 8 * j + 2 * t + c) * kYPitch + ol] = static_cast<scalar_t>(acc[i][j][2 * h + c] + bo);
        }
      }
    }
  }
  __syncthreads();
  write_tile<scalar_t, kYPitch>(ys, y, m, rows, t0, o0, tid, vec_out);
}

// ---- the warpgroup GEMM (MULTIFLOW_SPARSE24_GEMM=wgmma; sm_90a only, opt-in, compiled
// but not yet run on a GPU).
//
// Hopper's full tensor-core rate is reached only through wgmma (the warp-level mma.sp
// above issues at a fraction of it). Same block tile, stages, copies of the values, paired
// metadata and epilogue as linear_mma128_kernel, but each warpgroup (4 warps) computes a
// 64 (features) x 128 (tokens) tile of y^T with wgmma.mma_async.sp.m64n128k32: A (the
// kept values of the warpgroup's 64 rows) from registers, loaded with ldmatrix as in the
// mma.sp kernels (per warp, the m16n8k32 fragment of its 16 rows, and the same metadata
// register), B (x) read by the tensor cores straight from shared memory through a matrix
// descriptor: the x tile is stored K-major in 8 x 16-byte core matrices without swizzle
// (core matrix (token / 8, column / 8) at (token / 8) * 1024 + (column / 8) * 128 bytes:
// leading byte offset 128, stride byte offset 1024). cp.async writes are made visible to
// the tensor cores' (async proxy) reads with fence.proxy.async before the block barrier;
// each warpgroup waits for its wgmma before the next barrier, so a stage is refilled only
// after every read of it. The accumulator fragment of a warp is that of mma.m16n8 per
// 8 tokens: d[4 j + c] is row g + 8 (c >> 1), token 8 j + 2 t + (c & 1).
namespace wg {
constexpr int kOut = 128;
constexpr int kTok = 128;
constexpr int kK = 64;
constexpr int kVals = kK / 2;
constexpr int kWords = kK / kSparse24WordCols;
constexpr int kStages = 3;
constexpr int kBlockThreads = 256;  // 2 warpgroups
constexpr int kAPitch = kVals + 8;
constexpr int kYPitch = kOut + 8;
constexpr int kCoreBytes = 128;                     // an 8 x 16-byte core matrix
constexpr int kLeadBytes = kCoreBytes;              // next 8 columns of the same 8 tokens
constexpr int kStrideBytes = (kK / 8) * kCoreBytes;  // next 8 tokens
template <typename scalar_t>
struct Layout {
  static constexpr int kXBytes = kTok * kK * static_cast<int>(sizeof(scalar_t));
  static constexpr int kABytes = kOut * kAPitch * static_cast<int>(sizeof(scalar_t));
  static constexpr int kMetaBytes = kOut * kWords * 2;
  static constexpr int kStageBytes = kXBytes + kABytes + kMetaBytes;  // x first: 1024-byte aligned
  static constexpr int kBytes = kStages * kStageBytes;
  static_assert(kStageBytes % 1024 == 0, "x tiles start 1024-byte aligned");
  static_assert(kTok * kYPitch * static_cast<int>(sizeof(scalar_t)) <= kBytes, "the epilogue tile fits");
};
static_assert(kStages == 3, "cp_async_wait_one waits for all but the newest group: kStages - 2 == 1");
}  // namespace wg

[[maybe_unused]] __device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The wgmma matrix descriptor of a K-major, unswizzled operand at shared address addr.
[[maybe_unused]] __device__ __forceinline__ uint64_t wgmma_desc(unsigned addr) {
  return static_cast<uint64_t>((addr & 0x3ffffu) >> 4) |
         (static_cast<uint64_t>(wg::kLeadBytes >> 4) << 16) |
         (static_cast<uint64_t>(wg::kStrideBytes >> 4) << 32);  // base offset 0, layout type 0 (no swizzle)
}

// Keeps the compiler from moving the accumulators' uses across the asynchronous wgmma.
// ([[maybe_unused]]: the wgmma helpers are referenced only from sm_90a device code.)
[[maybe_unused]] __device__ __forceinline__ void fence_accumulators(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    asm volatile("" : "+f"(d[i])::"memory");
  }
}

// d += A (64 x 32, 2:4, in registers) x B (32 x 128, K-major in shared memory)
template <bool kBf16>
__device__ __forceinline__ void wgmma_sp_m64n128k32(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, uint32_t e) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MULTIFLOW_WGMMA_SP(TYPE)                                                                                 \
  asm volatile(                                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n"                                                              \
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32." TYPE "." TYPE " "                                       \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                               \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                     \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                      \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "                     \
      "{%64, %65, %66, %67}, %68, %69, 0, p, 1, 1, 0;\n}\n"                                                     \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),      \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),            \
        "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),            \
        "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),            \
        "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),            \
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),            \
        "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),            \
        "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                          \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(e), "n"(1))
  if constexpr (kBf16) {
    MULTIFLOW_WGMMA_SP("bf16");
  } else {
    MULTIFLOW_WGMMA_SP("f16");
  }
#undef MULTIFLOW_WGMMA_SP
#else
  __trap();
#endif
}

[[maybe_unused]] __device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

[[maybe_unused]] __device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

[[maybe_unused]] __device__ __forceinline__ void wgmma_wait_all() {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}

// Whether this build's code for the device has the sm_90a features (wgmma): 1 or 0.
__global__ void sm90a_probe_kernel(int* out) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

// Preconditions as linear_mma128_kernel's; and the device is sm_90 with this kernel
// compiled for sm_90a (the host asks sm90a_probe_kernel).
template <typename scalar_t, bool kBf16>
__global__ void __launch_bounds__(wg::kBlockThreads, 2) linear_wgmma_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ values,
    const int16_t* __restrict__ metadata,
    const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ y,
    int64_t m,
    int64_t rows,
    int64_t cols,
    int steps,              // ceil(cols / kK)
    int64_t feature_tiles,  // ceil(rows / kOut)
    bool vec_out) {         // rows % 8 == 0: 16-byte output pieces
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace wg;
  using L = Layout<scalar_t>;
  extern __shared__ __align__(1024) unsigned char smem_wg[];  // not smem: its declaration is 16-byte aligned
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int wrow = (warp >> 2) * 64 + (warp & 3) * 16;  // the warp's 16 rows of A (its warpgroup's 64)
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) % feature_tiles) * kOut;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.x) / feature_tiles) * kTok;
  const int half = static_cast<int>(cols / 2);  // cols < 2^24 (host)
  const int words = static_cast<int>(cols / kSparse24WordCols);
  const int rows_here = static_cast<int>(rows - o0 < kOut ? rows - o0 : kOut);
  const int toks_here = static_cast<int>(m - t0 < kTok ? m - t0 : kTok);
  const unsigned smem0 = smem_addr(smem_wg);
  auto x_at = [&](int stage) { return smem0 + static_cast<unsigned>(stage * L::kStageBytes); };
  auto a_at = [&](int stage) { return smem0 + static_cast<unsigned>(stage * L::kStageBytes + L::kXBytes); };
  auto m_tile = [&](int stage) {
    return reinterpret_cast<uint16_t*>(smem_wg + stage * L::kStageBytes + L::kXBytes + L::kABytes);
  };

  // Copies, the same at every step. Values: as linear_mma128_kernel. x: token x_row + 32 p,
  // columns 8 x_part ..; lanes 0-7 take the 8 tokens of a core matrix, so a warp writes 512
  // contiguous bytes.
  static_assert(kVals == StageValues<scalar_t>::kVals && kAPitch == StageValues<scalar_t>::kAPitch &&
                kOut == StageValues<scalar_t>::kRows && kBlockThreads == StageValues<scalar_t>::kThreads,
                "StageValues' tile");
  constexpr int kXPieces = (kTok * kK / 8) / kBlockThreads;
  constexpr int kXRowStep = 32;
  const int x_row = 8 * (tid >> 6) + (tid & 7);
  const int x_part = (tid >> 3) & 7;
  const StageValues<scalar_t> vals(values, o0, rows_here, half, tid);
  const int x_stride = kXRowStep * static_cast<int>(cols);
  const scalar_t* x_src = x + (t0 + (x_row < toks_here ? x_row : 0)) * cols + 8 * x_part;
  const unsigned x_dst = static_cast<unsigned>((x_row >> 3) * kStrideBytes + x_part * kLeadBytes + (x_row & 7) * 16);
  auto copy_tiles = [&](int stage, int step) {
    const int k0 = step * kK;
    const int cols_left = static_cast<int>(cols) - k0;
    vals.copy(a_at(stage), k0, cols_left);
#pragma unroll
    for (int p = 0; p < kXPieces; ++p) {
      const bool ok = 8 * x_part < cols_left && x_row + kXRowStep * p < toks_here;
      cp_async16_at(x_at(stage) + x_dst + static_cast<unsigned>((kXRowStep / 8) * p * kStrideBytes),
                    ok ? x_src + (p * x_stride + k0) : x, ok);
    }
  };
  static_assert(kWords == StageMeta::kWords && kOut == 128 && kBlockThreads == 256, "StageMeta's tile");
  const StageMeta meta(metadata, o0, rows_here, words, tid);

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    acc[i] = 0.f;
  }

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) {
      copy_tiles(s, s);
      meta.store(m_tile(s), meta.pair(s, meta.read(s)));
    }
    cp_async_commit();
  }

  for (int step = 0; step < steps; ++step) {
    cp_async_wait_one();
    fence_proxy_async_shared();  // this thread's copies, visible to the tensor cores' reads
    // Every thread's copies of this stage have landed; every warpgroup's wgmma of the last
    // step (the last reader of the stage refilled below) has completed.
    __syncthreads();
    const int next = step + kStages - 1;
    const int stage = step % kStages;
    uint32_t a[kK / 32][4];
    uint32_t e[kK / 32];
#pragma unroll
    for (int u = 0; u < kK / 32; ++u) {
      const int r = wrow + (lane & 7) + 8 * ((lane >> 3) & 1);
      const int c = 16 * u + 8 * (lane >> 4);
      ldmatrix_x4(a[u], a_at(stage) + static_cast<unsigned>((r * kAPitch + c) * sizeof(scalar_t)));
      e[u] = StageMeta::e(m_tile(stage), wrow >> 4, u, g, t);
    }
    fence_accumulators(acc);
    wgmma_fence();
#pragma unroll
    for (int u = 0; u < kK / 32; ++u) {  // columns 32 u ..: core matrices 4 u .. 4 u + 3
      wgmma_sp_m64n128k32<kBf16>(acc, a[u], wgmma_desc(x_at(stage) + static_cast<unsigned>(4 * u * kLeadBytes)), e[u]);
    }
    wgmma_commit();
    // The refill of stage (step + 2) % 3 (read last by the previous step's wgmma), issued
    // while this step's wgmma runs on stage step % 3.
    int2 raw = make_int2(0, 0);
    if (next < steps) {
      copy_tiles(next % kStages, next);
      raw = meta.read(next);
    }
    cp_async_commit();
    wgmma_wait_all();
    fence_accumulators(acc);
    if (next < steps) {
      meta.store(m_tile(next % kStages), meta.pair(next, raw));
    }
  }

  cp_async_wait_all();
  __syncthreads();
  scalar_t* ys = reinterpret_cast<scalar_t*>(smem_wg);  // [kTok][kYPitch]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int ol = wrow + g + 8 * h;
    const float bo = (bias != nullptr && o0 + ol < rows) ? to_float(bias[o0 + ol]) : 0.f;
#pragma unroll
    for (int j = 0; j < kTok / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        ys[(8 * j + 2 * t + c) * kYPitch + ol] = static_cast<scalar_t>(acc[4 * j + 2 * h + c] + bo);
      }
    }
  }
  __syncthreads();
  write_tile<scalar_t, kYPitch>(ys, y, m, rows, t0, o0, tid, vec_out);
#else
  __trap();
#endif
}

// ---- host side

// A per-device answer computed once: `known` holds 0 (not asked yet), 1 (false) or 2
// (true) per device; devices past kMaxDevices ask each time. Two threads may both compute
// it the first time; the answer is the same.
constexpr int kMaxDevices = 64;
using PerDevice = std::atomic<int8_t>[kMaxDevices];

template <typename F>
bool once_per_device(PerDevice& known, F&& compute) {
  const int dev = c10::cuda::current_device();
  if (dev < kMaxDevices && known[dev].load() != 0) {
    return known[dev].load() == 2;
  }
  const bool yes = compute();
  if (dev < kMaxDevices) {
    known[dev].store(yes ? 2 : 1);
  }
  return yes;
}

// Whether the mma.sp kernel was compiled for sm_80+ code (and is not the __trap()
// stub), as the device will load it: a build for older architectures only, run
// through PTX JIT on a newer GPU, must not take the tensor-core path.
// Asked once per device (the answer depends only on the device's architecture).
bool mma_compiled() {
  static PerDevice known = {};
  return once_per_device(known, [] {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, linear_mma_kernel<c10::Half, false>));
    return attr.ptxVersion >= 80;
  });
}

// MULTIFLOW_SPARSE24_GEMV: lanes per output row of the few-row kernel, "warp" (32, unset
// or empty: the default) or "half" (16). Read at each call.
int sparse24_gemv_lanes() {
  return env_switch("MULTIFLOW_SPARSE24_GEMV", "warp", "half", "multiflow::sparse24_linear") ? 16 : 32;
}

template <typename scalar_t, int kLanes>
void launch_gemv_lanes(const Sparse24Problem& p, const at::Tensor& y, int64_t row0, int64_t m) {
  const auto* x = p.x.const_data_ptr<scalar_t>() + row0 * p.cols;
  const auto* values = p.values.const_data_ptr<scalar_t>();
  const bool vec = p.cols % kSparse24WordCols == 0 && reinterpret_cast<uintptr_t>(values) % 16 == 0;
  const auto* bias = p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr;
  auto* out = y.mutable_data_ptr<scalar_t>() + row0 * p.rows;
  const int64_t blocks = grid_for(ceil_div(p.rows, static_cast<int64_t>(32 / kLanes)) * 32, kThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* meta = p.metadata.const_data_ptr<int16_t>();
#define MULTIFLOW_GEMV(KM)                                                                          \
  linear_gemv_kernel<scalar_t, KM, kLanes><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>( \
      x, values, meta, bias, out, m, p.rows, p.cols, vec)
  if (m <= 1) {
    MULTIFLOW_GEMV(1);
  } else if (m <= 2) {
    MULTIFLOW_GEMV(2);
  } else if (m <= 4) {
    MULTIFLOW_GEMV(4);
  } else if (m <= 8) {
    MULTIFLOW_GEMV(8);
  } else {
    MULTIFLOW_GEMV(16);
  }
#undef MULTIFLOW_GEMV
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_gemv(const Sparse24Problem& p, const at::Tensor& y, int64_t row0, int64_t m, int lanes) {
  if (lanes == 16) {
    launch_gemv_lanes<scalar_t, 16>(p, y, row0, m);
  } else {
    launch_gemv_lanes<scalar_t, 32>(p, y, row0, m);
  }
}

template <typename scalar_t, bool kBf16>
void launch_mma(const Sparse24Problem& p, const at::Tensor& y) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.m, static_cast<int64_t>(kTileTok))),
                  static_cast<unsigned>(ceil_div(p.rows, static_cast<int64_t>(kTileOut))));
  linear_mma_kernel<scalar_t, kBf16><<<grid, kMmaThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      p.x.const_data_ptr<scalar_t>(), p.values.const_data_ptr<scalar_t>(), p.metadata.const_data_ptr<int16_t>(),
      p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), p.m, p.rows,
      p.cols, static_cast<int>(ceil_div(p.cols, static_cast<int64_t>(kStepCols))));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// MULTIFLOW_SPARSE24_GEMM: the tensor-core kernel for every call that takes the tensor-core
// path: "tile64" (unset or empty: the default, linear_mma_kernel), "tile128"
// (linear_mma128_kernel) or "wgmma" (linear_wgmma_kernel: sm_90 GPUs, a build for sm_90a).
// The last two are compiled but not yet run on a GPU. Read at each call.
enum class Gemm { kTile64 = 0, kTile128 = 1, kWgmma = 2 };
Gemm sparse24_gemm() {
  return static_cast<Gemm>(
      env_choice("MULTIFLOW_SPARSE24_GEMM", {"tile64", "tile128", "wgmma"}, "multiflow::sparse24_linear"));
}

// Whether the current device runs linear_wgmma_kernel: an sm_90 GPU and this build's code
// for it compiled for sm_90a (TORCH_CUDA_ARCH_LIST with 9.0a; plain 9.0 lacks wgmma).
// Asked once per device, with a one-thread probe kernel and one sync (so the first wgmma
// call on a device must not be inside CUDA graph capture: warm it up eagerly).
bool wgmma_available() {
  static PerDevice known = {};
  return once_per_device(known, [] {
    const auto* props = at::cuda::getCurrentDeviceProperties();
    if (props->major != 9 || props->minor != 0) {
      return false;
    }
    cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capturing));
    TORCH_CHECK(capturing == cudaStreamCaptureStatusNone,
                "multiflow::sparse24_linear: the first MULTIFLOW_SPARSE24_GEMM=wgmma call on a device probes it (one "
                "sync), which CUDA graph capture does not allow: call the op once before capturing");
    auto flag = at::zeros({1}, at::TensorOptions().device(at::kCUDA, c10::cuda::current_device()).dtype(at::kInt));
    sm90a_probe_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(flag.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return flag.item<int>() == 1;
  });
}

// Launches a 128 x 128 tile kernel (linear_mma128_kernel or linear_wgmma_kernel: kKernel,
// with kTileOut x kTileTok tiles, kStepK columns a stage, kBlock threads and kBytes of
// dynamic shared memory); false (nothing launched) when the grid would not fit one
// dimension, in >= 2^24 (the kernels' 32-bit offsets) or the device cannot give a block
// its shared memory.
template <auto kKernel, int kTileOut, int kTileTok, int kStepK, int kBlock, int kBytes, typename scalar_t>
bool launch_tiles(const Sparse24Problem& p, const at::Tensor& y) {
  const int64_t feature_tiles = ceil_div(p.rows, static_cast<int64_t>(kTileOut));
  const int64_t blocks = feature_tiles * ceil_div(p.m, static_cast<int64_t>(kTileTok));
  if (blocks > std::numeric_limits<int32_t>::max() || p.cols >= (int64_t{1} << 24) ||
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) < kBytes) {
    return false;
  }
  // The dynamic shared memory limit is a per-device attribute of the kernel: set once per
  // device and kernel (setting it twice from two threads is harmless).
  static PerDevice opted_in = {};
  once_per_device(opted_in, [] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes));
    // Prefer shared memory over L1 so that two blocks' worth fits on an sm_90 SM (sm_80 / 86 /
    // 89 hold one block of these kernels whatever the carveout).
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kKernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
    return true;
  });
  kKernel<<<static_cast<unsigned>(blocks), kBlock, kBytes, at::cuda::getCurrentCUDAStream()>>>(
      p.x.const_data_ptr<scalar_t>(), p.values.const_data_ptr<scalar_t>(), p.metadata.const_data_ptr<int16_t>(),
      p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(), p.m, p.rows,
      p.cols, static_cast<int>(ceil_div(p.cols, static_cast<int64_t>(kStepK))), feature_tiles, p.rows % 8 == 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename scalar_t, bool kBf16>
bool launch_mma128(const Sparse24Problem& p, const at::Tensor& y) {
  using namespace tile128;
  return launch_tiles<&linear_mma128_kernel<scalar_t, kBf16>, kOut, kTok, kK, kBlockThreads,
                      Layout<scalar_t>::kBytes, scalar_t>(p, y);
}

// As launch_mma128; raises when the device cannot run the kernel (the switch asks for it
// by name).
template <typename scalar_t, bool kBf16>
bool launch_wgmma(const Sparse24Problem& p, const at::Tensor& y) {
  if (!wgmma_available()) {
    const auto* props = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(false, "multiflow::sparse24_linear: MULTIFLOW_SPARSE24_GEMM=wgmma needs an sm_90 GPU (H100 / H200) "
                "and an extension built for sm_90a (TORCH_CUDA_ARCH_LIST with 9.0a): ",
                props->major == 9 && props->minor == 0
                    ? std::string("this build has no sm_90a code")
                    : "this device is sm_" + std::to_string(props->major) + std::to_string(props->minor),
                ". Unset it to use the default kernel");
  }
  using namespace wg;
  return launch_tiles<&linear_wgmma_kernel<scalar_t, kBf16>, kOut, kTok, kK, kBlockThreads,
                      Layout<scalar_t>::kBytes, scalar_t>(p, y);
}

at::Tensor unpack_dense(const Sparse24Problem& p) {
  auto dense = at::empty({p.rows, p.cols}, p.values.options());
  const int64_t words = sparse24_words(p.cols);
  if (p.rows * words == 0) {
    return dense;
  }
  const int64_t blocks = grid_for(p.rows * words, kThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_element_bits(p.values.scalar_type(), [&](auto zero) {
    using E = decltype(zero);
    unpack_kernel<E><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const E*>(p.values.const_data_ptr()), p.metadata.const_data_ptr<int16_t>(),
        static_cast<E*>(dense.mutable_data_ptr()), p.rows, p.cols, words);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dense;
}

std::tuple<at::Tensor, at::Tensor> sparse24_pack_cuda(const at::Tensor& weight, const at::Tensor& mask) {
  const Sparse24PackProblem p = prepare_sparse24_pack(weight, mask);
  const c10::cuda::CUDAGuard guard(p.weight.device());
  const int64_t words = sparse24_words(p.cols);
  auto values = at::empty({p.rows, p.cols / 2}, p.weight.options());
  auto metadata = at::empty({p.rows, words}, p.weight.options().dtype(at::kShort));
  if (p.rows * words == 0) {
    return {values, metadata};
  }
  auto bad = at::zeros({p.rows}, p.weight.options().dtype(at::kInt));
  const int64_t blocks = grid_for(p.rows * words, kThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* mask_bytes = reinterpret_cast<const uint8_t*>(p.mask.const_data_ptr<bool>());
  with_element_bits(p.weight.scalar_type(), [&](auto zero) {
    using E = decltype(zero);
    pack_kernel<E><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const E*>(p.weight.const_data_ptr()), mask_bytes, static_cast<E*>(values.mutable_data_ptr()),
        metadata.mutable_data_ptr<int16_t>(), bad.mutable_data_ptr<int32_t>(), p.rows, p.cols, words);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor bad_rows = at::nonzero(bad).flatten().cpu();  // the one sync
  if (bad_rows.numel() > 0) {
    const int64_t* br = bad_rows.const_data_ptr<int64_t>();
    std::ostringstream list;
    const int64_t shown = std::min<int64_t>(bad_rows.numel(), 8);
    for (int64_t i = 0; i < shown; ++i) {
      list << (i ? ", " : "") << br[i];
    }
    TORCH_CHECK_VALUE(
        false, "multiflow::sparse24_pack: mask is not 2:4: rows [", list.str(), bad_rows.numel() > shown ? ", ..." : "",
        "] keep more than 2 of 4 consecutive weights (", bad_rows.numel(), bad_rows.numel() == 1 ? " row" : " rows",
        " in total)");
  }
  return {values, metadata};
}

at::Tensor sparse24_unpack_cuda(const at::Tensor& values, const at::Tensor& metadata) {
  const Sparse24Problem p = prepare_sparse24_unpack(values, metadata);
  const c10::cuda::CUDAGuard guard(p.values.device());
  return unpack_dense(p);
}

at::Tensor sparse24_linear_cuda(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& metadata,
    const std::optional<at::Tensor>& bias) {
  const Sparse24Problem p = prepare_sparse24_linear(x, values, metadata, bias);
  const c10::cuda::CUDAGuard guard(p.x.device());
  const int lanes = sparse24_gemv_lanes();  // first: a bad setting fails whatever the path
  const Gemm gemm = sparse24_gemm();
  if (auto trivial = trivial_linear_result(p)) {
    return *trivial;
  }
  auto y = at::empty({p.m, p.rows}, p.x.options());
  const auto dtype = p.x.scalar_type();
  // Evaluated only past the few-rows case (short-circuit): the memory-bound path asks nothing.
  const bool tensor_cores = p.m >= kRowsTensorCoresFrom && (dtype == at::kHalf || dtype == at::kBFloat16) &&
                            at::cuda::getCurrentDeviceProperties()->major >= 8 &&
                            p.cols % kSparse24WordCols == 0 &&
                            ceil_div(p.rows, static_cast<int64_t>(kTileOut)) <= 65535 &&
                            reinterpret_cast<uintptr_t>(p.x.const_data_ptr()) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(p.values.const_data_ptr()) % 16 == 0 && mma_compiled();
  if (tensor_cores) {
    // The opt-in kernels, then the default (also where they decline an exotic shape).
    auto launch = [&](auto zero, auto bf16) {
      using T = decltype(zero);
      constexpr bool kBf16 = decltype(bf16)::value;
      const bool done = (gemm == Gemm::kTile128 && launch_mma128<T, kBf16>(p, y)) ||
                        (gemm == Gemm::kWgmma && launch_wgmma<T, kBf16>(p, y));
      if (!done) {
        launch_mma<T, kBf16>(p, y);
      }
    };
    if (dtype == at::kHalf) {
      launch(c10::Half(), std::false_type());
    } else {
      launch(c10::BFloat16(), std::true_type());
    }
    return y.view(p.out_shape);
  }
  // The warp-per-row kernel, over blocks of kRowsGemv rows of x (one block in the
  // memory-bound regime; float32 or unaligned inputs with many rows read the weight
  // once per block: correct, not fast, and like every path it multiplies only the
  // positions the metadata names).
  for (int64_t row0 = 0; row0 < p.m; row0 += kRowsGemv) {
    const int64_t rows_here = std::min(kRowsGemv, p.m - row0);
    if (dtype == at::kFloat) {
      launch_gemv<float>(p, y, row0, rows_here, lanes);
    } else if (dtype == at::kHalf) {
      launch_gemv<c10::Half>(p, y, row0, rows_here, lanes);
    } else {
      launch_gemv<c10::BFloat16>(p, y, row0, rows_here, lanes);
    }
  }
  return y.view(p.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CUDA, m) {
  m.impl("sparse24_pack", &sparse24_pack_cuda);
  m.impl("sparse24_unpack", &sparse24_unpack_cuda);
  m.impl("sparse24_linear", &sparse24_linear_cuda);
}

}  // namespace multiflow::cuda
