// _bitmap_linear_cuda: bitmap_linear (y = x @ W.T + bias, W in the bitmap format)
// in CUDA C++. A private op; the public op's CUDA kernel (bitmap_linear_public_cuda, at the
// end) calls it unless MULTIFLOW_BITMAP_CUDA=triton picks the Triton kernel. The few-row
// kernels gemv_kernel (float32, or MULTIFLOW_BITMAP_GEMV=v1) and gemv_tc_kernel (float16 /
// bfloat16) passed every CUDA test and compute-sanitizer memcheck on an H200 before the
// bitmap format change of session 7 (int32 row_ptr, no block_ptr column for block 0), which
// has not run on a GPU yet; speeds in benchmarks/RESULTS.md (gemv_tc: 1.2-1.7x cuBLAS dense
// at 1-16 rows on 4096x4096, 0.4-0.7x on 11008-row layers; in run 2 the CUDA C++ path was
// 2.3-36x faster than the Triton kernel).
//
// The format (csrc/bitmap.h): values (nnz,) the kept weights row-major; bits int32
// (out, words = ceil(in / 32)), bit b of word w of row r keeps column 32 w + b;
// row_ptr int32 (out + 1,) the index in values of row r's first kept weight;
// block_ptr int32 (out, ceil(in / 512) - 1): [r, k - 1] = the kept weights of row r before
// column 512 k, for k >= 1 (block 0's offset is 0, not stored; block_offset below).
//
// Paths, by the number of rows m of x (x.reshape(-1, in)):
//
//  * m <= 16 (kRowsTc, the memory-bound decode regime), float16 / bfloat16 on sm_80+:
//    gemv_tc_kernel (below, after gemv_kernel) reads the format once and multiplies on
//    tensor cores, W decoded into mma.sync's A fragments in registers. Under
//    MULTIFLOW_BITMAP_GEMV=tc2 the same kernel with the lean decode (decode_byte: a lane
//    decodes 8 adjacent columns of each of its rows per word, x in 16-byte loads; by the
//    SASS of sm_90, about 45 instructions per 16x16 k-step in the staged loop against
//    about 139 for tc's decode). Compiled here, its fragment mapping checked by a NumPy
//    emulation (not in the repo); NOT yet run on a GPU: opt-in until gpu_check.sh has
//    tested and measured it.
//
//  * m <= 8, float32 (or MULTIFLOW_BITMAP_GEMV=v1): gemv_kernel, the first few-row kernel. A
//    block of kGemvWarps warps owns kRowsPerBlock output rows (kRowsPerWarp
//    per warp) and walks the columns in chunks: the chunk of x (all m rows) is staged
//    in shared memory, interleaved as xs[column][row of x] (the kM rows of one column
//    are one 2 to 32-byte load), then each warp takes its rows 32 words (1024
//    columns, two block_ptr blocks) at a time. Lane L owns word L: popc gives its
//    kept count, an inclusive shuffle scan over each 16-lane half (one block_ptr
//    block) its first index in values (row_ptr[r] + block_ptr[r, block] + the
//    counts of the lanes before it in the half), and it walks its set bits
//    (__ffs, clear the lowest), each kept weight meeting the kM rows of x at its
//    column. Per output row of a 75%-sparse float16 weight with in = 4096: 2 KB of
//    values and 512 B of bits (0.31x the dense row's 8 KB), read once; x comes from
//    L2 once per block and chunk (kRowsPerBlock rows share it).
//
//  * more rows (or a gemv_tc block the device cannot give its shared memory):
//    decode_kernel expands the format to a dense (out, in) weight in
//    x's dtype (zeros where pruned; one warp per 32 words of a row, the same scan,
//    then each lane writes 8 columns with one 16-byte store for 16-bit types) and
//    at::linear (cuBLAS) multiplies: the decode writes the dense bytes once, cheap
//    beside a GEMM over many rows.
//
// Numerics: products summed in float32 (gemv: fmaf per kept weight, lanes reduced by
// a fixed shuffle tree; dense: cuBLAS with float32 accumulation), the bias added in
// float32, the result rounded once to x's dtype. F.linear's semantics on inf / NaN
// in x: the gemv multiplies kept weights only, so an inf / NaN of x at a column a row
// prunes (0 * inf = NaN through F.linear on the decoded weight) is added as a NaN:
// staging records, per word and row of x, which columns of x are not finite
// (__ballot_sync), and a block whose chunk has any (__syncthreads_or: one flag, the
// common finite case pays nothing more) makes each lane add NaN where such a column
// is pruned in its word. Kept columns propagate by the products themselves. The
// dense path is F.linear on the decoded weight.
//
// Trust: row_ptr and block_ptr live on the device and are never read on the host
// (no sync per call). Every index into values is checked against [0, nnz) before
// the load (unsigned 64-bit arithmetic, so hostile offsets wrap instead of
// overflowing), so a row_ptr / block_ptr that disagrees with bits gives wrong numbers,
// never an out-of-bounds read. x is never read past in_features (staging zero-fills
// the chunk past it; a padding bit past in_features, which pack_mask never sets,
// multiplies such a 0); the dense path never writes a padding column.
//
// Determinism: no atomics; gemv_kernel sums every output element in one warp in a fixed
// order (chunks ascending, each lane's bits ascending, a fixed shuffle tree);
// gemv_tc_kernel adds its warps' partial sums in warp order.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/bit_cast.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "bitmap.h"
#include "ceil_div.h"
#include "cuda/cp_async.cuh"
#include "cuda/env_switch.h"
#include "dtypes.h"
#include "format_args.h"

namespace multiflow::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
// Words of a block_ptr block (512 columns), and of one warp pass (a word per lane).
constexpr int kBlockWords = static_cast<int>(kBitmapBlockCols / 32);
constexpr int kPassWords = 32;
static_assert(kPassWords == 2 * kBlockWords, "a warp pass covers two block_ptr blocks, one per 16-lane half");

// Rows of x up to which _bitmap_linear_cuda runs the one-pass gemv kernel.
constexpr int64_t kRowsGemv = 8;
constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kGemvMinBlocks = 4;  // resident blocks per SM (caps registers at 64)
constexpr int kRowsPerWarp = 2;
constexpr int64_t kRowsPerBlock = kGemvWarps * kRowsPerWarp;
// Bytes of x staged per chunk (at least one pass, 1024 columns, whatever m and dtype:
// 32 KB for float32 with 8 rows); the bits of the non-finite map come on top.
constexpr int64_t kChunkXBytes = 16 * 1024;
constexpr int64_t kPassCols = 32 * kPassWords;

constexpr int kDecodeThreads = 256;
constexpr int64_t kBlocksPerSm = 32;

__device__ __forceinline__ bool not_finite(float v) {
  return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

// The kept weights of a row before column 512 k (block k's first index relative to
// row_ptr[r]): 0 for k = 0, else block_ptr_row[k - 1] (block_ptr_row = block_ptr +
// r * (blocks - 1): block_ptr has no column for block 0). k < blocks.
__device__ __forceinline__ int64_t block_offset(const int32_t* __restrict__ block_ptr_row, int64_t k) {
  return k > 0 ? static_cast<int64_t>(__ldg(block_ptr_row + k - 1)) : 0;
}

// Each lane's first index in values for its word of a pass over the words
// [32 q, 32 q + 32) of row r: lane L holds word 32 q + L (u, 0 past the row), whose
// block is 2 q + L / 16. Inclusive scan of the popcounts over each 16-lane half,
// then row_ptr[r] + block_offset(block) + the half's count before the lane. The sum
// is unsigned 64-bit: a hostile offset wraps and fails the caller's [0, nnz) check.
__device__ __forceinline__ uint64_t pass_first_index(
    uint32_t u,
    int lane,
    uint64_t row_start,
    const int32_t* __restrict__ block_ptr_row,
    int64_t blocks,
    int64_t pass) {
  const int count = __popc(u);
  int inclusive = count;
#pragma unroll
  for (int offset = 1; offset < kBlockWords; offset <<= 1) {
    const int before = __shfl_up_sync(kFullMask, inclusive, offset, kBlockWords);
    if ((lane & (kBlockWords - 1)) >= offset) {
      inclusive += before;
    }
  }
  const int64_t block = 2 * pass + (lane >> 4);
  const int64_t in_block = block < blocks ? block_offset(block_ptr_row, block) : 0;
  return row_start + static_cast<uint64_t>(in_block) + static_cast<uint64_t>(inclusive - count);
}

// kM consecutive elements of x's dtype, one shared-memory load (two for 32 bytes).
template <typename scalar_t, int kM>
struct alignas(kM * sizeof(scalar_t) < 16 ? kM * sizeof(scalar_t) : 16) XColumn {
  scalar_t v[kM];
};

// ---- few rows: the format read once.
//
// Dynamic shared memory: xs (chunk_cols * kM elements: xs[c * kM + i] = x[i, c0 + c],
// 0 past in_features and for i >= m), then nf (chunk_cols / 32 * kM words: bit b of
// nf[w * kM + i] = x[i, c0 + 32 w + b] is inf or NaN).
template <typename scalar_t, int kM>
__global__ void __launch_bounds__(kGemvThreads, kGemvMinBlocks) gemv_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ values,
    const int32_t* __restrict__ bits,
    const int32_t* __restrict__ row_ptr,
    const int32_t* __restrict__ block_ptr,
    const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ y,
    int m,
    int64_t rows,
    int64_t cols,
    int64_t words,
    int64_t blocks,
    int64_t nnz,
    int chunk_cols) {
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem);
  uint32_t* nf = reinterpret_cast<uint32_t*>(smem + static_cast<size_t>(chunk_cols) * kM * sizeof(scalar_t));
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp;

  float acc[kRowsPerWarp][kM];
  uint64_t row_start[kRowsPerWarp];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    row_start[j] = row0 + j < rows ? static_cast<uint64_t>(static_cast<int64_t>(__ldg(row_ptr + row0 + j))) : 0;
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      acc[j][i] = 0.f;
    }
  }

  const int chunk_words = chunk_cols / 32;
  for (int64_t c0 = 0; c0 < cols; c0 += chunk_cols) {
    // Stage the chunk: a warp's 32 threads take 32 consecutive columns of one row of
    // x (chunk_cols and the thread count are multiples of 32), so the global loads
    // are coalesced and the ballot is the non-finite word of that row.
    bool any_not_finite = false;
    for (int e = threadIdx.x; e < kM * chunk_cols; e += kGemvThreads) {
      const int i = e / chunk_cols;
      const int c = e - i * chunk_cols;
      const int64_t col = c0 + c;
      scalar_t v = static_cast<scalar_t>(0.f);
      if (i < m && col < cols) {
        v = x[static_cast<int64_t>(i) * cols + col];
      }
      xs[c * kM + i] = v;
      const bool bad = not_finite(static_cast<float>(v));
      const uint32_t word = __ballot_sync(kFullMask, bad);
      if (lane == 0) {
        nf[(c >> 5) * kM + i] = word;
      }
      any_not_finite |= bad;
    }
    const bool chunk_not_finite = __syncthreads_or(any_not_finite) != 0;

#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      const int64_t r = row0 + j;
      if (r >= rows) {
        continue;  // warp-uniform
      }
      const int32_t* bits_row = bits + r * words;
      const int32_t* block_ptr_row = block_ptr + r * (blocks - 1);
      for (int w0 = 0; w0 < chunk_words; w0 += kPassWords) {
        const int64_t wd = c0 / 32 + w0 + lane;  // this lane's word of the row
        const uint32_t word = wd < words ? static_cast<uint32_t>(__ldg(bits_row + wd)) : 0u;
        const uint64_t first =
            pass_first_index(word, lane, row_start[j], block_ptr_row, blocks, (c0 / 32 + w0) / kPassWords);
        // The lane's values: first + k for k < popc(word); those inside [0, nnz) are the
        // first `valid` (all of them for a consistent format), the rest read as 0.
        const bool start_ok = first < static_cast<uint64_t>(nnz);
        const scalar_t* vp = start_ok ? values + first : values;
        const uint64_t room = start_ok ? static_cast<uint64_t>(nnz) - first : 0;
        const int valid = room < 32u ? static_cast<int>(room) : 32;
        const scalar_t* xw = xs + (w0 + lane) * 32 * kM;
        uint32_t u = word;
        for (int k = 0; u != 0u; ++k) {
          const int b = __ffs(u) - 1;
          u &= u - 1u;
          const float v = k < valid ? static_cast<float>(vp[k]) : 0.f;
          const XColumn<scalar_t, kM> xc = *reinterpret_cast<const XColumn<scalar_t, kM>*>(xw + b * kM);
#pragma unroll
          for (int i = 0; i < kM; ++i) {
            acc[j][i] = fmaf(v, static_cast<float>(xc.v[i]), acc[j][i]);
          }
        }
        if (chunk_not_finite) {
#pragma unroll
          for (int i = 0; i < kM; ++i) {
            if ((nf[(w0 + lane) * kM + i] & ~word) != 0u) {
              acc[j][i] += __int_as_float(0x7fc00000);  // 0 * inf or 0 * NaN at a pruned column
            }
          }
        }
      }
    }
    __syncthreads();  // the next chunk overwrites xs
  }

#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t r = row0 + j;
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      float s = acc[j][i];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        s += __shfl_xor_sync(kFullMask, s, offset);
      }
      if (lane == 0 && i < m && r < rows) {
        if (bias != nullptr) {
          s += static_cast<float>(bias[r]);
        }
        y[static_cast<int64_t>(i) * rows + r] = static_cast<scalar_t>(s);
      }
    }
  }
}

// ---- few rows on tensor cores (gemv_tc_kernel: float16 / bfloat16 on sm_80+, up to 16 rows
// of x; the default there, MULTIFLOW_BITMAP_GEMV=v1 picks gemv_kernel).
//
// W is operand A of mma.sync.m16n8k16 (f32 accumulation), decoded from the format into
// the A fragments in registers, never into a dense copy: a block owns 16 output rows and
// its kTcWarps warps split the columns in 512-column chunks (one block_ptr block: warp w
// takes chunks w, w + kTcWarps, ...). Per chunk a warp
//  * reads the 16 rows' offsets: lane i < 16 (and i + 16) holds row row0 + i's range
//    [s, e) of values in the chunk (row_ptr + block_ptr; row_ptr[r + 1] at the row's end);
//  * stages the 16 x 16 bit words in shared memory (row stride 17 words: the 8 rows a
//    fragment load touches fall in distinct banks) and, when every row's range fits its
//    slot (row_cap elements, sized on the host from the average density) and lies in
//    [0, nnz), the values too, with 16-byte cp.async copies (element-wise where a 16-byte
//    group crosses an end of values); otherwise this chunk reads values from global memory
//    (indices checked against [0, nnz)): slower, same numbers;
//  * walks the chunk in 32 k-steps of 16 columns. Lane (g = lane / 4, t = lane % 4) holds
//    A's elements (rows g and g + 8; columns 2t, 2t + 1, 2t + 8, 2t + 9 of the step): its
//    value index is the row's running count + popc of the row's 16 step bits below the
//    column (a pruned element is +0.0), B is x's rows n = g (+ 8 for the second n-tile) at
//    the same columns (0 past m or in_features), and one mma per 8 rows of x.
// The warps' partial sums meet in shared memory, added in warp order (fixed, so the
// result is deterministic), then the bias in float32 and one rounding to x's dtype.
// Numerics: F.linear on the decoded weight. The tensor cores multiply pruned weights as
// +0.0, so an inf / NaN of x reaches every row as F.linear's 0 * inf = NaN without a
// special case; products are exact and summed in float32 (the mma's order within a step).
constexpr int kTcWarps = 8;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kTcChunkWords = static_cast<int>(kBitmapBlockCols / 32);     // 16
constexpr int kTcBitsStride = kTcChunkWords + 1;
constexpr int64_t kRowsTc = 16;

template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();
#endif
}

// A row's four A elements of one k-step: h the row's 16 bits of the step, cur the index
// (in src) of its first kept value of the step; lane t's columns 2t, 2t + 1 (lo) and
// 2t + 8, 2t + 9 (hi), each pair packed low column first. Index idx < end reads src[idx],
// else 0 (a hostile offset). Advances cur past the step's kept values.
template <typename Index>
__device__ __forceinline__ void decode_step(
    uint32_t h,
    uint32_t mask_lo,
    uint32_t mask_hi,
    int t,
    Index& cur,
    Index end,
    const uint16_t* __restrict__ src,
    uint32_t& lo,
    uint32_t& hi) {
  const Index r_lo = cur + static_cast<Index>(__popc(h & mask_lo));
  const Index r_hi = cur + static_cast<Index>(__popc(h & mask_hi));
  const uint32_t q_lo = h >> (2 * t);
  const uint32_t q_hi = h >> (2 * t + 8);
  uint32_t v0 = 0, v1 = 0, v2 = 0, v3 = 0;
  if ((q_lo & 1u) && r_lo < end) {
    v0 = src[r_lo];
  }
  const Index r_lo1 = r_lo + static_cast<Index>(q_lo & 1u);
  if ((q_lo & 2u) && r_lo1 < end) {
    v1 = src[r_lo1];
  }
  if ((q_hi & 1u) && r_hi < end) {
    v2 = src[r_hi];
  }
  const Index r_hi1 = r_hi + static_cast<Index>(q_hi & 1u);
  if ((q_hi & 2u) && r_hi1 < end) {
    v3 = src[r_hi1];
  }
  lo = v0 | (v1 << 16);
  hi = v2 | (v3 << 16);
  cur += static_cast<Index>(__popc(h));
}

// x's two elements at columns k, k + 1 of row xr (raw 16-bit), 0 past cols; pairs: cols is
// even and x 4-byte aligned, so (k even) one 4-byte load.
__device__ __forceinline__ uint32_t x_pair(const uint16_t* __restrict__ xr, int64_t k, int64_t cols, bool pairs) {
  if (xr == nullptr || k >= cols) {
    return 0u;
  }
  if (pairs) {
    return __ldg(reinterpret_cast<const uint32_t*>(xr + k));
  }
  const uint32_t a = __ldg(xr + k);
  const uint32_t b = k + 1 < cols ? static_cast<uint32_t>(__ldg(xr + k + 1)) : 0u;
  return a | (b << 16);
}

// ---- the lean decode (gemv_tc_kernel<.., kLean = true>, MULTIFLOW_BITMAP_GEMV=tc2).
//
// The mma sums over its 16 k in any order, so the k of a step need not be 16 adjacent
// columns: any one-to-one map from the step's k to columns does, used alike for A and B.
// Lane t takes the 8 adjacent columns 8t .. 8t + 7 of each 32-column word: its k 2t, 2t + 1,
// 2t + 8, 2t + 9 are columns 8t .. 8t + 3 in the word's first step and 8t + 4 .. 8t + 7 in
// its second. So a lane reads its x of a word with one 16-byte load and decodes one byte of
// each of its two rows' words: one popcount for the byte's first index, then a predicated
// load per set bit; no per-element index popcounts, no 64-bit or per-element x checks.

// Row word w's byte t8 / 8 (columns t8 .. t8 + 7; below = the bits under column t8) as 8
// elements, 0 where pruned, packed in pairs low column first into e. Staged (cur the
// shared-memory address, in bytes, of the word's first kept value in the row's slot):
// unchecked reads (each a load and an address step predicated on the bit), the slot's
// slack (see gemv_tc_lean_slack) keeps every address a byte can reach inside shared
// memory. Checked (values in global memory; cur an index into src): an index reads only
// below end. cur is advanced past the word's kept values.
__device__ __forceinline__ void decode_byte(uint32_t w, int t8, uint32_t below, uint32_t& cur, uint32_t (&e)[4]) {
  const uint32_t b = w >> t8;
  uint32_t addr = cur + 2u * static_cast<uint32_t>(__popc(w & below));
  cur += 2u * static_cast<uint32_t>(__popc(w));
  uint32_t v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#if defined(__CUDA_ARCH__)
    // volatile + "memory": a load the compiler must keep after the staging's writes and
    // __syncwarp (its address alone does not tell it that it reads shared memory)
    asm volatile(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\tmov.b32 %0, 0;\n\t"
        "@p ld.shared.u16 %0, [%1];\n\t@p add.u32 %1, %1, 2;\n\t}"
        : "=r"(v[i]), "+r"(addr)
        : "r"(b & (1u << i))
        : "memory");
#else
    v[i] = 0u;
#endif
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    e[i] = __byte_perm(v[2 * i], v[2 * i + 1], 0x5410);
  }
}

__device__ __forceinline__ void decode_byte(uint32_t w, int t8, uint32_t below, uint64_t& cur, uint64_t end,
                                            const uint16_t* __restrict__ src, uint32_t (&e)[4]) {
  const uint32_t b = w >> t8;
  uint64_t idx = cur + __popc(w & below);
  cur += __popc(w);
  uint32_t v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    v[i] = 0u;
    if ((b >> i) & 1u) {
      if (idx < end) {
        v[i] = src[idx];
      }
      ++idx;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    e[i] = __byte_perm(v[2 * i], v[2 * i + 1], 0x5410);
  }
}

// x's 8 elements at columns k .. k + 7 of row xr (raw 16-bit, 0 past cols) packed in pairs:
// one 16-byte load where wide (cols % 8 == 0 and x 16-byte aligned) and k + 8 <= cols.
__device__ __forceinline__ void x_eight(const uint16_t* __restrict__ xr, int64_t k, int64_t cols, bool wide,
                                        uint32_t (&b)[4]) {
  if (wide && k + 8 <= cols) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(xr + k));
    b[0] = u.x;
    b[1] = u.y;
    b[2] = u.z;
    b[3] = u.w;
    return;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t k0 = k + 2 * q;
    const uint32_t lo = k0 < cols ? static_cast<uint32_t>(__ldg(xr + k0)) : 0u;
    const uint32_t hi = k0 + 1 < cols ? static_cast<uint32_t>(__ldg(xr + k0 + 1)) : 0u;
    b[q] = lo | (hi << 16);
  }
}

// Dynamic shared memory: per warp, 16 x kTcBitsStride bit words then 16 x row_cap values
// (row_cap a multiple of 8 elements: 16-byte rows); reused after the chunks for the
// partial sums (kTcWarps x kN / 8 x 4 x 32 floats). mis: values' address modulo 16, in
// elements (16-byte groups start at elements g with (g + mis) % 8 == 0). x_fast: kLean
// false, x_pair's pairs; kLean true, x_eight's wide (the lean decode above, which also
// needs gemv_tc_lean_slack bytes past the warps' buffers).
template <bool kBf16, int kN, bool kLean>
__global__ void __launch_bounds__(kTcThreads, 3) gemv_tc_kernel(
    const uint16_t* __restrict__ x,
    const uint16_t* __restrict__ values,
    const int32_t* __restrict__ bits,
    const int32_t* __restrict__ row_ptr,
    const int32_t* __restrict__ block_ptr,
    const uint16_t* __restrict__ bias,
    uint16_t* __restrict__ y,
    int m,
    int64_t rows,
    int64_t cols,
    int64_t words,
    int64_t blocks,
    int64_t nnz,
    int row_cap,
    int mis,
    bool x_fast) {
  constexpr int kV = 8;  // 16-bit elements per 16-byte group
  constexpr int kNT = kN / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const size_t warp_bytes = static_cast<size_t>(16 * kTcBitsStride) * 4 + static_cast<size_t>(16) * row_cap * 2;
  uint32_t* sb = reinterpret_cast<uint32_t*>(smem + warp * warp_bytes);
  uint16_t* sv = reinterpret_cast<uint16_t*>(smem + warp * warp_bytes + 16 * kTcBitsStride * 4);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * 16;
  const uint32_t mask_lo = (1u << (2 * t)) - 1u;
  const uint32_t mask_hi = (1u << (2 * t + 8)) - 1u;
  const uint64_t cap = static_cast<uint64_t>(row_cap - 2 * kV);  // values a row's chunk may stage
  // x's rows of this lane (kLean: rows past m read row m - 1, whose products land in
  // columns of D that are never written out).
  const uint16_t* xr[kNT];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int n = nt * 8 + g;
    xr[nt] = n < m ? x + static_cast<int64_t>(n) * cols : kLean ? x + static_cast<int64_t>(m - 1) * cols : nullptr;
  }
  const int t8 = 8 * t;
  const uint32_t below = (1u << t8) - 1u;
  float acc[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      acc[nt][q] = 0.f;
    }
  }

  for (int64_t c = warp; c < blocks; c += kTcWarps) {
    // Bits: 16 rows x 16 words (0 past the row or the last row); loaded first (in flight
    // with the offsets' loads), stored once those are used.
    uint32_t wv[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int el = lane + 32 * q;
      const int64_t rr = row0 + (el >> 4);
      const int64_t wd = c * kTcChunkWords + (el & 15);
      wv[q] = rr < rows && wd < words ? static_cast<uint32_t>(__ldg(bits + rr * words + wd)) : 0u;
    }
    // Row row0 + (lane % 16)'s values of chunk c: [s, e) (unsigned: hostile offsets wrap
    // and fail `fit`). Rows past the last: empty.
    uint64_t s = 0, e = 0;
    bool fit = true;
    const int64_t r = row0 + (lane & 15);
    if (r < rows) {
      const uint64_t rs = static_cast<uint64_t>(static_cast<int64_t>(__ldg(row_ptr + r)));
      const int32_t* block_ptr_row = block_ptr + r * (blocks - 1);
      s = rs + static_cast<uint64_t>(block_offset(block_ptr_row, c));
      e = c + 1 < blocks ? rs + static_cast<uint64_t>(block_offset(block_ptr_row, c + 1))
                         : static_cast<uint64_t>(static_cast<int64_t>(__ldg(row_ptr + r + 1)));
      fit = s <= e && e <= static_cast<uint64_t>(nnz) && e - s <= cap;
    }
    const bool staged = __all_sync(kFullMask, fit);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int el = lane + 32 * q;
      sb[(el >> 4) * kTcBitsStride + (el & 15)] = wv[q];
    }
    // Values: half-warp h stages rows 2 p + h, each from its 16-byte group boundary.
    if (staged) {
#pragma unroll 1
      for (int p = 0; p < 8; ++p) {
        const int i = 2 * p + (lane >> 4);
        const int64_t si = static_cast<int64_t>(__shfl_sync(kFullMask, s, i));
        const int64_t ei = static_cast<int64_t>(__shfl_sync(kFullMask, e, i));
        const int64_t a = si - (si + mis) % kV;
        const int64_t groups = (ei - a + kV - 1) / kV;
        uint16_t* dst = sv + i * row_cap;
        for (int64_t q = lane & 15; q < groups; q += 16) {
          const int64_t g0 = a + q * kV;
          if (g0 >= 0 && g0 + kV <= nnz) {
            cp_async16(dst + q * kV, values + g0, true);
          } else {
#pragma unroll
            for (int j = 0; j < kV; ++j) {
              const int64_t gi = g0 + j;
              dst[q * kV + j] = gi >= 0 && gi < nnz ? values[gi] : static_cast<uint16_t>(0);
            }
          }
        }
      }
    }
    cp_async_wait_all();
    __syncwarp();
    // This lane's rows g and g + 8.
    const uint64_t s0 = __shfl_sync(kFullMask, s, g), e0 = __shfl_sync(kFullMask, e, g);
    const uint64_t s1 = __shfl_sync(kFullMask, s, g + 8), e1 = __shfl_sync(kFullMask, e, g + 8);
    const uint32_t* sb0 = sb + g * kTcBitsStride;
    const uint32_t* sb1 = sb + (g + 8) * kTcBitsStride;
    const int64_t k_chunk = c * static_cast<int64_t>(kBitmapBlockCols);
    auto steps = [&](auto cur0, auto end0, const uint16_t* src0, auto cur1, auto end1, const uint16_t* src1) {
#pragma unroll 2
      for (int j = 0; j < kTcChunkWords; ++j) {
        const uint32_t w0 = sb0[j];
        const uint32_t w1 = sb1[j];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          uint32_t a[4];
          decode_step(half ? w0 >> 16 : w0 & 0xffffu, mask_lo, mask_hi, t, cur0, end0, src0, a[0], a[2]);
          decode_step(half ? w1 >> 16 : w1 & 0xffffu, mask_lo, mask_hi, t, cur1, end1, src1, a[1], a[3]);
          const int64_t k = k_chunk + 32 * j + 16 * half + 2 * t;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            const uint32_t b0 = x_pair(xr[nt], k, cols, x_fast);
            const uint32_t b1 = x_pair(xr[nt], k + 8, cols, x_fast);
            mma_16816<kBf16>(acc[nt], a, b0, b1);
          }
        }
      }
    };
    // kLean: two steps per word, lane t on the word's columns 8t .. 8t + 7 (decode_byte;
    // decode(sb0[j], sb1[j], e0, e1) decodes the lane's two rows). x: one unchecked 16-byte
    // load per word and row of x where the chunk is whole and x_fast, else x_eight.
    auto lean_words = [&](auto&& decode) {
      auto words_with = [&](auto&& x_word) {
#pragma unroll 2
        for (int j = 0; j < kTcChunkWords; ++j) {
          uint32_t e0[4], e1[4];
          decode(sb0[j], sb1[j], e0, e1);
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            uint32_t b[4];
            x_word(nt, j, b);
            const uint32_t a_first[4] = {e0[0], e1[0], e0[1], e1[1]};
            mma_16816<kBf16>(acc[nt], a_first, b[0], b[1]);
            const uint32_t a_second[4] = {e0[2], e1[2], e0[3], e1[3]};
            mma_16816<kBf16>(acc[nt], a_second, b[2], b[3]);
          }
        }
      };
      if (x_fast && k_chunk + kBitmapBlockCols <= cols) {
        const uint4* xc[kNT];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          xc[nt] = reinterpret_cast<const uint4*>(xr[nt] + k_chunk + t8);
        }
        words_with([&](int nt, int j, uint32_t (&b)[4]) {
          const uint4 u = __ldg(xc[nt] + 4 * j);  // 32 columns = four 16-byte groups per word
          b[0] = u.x;
          b[1] = u.y;
          b[2] = u.z;
          b[3] = u.w;
        });
      } else {
        words_with([&](int nt, int j, uint32_t (&b)[4]) { x_eight(xr[nt], k_chunk + 32 * j + t8, cols, x_fast, b); });
      }
    };
    if (staged) {  // 32-bit offsets into each row's slot (below row_cap)
      const int64_t a0 = static_cast<int64_t>(s0) - (static_cast<int64_t>(s0) + mis) % kV;
      const int64_t a1 = static_cast<int64_t>(s1) - (static_cast<int64_t>(s1) + mis) % kV;
      const uint32_t c0 = static_cast<uint32_t>(static_cast<int64_t>(s0) - a0);
      const uint32_t c1 = static_cast<uint32_t>(static_cast<int64_t>(s1) - a1);
      if constexpr (kLean) {
        uint32_t p0 = static_cast<uint32_t>(__cvta_generic_to_shared(sv + g * row_cap + c0));
        uint32_t p1 = static_cast<uint32_t>(__cvta_generic_to_shared(sv + (g + 8) * row_cap + c1));
        lean_words([&](uint32_t w0, uint32_t w1, uint32_t (&e0)[4], uint32_t (&e1)[4]) {
          decode_byte(w0, t8, below, p0, e0);
          decode_byte(w1, t8, below, p1, e1);
        });
      } else {
        steps(c0, static_cast<uint32_t>(static_cast<int64_t>(e0) - a0), sv + g * row_cap, c1,
              static_cast<uint32_t>(static_cast<int64_t>(e1) - a1), sv + (g + 8) * row_cap);
      }
    } else if constexpr (kLean) {
      uint64_t i0 = s0, i1 = s1;
      const uint64_t end = static_cast<uint64_t>(nnz);
      lean_words([&](uint32_t w0, uint32_t w1, uint32_t (&e0)[4], uint32_t (&e1)[4]) {
        decode_byte(w0, t8, below, i0, end, values, e0);
        decode_byte(w1, t8, below, i1, end, values, e1);
      });
    } else {
      steps(s0, static_cast<uint64_t>(nnz), values, s1, static_cast<uint64_t>(nnz), values);
    }
    __syncwarp();  // the next chunk overwrites this warp's bits and values
  }

  // The warps' partial sums, added in warp order.
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  constexpr int kPart = kNT * 4 * 32;
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      red[warp * kPart + (nt * 4 + q) * 32 + lane] = acc[nt][q];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kPart; idx += kTcThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kTcWarps; ++w) {
      sum += red[w * kPart + idx];
    }
    const int nt = idx / 128;
    const int q = (idx / 32) & 3;
    const int ln = idx & 31;
    const int64_t row = row0 + (ln >> 2) + (q >= 2 ? 8 : 0);
    const int n = nt * 8 + 2 * (ln & 3) + (q & 1);
    if (row < rows && n < m) {
      using T = std::conditional_t<kBf16, c10::BFloat16, c10::Half>;
      if (bias != nullptr) {
        sum += static_cast<float>(c10::bit_cast<T>(bias[row]));
      }
      y[static_cast<int64_t>(n) * rows + row] = c10::bit_cast<uint16_t>(static_cast<T>(sum));
    }
  }
}

// ---- many rows: decode to dense, then cuBLAS.
//
// One warp per (row, pass of 32 words); E is the unsigned integer of the element size
// (elements are copied by their bits). After the pass scan, the 32 words are written
// in 4 groups of 8: lane L writes columns 8 (L % 4) .. + 7 of word 8 g + L / 4, its
// word and first index fetched from the word's owner by shuffles, the 8 elements
// assembled in registers and stored at once (16 or 32 bytes where the row is
// aligned: cols % 8 == 0), so each store of the warp is 512 (1024) contiguous bytes.
template <typename E>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(
    const E* __restrict__ values,
    const int32_t* __restrict__ bits,
    const int32_t* __restrict__ row_ptr,
    const int32_t* __restrict__ block_ptr,
    E* __restrict__ dense,
    int64_t rows,
    int64_t cols,
    int64_t words,
    int64_t blocks,
    int64_t nnz,
    bool vec) {
  constexpr int kGroupWords = 8;
  const int lane = threadIdx.x & 31;
  const int64_t passes = (words + kPassWords - 1) / kPassWords;
  const int64_t items = rows * passes;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; item < items;
       item += warps) {
    const int64_t r = item / passes;
    const int64_t pass = item - r * passes;
    const int64_t wd = pass * kPassWords + lane;
    const uint32_t word = wd < words ? static_cast<uint32_t>(__ldg(bits + r * words + wd)) : 0u;
    const uint64_t first =
        pass_first_index(word, lane, static_cast<uint64_t>(static_cast<int64_t>(__ldg(row_ptr + r))),
                         block_ptr + r * (blocks - 1), blocks, pass);
#pragma unroll
    for (int g = 0; g < kPassWords / kGroupWords; ++g) {
      const int owner = g * kGroupWords + (lane >> 2);
      const int q = lane & 3;  // byte of the word
      const uint32_t w = __shfl_sync(kFullMask, word, owner);
      uint64_t idx = __shfl_sync(kFullMask, first, owner);
      idx += static_cast<uint64_t>(__popc(w & ((1u << (8 * q)) - 1u)));  // q = 0: mask 0
      const int64_t col0 = (pass * kPassWords + owner) * 32 + 8 * q;
      if (col0 >= cols) {
        continue;  // past the row (no shuffle follows in this group)
      }
      alignas(16) E out[8];
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        out[b] = 0;
        if ((w >> (8 * q + b)) & 1u) {
          if (idx < static_cast<uint64_t>(nnz)) {
            out[b] = values[idx];
          }
          ++idx;
        }
      }
      E* dst = dense + r * cols + col0;
      if (vec && col0 + 8 <= cols) {
#pragma unroll
        for (int h = 0; h < static_cast<int>(sizeof(out) / 16); ++h) {
          reinterpret_cast<uint4*>(dst)[h] = reinterpret_cast<const uint4*>(out)[h];
        }
      } else {
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          if (col0 + b < cols) {
            dst[b] = out[b];
          }
        }
      }
    }
  }
}

// ---- host side

template <typename scalar_t, int kM>
void launch_gemv(const BitmapProblem& p, const at::Tensor& y) {
  const int64_t esize = static_cast<int64_t>(sizeof(scalar_t));
  // Columns per chunk: whole passes, as many as kChunkXBytes of x hold (at least
  // one), no more than the row needs.
  const int64_t fit = std::max<int64_t>(1, kChunkXBytes / (kM * esize * kPassCols));
  const int64_t chunk_cols = std::min(fit, ceil_div(p.cols, kPassCols)) * kPassCols;
  const size_t smem = static_cast<size_t>(chunk_cols * kM * esize + chunk_cols / 32 * kM * 4);
  const int64_t grid = ceil_div(p.rows, kRowsPerBlock);
  TORCH_CHECK(grid <= 0x7fffffff, "multiflow::_bitmap_linear_cuda: too many output rows for one launch: ", p.rows);
  gemv_kernel<scalar_t, kM><<<static_cast<unsigned>(grid), kGemvThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      p.x.const_data_ptr<scalar_t>(), p.values.const_data_ptr<scalar_t>(), p.bits.const_data_ptr<int32_t>(),
      p.row_ptr.const_data_ptr<int32_t>(), p.block_ptr.const_data_ptr<int32_t>(),
      p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
      static_cast<int>(p.m), p.rows, p.cols, p.bits.size(1), bitmap_blocks(p.cols), p.values.numel(),
      static_cast<int>(chunk_cols));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_gemv_rows(const BitmapProblem& p, const at::Tensor& y) {
  if (p.m <= 1) {
    launch_gemv<scalar_t, 1>(p, y);
  } else if (p.m <= 2) {
    launch_gemv<scalar_t, 2>(p, y);
  } else if (p.m <= 4) {
    launch_gemv<scalar_t, 4>(p, y);
  } else {
    launch_gemv<scalar_t, 8>(p, y);
  }
}

// Elements of a row's slot in gemv_tc_kernel's values buffer: a 512-column chunk at 1.3x
// the weight's average density + 2% of the columns (at most all 512), plus two 16-byte
// groups of alignment slack; a multiple of 8 (16-byte slots).
int gemv_tc_row_cap(const BitmapProblem& p) {
  const double density = static_cast<double>(p.values.numel()) / static_cast<double>(std::max<int64_t>(1, p.rows * p.cols));
  const double want = static_cast<double>(kBitmapBlockCols) * std::min(1.0, 1.3 * density + 0.02);
  const int64_t cap = ceil_div(static_cast<int64_t>(want) + 1, int64_t{8}) * 8;
  return static_cast<int>(std::min<int64_t>(cap, kBitmapBlockCols) + 16);
}

size_t gemv_tc_smem(int row_cap) {
  return static_cast<size_t>(kTcWarps) * (16 * kTcBitsStride * 4 + static_cast<size_t>(16) * row_cap * 2);
}

// Bytes past the warps' buffers for the lean decode's unchecked reads of a staged slot: a
// row's index within its slot starts below 8 (alignment) and a chunk's 512 bits advance it
// by at most 512, so the last row's slot reads at most 520 - row_cap elements past the end
// (hostile bits only: with bits and offsets that agree, every read is inside the slot).
size_t gemv_tc_lean_slack(int row_cap) {
  return static_cast<size_t>(std::max(0, static_cast<int>(kBitmapBlockCols) + 8 - row_cap)) * 2;
}

// Launches gemv_tc_kernel (lean: its lean decode); false (nothing launched) where it does
// not apply: float32, a GPU before sm_80, or a block's shared memory above what the device
// allows.
bool launch_gemv_tc(const BitmapProblem& p, const at::Tensor& y, bool lean) {
  const auto dtype = p.x.scalar_type();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (dtype == at::kFloat || prop->major < 8) {
    return false;
  }
  const int row_cap = gemv_tc_row_cap(p);
  const size_t smem = gemv_tc_smem(row_cap) + (lean ? gemv_tc_lean_slack(row_cap) : 0);
  const size_t partials = static_cast<size_t>(kTcWarps) * 2 * 4 * 32 * 4;  // kN = 16
  if (std::max(smem, partials) > prop->sharedMemPerBlockOptin) {
    return false;
  }
  const size_t smem_launch = std::max(smem, partials);
  const int64_t grid = ceil_div(p.rows, int64_t{16});
  TORCH_CHECK(grid <= 0x7fffffff, "multiflow::_bitmap_linear_cuda: too many output rows for one launch: ", p.rows);
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(p.values.const_data_ptr()) % 16 / 2);
  // x_pair's 4-byte loads (even cols, x 4-byte aligned) or x_eight's 16-byte loads (cols % 8
  // == 0, x 16-byte aligned).
  const auto x_address = reinterpret_cast<uintptr_t>(p.x.const_data_ptr());
  const bool x_fast = lean ? p.cols % 8 == 0 && x_address % 16 == 0 : p.cols % 2 == 0 && x_address % 4 == 0;
  // variant: the kernel's index in `opted` (the eight kernels share one type, so one lambda).
  auto go = [&](auto kernel, int variant) {
    if (smem_launch > 48 * 1024) {
      // Once per kernel, device and size: the largest opt-in set so far (it covers smaller).
      static std::atomic<size_t> opted[8][64];
      const int dev = p.x.get_device();
      if (dev >= 64 || opted[variant][dev].load() < smem_launch) {
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_launch)));
        if (dev < 64) {
          size_t seen = opted[variant][dev].load();
          while (seen < smem_launch && !opted[variant][dev].compare_exchange_weak(seen, smem_launch)) {
          }
        }
      }
    }
    kernel<<<static_cast<unsigned>(grid), kTcThreads, smem_launch, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const uint16_t*>(p.x.const_data_ptr()), static_cast<const uint16_t*>(p.values.const_data_ptr()),
        p.bits.const_data_ptr<int32_t>(), p.row_ptr.const_data_ptr<int32_t>(), p.block_ptr.const_data_ptr<int32_t>(),
        p.bias.defined() ? static_cast<const uint16_t*>(p.bias.const_data_ptr()) : nullptr,
        static_cast<uint16_t*>(y.mutable_data_ptr()), static_cast<int>(p.m), p.rows, p.cols, p.bits.size(1),
        bitmap_blocks(p.cols), p.values.numel(), row_cap, mis, x_fast);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const bool bf16 = dtype == at::kBFloat16;
  if (lean) {
    if (p.m <= 8) {
      bf16 ? go(gemv_tc_kernel<true, 8, true>, 4) : go(gemv_tc_kernel<false, 8, true>, 5);
    } else {
      bf16 ? go(gemv_tc_kernel<true, 16, true>, 6) : go(gemv_tc_kernel<false, 16, true>, 7);
    }
  } else if (p.m <= 8) {
    bf16 ? go(gemv_tc_kernel<true, 8, false>, 0) : go(gemv_tc_kernel<false, 8, false>, 1);
  } else {
    bf16 ? go(gemv_tc_kernel<true, 16, false>, 2) : go(gemv_tc_kernel<false, 16, false>, 3);
  }
  return true;
}

// MULTIFLOW_BITMAP_GEMV: the few-row kernel, read at each call. "tc" (unset or empty: the
// default): gemv_tc_kernel for float16 / bfloat16 on sm_80+, up to 16 rows of x,
// gemv_kernel otherwise; "v1": gemv_kernel, up to 8 rows; "tc2": as tc with the lean
// decode (not yet run on a GPU: opt-in until it is measured).
enum class Gemv { kTc, kV1, kTc2 };
Gemv gemv_choice() {
  return static_cast<Gemv>(
      env_choice("MULTIFLOW_BITMAP_GEMV", {"tc", "v1", "tc2"}, "multiflow::_bitmap_linear_cuda"));
}

at::Tensor decode_dense(const BitmapProblem& p) {
  at::Tensor dense = at::empty({p.rows, p.cols}, p.values.options());
  const int64_t words = p.bits.size(1);
  const int64_t items = p.rows * ceil_div(words, static_cast<int64_t>(kPassWords));
  if (items == 0) {
    return dense;
  }
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::max<int64_t>(1, std::min(ceil_div(items * 32, static_cast<int64_t>(kDecodeThreads)),
                                                     sms * kBlocksPerSm));
  const bool vec = p.cols % 8 == 0 && reinterpret_cast<uintptr_t>(dense.const_data_ptr()) % 16 == 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_element_bits(p.values.scalar_type(), [&](auto zero) {
    using E = decltype(zero);
    decode_kernel<E><<<static_cast<unsigned>(grid), kDecodeThreads, 0, stream>>>(
        static_cast<const E*>(p.values.const_data_ptr()), p.bits.const_data_ptr<int32_t>(),
        p.row_ptr.const_data_ptr<int32_t>(), p.block_ptr.const_data_ptr<int32_t>(),
        static_cast<E*>(dense.mutable_data_ptr()), p.rows, p.cols, words, bitmap_blocks(p.cols), p.values.numel(), vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dense;
}

at::Tensor bitmap_linear_cuda(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features,
    const std::optional<at::Tensor>& bias) {
  const BitmapProblem p =
      prepare_bitmap_linear(x, values, bits, row_ptr, block_ptr, in_features, bias, "multiflow::_bitmap_linear_cuda");
  const c10::cuda::CUDAGuard guard(p.x.device());
  if (auto y = trivial_linear_result(p)) {
    return *y;
  }
  // Few rows: the tensor-core kernel (16-bit types, sm_80+, up to 16 rows of x) unless
  // MULTIFLOW_BITMAP_GEMV=v1, else gemv_kernel up to 8 rows; then decode + cuBLAS.
  const Gemv gemv = gemv_choice();
  if (gemv != Gemv::kV1 && p.m <= kRowsTc) {
    at::Tensor y = at::empty({p.m, p.rows}, p.x.options());
    if (launch_gemv_tc(p, y, gemv == Gemv::kTc2)) {
      return y.view(p.out_shape);
    }
  }
  if (p.m <= kRowsGemv) {
    at::Tensor y = at::empty({p.m, p.rows}, p.x.options());
    const auto dtype = p.x.scalar_type();
    if (dtype == at::kFloat) {
      launch_gemv_rows<float>(p, y);
    } else if (dtype == at::kHalf) {
      launch_gemv_rows<c10::Half>(p, y);
    } else {
      launch_gemv_rows<c10::BFloat16>(p, y);
    }
    return y.view(p.out_shape);
  }
  // cuBLAS on the decoded weight: F.linear exactly, inf / NaN of x included.
  return at::linear(p.x, decode_dense(p), p.bias.defined() ? std::optional<at::Tensor>(p.bias) : std::nullopt)
      .view(p.out_shape);
}

// The public op's CUDA kernel: MULTIFLOW_BITMAP_CUDA (read at each call) "cpp", empty or
// unset: bitmap_linear_cuda above; "triton": the private op _bitmap_linear_triton (its
// CUDA kernel is registered in Python, multiflow_kernels/triton); anything else: a
// ValueError naming the variable. Registered here rather than in Python so the default
// path has no hop through the interpreter.
at::Tensor bitmap_linear_public_cuda(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features,
    const std::optional<at::Tensor>& bias) {
  if (!env_switch("MULTIFLOW_BITMAP_CUDA", "cpp", "triton", "multiflow::bitmap_linear")) {
    return bitmap_linear_cuda(x, values, bits, row_ptr, block_ptr, in_features, bias);
  }
  static const auto triton_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("multiflow::_bitmap_linear_triton", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, int64_t, const std::optional<at::Tensor>&)>();
  return triton_op.call(x, values, bits, row_ptr, block_ptr, in_features, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CUDA, m) {
  m.impl("_bitmap_linear_cuda", &bitmap_linear_cuda);
  m.impl("bitmap_linear", &bitmap_linear_public_cuda);
}

}  // namespace multiflow::cuda
