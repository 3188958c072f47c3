// _bitmap_linear_cuda: bitmap_linear (y = x @ W.T + bias, W in the bitmap format)
// in CUDA C++. A private op; the public op's CUDA kernel (bitmap_linear_public_cuda, at the
// end) calls it unless MULTIFLOW_BITMAP_CUDA=triton picks the Triton kernel. The few-row
// kernel gemv_kernel (now MULTIFLOW_BITMAP_GEMV=v1) passed every CUDA test on an H200 at
// 2.3-36x the Triton kernel's speed (benchmarks/RESULTS.md); gemv2_kernel (the default)
// is newer: see benchmarks/RESULTS.md for where it stands.
//
// The format (csrc/bitmap.h): values (nnz,) the kept weights row-major; bits int32
// (out, words = ceil(in / 32)), bit b of word w of row r keeps column 32 w + b;
// row_ptr int64 (out + 1,) the index in values of row r's first kept weight;
// block_ptr int32 (out, ceil(in / 512)) the kept weights of row r before column 512 k.
//
// Paths, by the number of rows m of x (x.reshape(-1, in)):
//
//  * m <= 16 (kRowsGemv2, the memory-bound decode regime): gemv2_kernel (below, after
//    gemv_kernel) reads the format once, a warp per output row, each piece of the row's
//    values staged in shared memory with all its loads in flight at once.
//
//  * m <= 8 under MULTIFLOW_BITMAP_GEMV=v1: gemv_kernel, the first few-row kernel. A
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
//  * more rows (or a gemv2 block the device cannot give its shared memory):
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
// Determinism: no atomics; every output element is summed by one warp in a fixed
// order (chunks ascending, each lane's bits ascending, a fixed shuffle tree).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "bitmap.h"
#include "ceil_div.h"
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

// Each lane's first index in values for its word of a pass over the words
// [32 q, 32 q + 32) of row r: lane L holds word 32 q + L (u, 0 past the row), whose
// block is 2 q + L / 16. Inclusive scan of the popcounts over each 16-lane half,
// then row_ptr[r] + block_ptr[r, block] + the half's count before the lane. The sum
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
  const int64_t in_block = block < blocks ? static_cast<int64_t>(__ldg(block_ptr_row + block)) : 0;
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
    const int64_t* __restrict__ row_ptr,
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
    row_start[j] = row0 + j < rows ? static_cast<uint64_t>(__ldg(row_ptr + row0 + j)) : 0;
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
      const int32_t* block_ptr_row = block_ptr + r * blocks;
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

// ---- few rows, staged (gemv2_kernel; the default, MULTIFLOW_BITMAP_GEMV=v1 picks gemv_kernel).
//
// One warp per output row; a block of kGemv2Warps warps owns kGemv2Warps consecutive rows.
// The row is walked in pieces of P 1024-column passes (P chosen on the host so that a
// piece's values fit a warp's staging buffer at the weight's average density with room to
// spare). Per piece, before any arithmetic, every load of the piece is in flight at once:
//  * the warp's values of the piece, [s, e) with s = row_ptr[r] + block_ptr[r, first block]
//    and e the same at the piece's end (row_ptr[r + 1] at the row's end), go to its
//    shared-memory buffer with 16-byte cp.async copies (element-wise for a 16-byte group
//    that crosses either end of values);
//  * its bit words go to registers (lane L: word L of each pass);
//  * the block stages the piece's columns of x in shared memory (xs[column][row of x], a
//    pad after each 32 columns so the 32 lanes' words start in different banks).
// Then each pass: lane L owns word L, an inclusive warp scan of the popcounts gives its
// first value (s + the counts of the passes and lanes before it), and it walks its set
// bits reading values and x from shared memory. A piece whose [s, e) does not fit the
// buffer, or is not inside [0, nnz) (a hostile row_ptr / block_ptr), reads its values
// from global memory instead (indices checked against [0, nnz)): slower, same numbers.
// Indices come from the bits and s, and are checked against [s, e) (staged) or [0, nnz).
// Numerics, non-finite x and determinism: as gemv_kernel (float32 fmaf per kept weight,
// each lane's bits ascending, a fixed shuffle tree).
constexpr int kGemv2Warps = 8;
constexpr int kGemv2Threads = 32 * kGemv2Warps;
constexpr int kGemv2MaxPasses = 8;           // a piece is at most 8192 columns
constexpr int64_t kGemv2BufBytes = 4096;     // a warp's values buffer (+16 bytes of alignment slack)
constexpr int64_t kGemv2ChunkXBytes = 16 * 1024;
constexpr int64_t kRowsGemv2 = 16;

// Bytes of padding after each 32 columns of xs: at least one bank, aligned for the
// column loads (kM elements, up to 16-byte loads).
template <typename scalar_t, int kM>
constexpr int xs_pad_elems() {
  constexpr int col_bytes = kM * static_cast<int>(sizeof(scalar_t));
  constexpr int pad_bytes = col_bytes < 4 ? 4 : (col_bytes > 16 ? 16 : col_bytes);
  return pad_bytes / static_cast<int>(sizeof(scalar_t));
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
#else
  *reinterpret_cast<uint4*>(smem_dst) = __ldg(reinterpret_cast<const uint4*>(gmem_src));
#endif
}

__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_all;\n" ::: "memory");
#endif
}

// Walks lane's word `word` of one pass: kept weight k of the word is src[idx + k], read
// where idx + k < end (0 past it): the staged buffer (32-bit offsets from its start) or
// values (64-bit indices, end = nnz). xw: the word's 32 columns of xs.
template <typename scalar_t, int kM, typename Index>
__device__ __forceinline__ void walk_word(
    uint32_t u,
    Index idx,
    Index end,
    const scalar_t* __restrict__ src,
    const scalar_t* __restrict__ xw,
    float (&acc)[kM]) {
  for (; u != 0u; ++idx) {
    const int b = __ffs(u) - 1;
    u &= u - 1u;
    const float v = idx < end ? static_cast<float>(src[idx]) : 0.f;
    const XColumn<scalar_t, kM> xc = *reinterpret_cast<const XColumn<scalar_t, kM>*>(xw + b * kM);
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      acc[i] = fmaf(v, static_cast<float>(xc.v[i]), acc[i]);
    }
  }
}

// Dynamic shared memory: xs (passes * 32 regions of 32 * kM + pad elements), nf (passes *
// 32 * kM words, as gemv_kernel), then kGemv2Warps buffers of kGemv2BufBytes + 16 bytes.
// mis: values' address modulo 16, in elements (16-byte groups of values start at
// elements g with (g + mis) % V == 0, V = 16 / sizeof(scalar_t)).
template <typename scalar_t, int kM>
__global__ void __launch_bounds__(kGemv2Threads, kM >= 16 ? 2 : 4) gemv2_kernel(
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ values,
    const int32_t* __restrict__ bits,
    const int64_t* __restrict__ row_ptr,
    const int32_t* __restrict__ block_ptr,
    const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ y,
    int m,
    int64_t rows,
    int64_t cols,
    int64_t words,
    int64_t blocks,
    int64_t nnz,
    int passes,
    int mis) {
  constexpr int kV = 16 / static_cast<int>(sizeof(scalar_t));
  constexpr int kPad = xs_pad_elems<scalar_t, kM>();
  constexpr int kRegion = 32 * kM + kPad;  // elements of xs per 32 columns
  constexpr int64_t kCap = kGemv2BufBytes / static_cast<int64_t>(sizeof(scalar_t));  // values a piece may stage
  extern __shared__ __align__(16) unsigned char smem[];
  const int piece_words = passes * 32;
  const int64_t piece_cols = static_cast<int64_t>(piece_words) * 32;
  scalar_t* xs = reinterpret_cast<scalar_t*>(smem);
  uint32_t* nf = reinterpret_cast<uint32_t*>(smem + static_cast<size_t>(piece_words) * kRegion * sizeof(scalar_t));
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  scalar_t* buf = reinterpret_cast<scalar_t*>(reinterpret_cast<unsigned char*>(nf + piece_words * kM) +
                                              static_cast<size_t>(warp) * (kGemv2BufBytes + 16));
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGemv2Warps + warp;
  const bool has_row = r < rows;  // warp-uniform; a warp past the last row still stages x

  float acc[kM];
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    acc[i] = 0.f;
  }
  const uint64_t row_start = has_row ? static_cast<uint64_t>(__ldg(row_ptr + r)) : 0;
  const uint64_t row_end = has_row ? static_cast<uint64_t>(__ldg(row_ptr + r + 1)) : 0;
  const int32_t* bits_row = bits + (has_row ? r : 0) * words;
  const int32_t* block_ptr_row = block_ptr + (has_row ? r : 0) * blocks;

  for (int64_t c0 = 0; c0 < cols; c0 += piece_cols) {
    // This piece's values: [s, e) (unsigned: a hostile offset wraps and fails `fits`).
    uint64_t s = 0, e = 0;
    bool fits = false;
    uint32_t wbits[kGemv2MaxPasses];
    if (has_row) {
      const int64_t b0 = c0 / kBitmapBlockCols;
      const int64_t b1 = (c0 + piece_cols) / kBitmapBlockCols;
      s = row_start + static_cast<uint64_t>(static_cast<int64_t>(__ldg(block_ptr_row + b0)));
      e = b1 < blocks ? row_start + static_cast<uint64_t>(static_cast<int64_t>(__ldg(block_ptr_row + b1))) : row_end;
#pragma unroll
      for (int p = 0; p < kGemv2MaxPasses; ++p) {
        const int64_t wd = c0 / 32 + p * 32 + lane;
        wbits[p] = p < passes && wd < words ? static_cast<uint32_t>(__ldg(bits_row + wd)) : 0u;
      }
      fits = s <= e && e <= static_cast<uint64_t>(nnz) && e - s <= static_cast<uint64_t>(kCap);
    }
    // Stage the values: 16-byte groups from a (s rounded down to a group), element-wise
    // where a group crosses 0 or nnz.
    const int64_t a = fits ? static_cast<int64_t>(s) - (static_cast<int64_t>(s) + mis) % kV : 0;
    if (fits) {
      const int64_t groups = (static_cast<int64_t>(e) - a + kV - 1) / kV;
      for (int64_t t = lane; t < groups; t += 32) {
        const int64_t g0 = a + t * kV;
        if (g0 >= 0 && g0 + kV <= nnz) {
          cp_async_16(buf + t * kV, values + g0);
        } else {
#pragma unroll
          for (int j = 0; j < kV; ++j) {
            const int64_t g = g0 + j;
            buf[t * kV + j] = g >= 0 && g < nnz ? values[g] : static_cast<scalar_t>(0.f);
          }
        }
      }
    }
    // Stage x (as gemv_kernel, padded regions): loads first, then stores.
    bool any_not_finite = false;
    const int total = kM * piece_words * 32;
    constexpr int kUnroll = kM <= 2 || kM >= 16 ? 8 : 4;  // loads in flight per thread (no spills)
    for (int e0 = threadIdx.x; e0 < total; e0 += kGemv2Threads * kUnroll) {
      scalar_t v[kUnroll];
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int el = e0 + q * kGemv2Threads;
        const int i = el / static_cast<int>(piece_cols);
        const int64_t col = c0 + (el - i * piece_cols);
        v[q] = el < total && i < m && col < cols ? x[static_cast<int64_t>(i) * cols + col] : static_cast<scalar_t>(0.f);
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int el = e0 + q * kGemv2Threads;
        const int i = el / static_cast<int>(piece_cols);
        const int c = el - i * static_cast<int>(piece_cols);
        const bool in_range = el < total;  // warp-uniform: total is a multiple of 32
        if (in_range) {
          xs[(c >> 5) * kRegion + (c & 31) * kM + i] = v[q];
          const bool bad = not_finite(static_cast<float>(v[q]));
          const uint32_t word = __ballot_sync(kFullMask, bad);
          if (lane == 0) {
            nf[(c >> 5) * kM + i] = word;
          }
          any_not_finite |= bad;
        }
      }
    }
    cp_async_wait_all();
    const bool chunk_not_finite = __syncthreads_or(any_not_finite) != 0;

    if (has_row) {
      uint64_t next = s;  // first value of the pass, from the bits
#pragma unroll
      for (int p = 0; p < kGemv2MaxPasses; ++p) {
        if (p >= passes) {
          break;
        }
        const uint32_t word = wbits[p];
        const int count = __popc(word);
        int inclusive = count;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
          const int before = __shfl_up_sync(kFullMask, inclusive, offset);
          if (lane >= offset) {
            inclusive += before;
          }
        }
        const uint64_t first = next + static_cast<uint64_t>(inclusive - count);
        next += static_cast<uint64_t>(__shfl_sync(kFullMask, inclusive, 31));
        const scalar_t* xw = xs + (p * 32 + lane) * kRegion;
        if (fits) {  // first - a and e - a are below kCap + kV: 32-bit offsets into the buffer
          walk_word<scalar_t, kM, uint32_t>(word, static_cast<uint32_t>(first - static_cast<uint64_t>(a)),
                                            static_cast<uint32_t>(e - static_cast<uint64_t>(a)), buf, xw, acc);
        } else {
          walk_word<scalar_t, kM, uint64_t>(word, first, static_cast<uint64_t>(nnz), values, xw, acc);
        }
        if (chunk_not_finite) {
#pragma unroll
          for (int i = 0; i < kM; ++i) {
            if ((nf[(p * 32 + lane) * kM + i] & ~word) != 0u) {
              acc[i] += __int_as_float(0x7fc00000);  // 0 * inf or 0 * NaN at a pruned column
            }
          }
        }
      }
    }
    __syncthreads();  // the next piece overwrites xs and the buffers
  }

  if (!has_row) {
    return;
  }
#pragma unroll
  for (int i = 0; i < kM; ++i) {
    float sum = acc[i];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      sum += __shfl_xor_sync(kFullMask, sum, offset);
    }
    if (lane == 0 && i < m) {
      if (bias != nullptr) {
        sum += static_cast<float>(bias[r]);
      }
      y[static_cast<int64_t>(i) * rows + r] = static_cast<scalar_t>(sum);
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
    const int64_t* __restrict__ row_ptr,
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
        pass_first_index(word, lane, static_cast<uint64_t>(__ldg(row_ptr + r)), block_ptr + r * blocks, blocks, pass);
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
      p.row_ptr.const_data_ptr<int64_t>(), p.block_ptr.const_data_ptr<int32_t>(),
      p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
      static_cast<int>(p.m), p.rows, p.cols, p.bits.size(1), p.block_ptr.size(1), p.values.numel(),
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

// Passes per piece of gemv2_kernel: as many as kGemv2ChunkXBytes of x hold (at least
// one), no more than the row needs, and few enough that a piece at 1.3x the weight's
// average density (+ 2% of the columns) fits a warp's buffer.
template <typename scalar_t, int kM>
int gemv2_passes(const BitmapProblem& p) {
  const int64_t esize = static_cast<int64_t>(sizeof(scalar_t));
  const int64_t by_x = std::max<int64_t>(1, kGemv2ChunkXBytes / (kM * esize * kPassCols));
  const double density = static_cast<double>(p.values.numel()) / static_cast<double>(std::max<int64_t>(1, p.rows * p.cols));
  const double per_pass = static_cast<double>(kPassCols) * std::min(1.0, 1.3 * density + 0.02);
  const int64_t by_buf = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(kGemv2BufBytes / esize) / per_pass));
  const int64_t row_passes = ceil_div(p.cols, kPassCols);
  const int64_t most = std::min({by_x, by_buf, row_passes, static_cast<int64_t>(kGemv2MaxPasses)});
  // Pieces of equal size (11 passes at most 5: 4 + 4 + 3, not 5 + 5 + 1).
  return static_cast<int>(ceil_div(row_passes, ceil_div(row_passes, most)));
}

// Dynamic shared memory of gemv2_kernel<scalar_t, kM> with `passes` passes per piece.
template <typename scalar_t, int kM>
size_t gemv2_smem(int passes) {
  const size_t piece_words = static_cast<size_t>(passes) * 32;
  const size_t region = 32 * kM + xs_pad_elems<scalar_t, kM>();
  return piece_words * region * sizeof(scalar_t) + piece_words * kM * 4 +
         static_cast<size_t>(kGemv2Warps) * (kGemv2BufBytes + 16);
}

// Launches gemv2_kernel<scalar_t, kM>; false (nothing launched) when the device cannot give
// a block its shared memory (above 48 KB it must opt in: GPUs before sm_80 may have less).
template <typename scalar_t, int kM>
bool launch_gemv2(const BitmapProblem& p, const at::Tensor& y) {
  const int passes = gemv2_passes<scalar_t, kM>(p);
  const size_t smem = gemv2_smem<scalar_t, kM>(passes);
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (smem > prop->sharedMemPerBlockOptin) {
    return false;
  }
  const int64_t grid = ceil_div(p.rows, static_cast<int64_t>(kGemv2Warps));
  TORCH_CHECK(grid <= 0x7fffffff, "multiflow::_bitmap_linear_cuda: too many output rows for one launch: ", p.rows);
  auto kernel = gemv2_kernel<scalar_t, kM>;
  if (smem > 48 * 1024) {
    // Once per device and size: the largest opt-in set so far (a larger one covers smaller).
    static std::atomic<size_t> opted[64];
    const int dev = p.x.get_device();
    if (dev >= 64 || opted[dev].load() < smem) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      if (dev < 64) {
        size_t seen = opted[dev].load();
        while (seen < smem && !opted[dev].compare_exchange_weak(seen, smem)) {
        }
      }
    }
  }
  const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(p.values.const_data_ptr()) % 16 / sizeof(scalar_t));
  kernel<<<static_cast<unsigned>(grid), kGemv2Threads, smem, at::cuda::getCurrentCUDAStream()>>>(
      p.x.const_data_ptr<scalar_t>(), p.values.const_data_ptr<scalar_t>(), p.bits.const_data_ptr<int32_t>(),
      p.row_ptr.const_data_ptr<int64_t>(), p.block_ptr.const_data_ptr<int32_t>(),
      p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>(),
      static_cast<int>(p.m), p.rows, p.cols, p.bits.size(1), p.block_ptr.size(1), p.values.numel(), passes, mis);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename scalar_t>
bool launch_gemv2_rows(const BitmapProblem& p, const at::Tensor& y) {
  if (p.m <= 1) {
    return launch_gemv2<scalar_t, 1>(p, y);
  } else if (p.m <= 2) {
    return launch_gemv2<scalar_t, 2>(p, y);
  } else if (p.m <= 4) {
    return launch_gemv2<scalar_t, 4>(p, y);
  } else if (p.m <= 8) {
    return launch_gemv2<scalar_t, 8>(p, y);
  }
  return launch_gemv2<scalar_t, 16>(p, y);
}

// MULTIFLOW_BITMAP_GEMV: the few-row kernel, "v2" (gemv2_kernel, up to 16 rows of x; unset
// or empty: the default) or "v1" (gemv_kernel, up to 8 rows). Read at each call.
bool use_gemv_v1() {
  const char* v = std::getenv("MULTIFLOW_BITMAP_GEMV");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "v2") == 0) {
    return false;
  }
  TORCH_CHECK_VALUE(std::strcmp(v, "v1") == 0,
                    "multiflow::_bitmap_linear_cuda: MULTIFLOW_BITMAP_GEMV must be one of v1, v2 (or unset), got '", v,
                    "'");
  return true;
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
        p.row_ptr.const_data_ptr<int64_t>(), p.block_ptr.const_data_ptr<int32_t>(),
        static_cast<E*>(dense.mutable_data_ptr()), p.rows, p.cols, words, p.block_ptr.size(1), p.values.numel(), vec);
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
  const bool v1 = use_gemv_v1();
  if (p.m <= (v1 ? kRowsGemv : kRowsGemv2)) {
    at::Tensor y = at::empty({p.m, p.rows}, p.x.options());
    const auto dtype = p.x.scalar_type();
    bool launched = true;
    if (v1) {
      if (dtype == at::kFloat) {
        launch_gemv_rows<float>(p, y);
      } else if (dtype == at::kHalf) {
        launch_gemv_rows<c10::Half>(p, y);
      } else {
        launch_gemv_rows<c10::BFloat16>(p, y);
      }
    } else if (dtype == at::kFloat) {
      launched = launch_gemv2_rows<float>(p, y);
    } else if (dtype == at::kHalf) {
      launched = launch_gemv2_rows<c10::Half>(p, y);
    } else {
      launched = launch_gemv2_rows<c10::BFloat16>(p, y);
    }
    if (launched) {
      return y.view(p.out_shape);
    }
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
  const char* v = std::getenv("MULTIFLOW_BITMAP_CUDA");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "cpp") == 0) {
    return bitmap_linear_cuda(x, values, bits, row_ptr, block_ptr, in_features, bias);
  }
  TORCH_CHECK_VALUE(std::strcmp(v, "triton") == 0,
                    "MULTIFLOW_BITMAP_CUDA must be one of ('cpp', 'triton') (or unset), got '", v, "'");
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
