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
#include <sstream>

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

// ---- host side

// Whether the mma.sp kernel was compiled for sm_80+ code (and is not the __trap()
// stub), as the device will load it: a build for older architectures only, run
// through PTX JIT on a newer GPU, must not take the tensor-core path.
// Asked once per device (the answer depends only on the device's architecture).
bool mma_compiled() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int8_t> known[kMaxDevices] = {};  // 0 unknown, 1 no, 2 yes
  const int dev = c10::cuda::current_device();
  if (dev < kMaxDevices && known[dev].load() != 0) {
    return known[dev].load() == 2;
  }
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, linear_mma_kernel<c10::Half, false>));
  const bool yes = attr.ptxVersion >= 80;
  if (dev < kMaxDevices) {
    known[dev].store(yes ? 2 : 1);
  }
  return yes;
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
    if (dtype == at::kHalf) {
      launch_mma<c10::Half, false>(p, y);
    } else {
      launch_mma<c10::BFloat16, true>(p, y);
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
