// pack_mask / unpack_mask on CUDA.
//
// The words of the packed mask, (R, W) contiguous, are numbered flat:
// g = r * W + w. Two kernels per op:
//
// Whole-word rows (C % 32 == 0, the mask contiguous and 16-byte aligned: any
// weight whose in_features is a multiple of 32). The mask is then one flat run
// of bools, 32 per word, with no padding: a thread packs word g from two
// 16-byte loads (or unpacks it into two 16-byte stores), turning 4 bytes into
// 4 bits and back with a byte compare and a multiply.
//
// Any other mask (ragged rows, strided rows, unaligned views). A warp takes 32
// consecutive words g0 .. g0 + 31, walking across row ends (narrow rows share a
// warp). Packing: at step i the 32 lanes read the 32 bools of word g0 + i
// (consecutive bytes, one 32-byte sector) and __ballot_sync makes the word,
// which lane i keeps; the warp then stores its 32 words in one coalesced
// 128-byte store. Unpacking mirrors it with one coalesced load of the words and
// __shfl_sync broadcasting word i at step i.
//
// Both spread their work over a grid-stride loop, so any size fits one launch.
// No atomics, no reductions: every word and every output bool is written by
// exactly one thread, and repeated runs agree bitwise. A bool byte other than
// 0/1 counts as true, as on CPU.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "ceil_div.h"
#include "maskpack.h"

namespace multiflow::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr unsigned kFullWarp = 0xffffffffu;
// Blocks per multiprocessor the grid is capped at (a few waves of resident
// blocks); more work loops in the grid-stride loop.
constexpr int64_t kBlocksPerSm = 32;

// ---- Whole-word rows: one thread per word.

// Bits 0..3 = bytes 0..3 of x != 0. The compare leaves 0/1 in each byte; the
// multiply's partial products land on distinct bits, byte k's on bit 24 + k.
__device__ __forceinline__ uint32_t gather4(uint32_t x) {
  return ((__vcmpne4(x, 0u) & 0x01010101u) * 0x01020408u) >> 24;
}

// The inverse: byte k = bit k of the low 4 bits of n (bit k moves to bit 8k).
__device__ __forceinline__ uint32_t scatter4(uint32_t n) {
  return ((n & 0xFu) * 0x00204081u) & 0x01010101u;
}

__global__ void __launch_bounds__(kThreads) pack_whole_words_kernel(
    const uint4* __restrict__ mask,  // 32 bools = two uint4 per word
    int64_t n_words,
    int32_t* __restrict__ bits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < n_words; g += stride) {
    const uint4 lo = mask[2 * g];
    const uint4 hi = mask[2 * g + 1];
    const uint32_t word = gather4(lo.x) | gather4(lo.y) << 4 | gather4(lo.z) << 8 | gather4(lo.w) << 12 |
                          gather4(hi.x) << 16 | gather4(hi.y) << 20 | gather4(hi.z) << 24 | gather4(hi.w) << 28;
    bits[g] = static_cast<int32_t>(word);
  }
}

__global__ void __launch_bounds__(kThreads) unpack_whole_words_kernel(
    const int32_t* __restrict__ bits,
    int64_t n_words,
    uint4* __restrict__ mask) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < n_words; g += stride) {
    const auto w = static_cast<uint32_t>(bits[g]);
    mask[2 * g] = make_uint4(scatter4(w), scatter4(w >> 4), scatter4(w >> 8), scatter4(w >> 12));
    mask[2 * g + 1] = make_uint4(scatter4(w >> 16), scatter4(w >> 20), scatter4(w >> 24), scatter4(w >> 28));
  }
}

// ---- Any mask: one warp per 32 consecutive words.

__global__ void __launch_bounds__(kThreads) pack_any_kernel(
    const uint8_t* __restrict__ mask,
    int64_t row_stride,
    int64_t cols,
    int64_t words,  // per row
    int64_t n_words,
    int32_t* __restrict__ bits) {
  const int lane = threadIdx.x % 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;  // 32 words per warp
  for (int64_t g0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32) * 32; g0 < n_words;
       g0 += step) {  // warp-uniform: every lane takes part in each ballot
    const int64_t r = g0 / words;
    int64_t w = g0 - r * words;
    const uint8_t* row = mask + r * row_stride;
    const int n = static_cast<int>(std::min<int64_t>(32, n_words - g0));
    uint32_t mine = 0;
#pragma unroll 8
    for (int i = 0; i < n; ++i) {
      const int64_t col = w * 32 + lane;
      const uint32_t word = __ballot_sync(kFullWarp, col < cols && row[col] != 0);  // padding bits: 0
      if (lane == i) {
        mine = word;
      }
      if (++w == words) {
        w = 0;
        row += row_stride;
      }
    }
    if (lane < n) {
      bits[g0 + lane] = static_cast<int32_t>(mine);
    }
  }
}

__global__ void __launch_bounds__(kThreads) unpack_any_kernel(
    const int32_t* __restrict__ bits,
    int64_t cols,
    int64_t words,  // per row
    int64_t n_words,
    bool* __restrict__ mask) {
  const int lane = threadIdx.x % 32;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t g0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32) * 32; g0 < n_words;
       g0 += step) {
    const int64_t r = g0 / words;
    int64_t w = g0 - r * words;
    bool* row = mask + r * cols;
    const int n = static_cast<int>(std::min<int64_t>(32, n_words - g0));
    const uint32_t mine = lane < n ? static_cast<uint32_t>(bits[g0 + lane]) : 0u;
#pragma unroll 8
    for (int i = 0; i < n; ++i) {
      const uint32_t word = __shfl_sync(kFullWarp, mine, i);
      const int64_t col = w * 32 + lane;
      if (col < cols) {
        row[col] = (word >> lane) & 1u;
      }
      if (++w == words) {
        w = 0;
        row += cols;
      }
    }
  }
}

// ---- Launchers.

unsigned blocks_for(int64_t threads) {
  const int64_t max_blocks = kBlocksPerSm * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::min(ceil_div(threads, kThreads), max_blocks));
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  const PackProblem p = prepare_pack_mask(mask);
  const int64_t n_words = p.bits.numel();
  if (n_words == 0) {
    return p.bits;
  }
  const c10::cuda::CUDAGuard device_guard(mask.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* in = reinterpret_cast<const uint8_t*>(p.mask.const_data_ptr<bool>());
  int32_t* out = p.bits.mutable_data_ptr<int32_t>();
  const bool flat = p.cols % 32 == 0 && (p.rows == 1 || p.row_stride == p.cols);
  if (flat && aligned16(in)) {
    pack_whole_words_kernel<<<blocks_for(n_words), kThreads, 0, stream>>>(
        reinterpret_cast<const uint4*>(in), n_words, out);
  } else {
    pack_any_kernel<<<blocks_for(n_words), kThreads, 0, stream>>>(  // 32 words per warp: one thread per word
        in, p.row_stride, p.cols, p.bits.size(1), n_words, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p.bits;
}

at::Tensor unpack_mask_cuda(const at::Tensor& bits, int64_t cols) {
  const UnpackProblem p = prepare_unpack_mask(bits, cols);
  const int64_t n_words = p.bits.numel();
  if (n_words == 0) {
    return p.mask;
  }
  const c10::cuda::CUDAGuard device_guard(bits.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int32_t* in = p.bits.const_data_ptr<int32_t>();
  bool* out = p.mask.mutable_data_ptr<bool>();
  if (p.cols % 32 == 0 && aligned16(out)) {  // the output is ours: contiguous, rows of whole words
    unpack_whole_words_kernel<<<blocks_for(n_words), kThreads, 0, stream>>>(
        in, n_words, reinterpret_cast<uint4*>(out));
  } else {
    unpack_any_kernel<<<blocks_for(n_words), kThreads, 0, stream>>>(in, p.cols, p.bits.size(1), n_words, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p.mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CUDA, m) {
  m.impl("pack_mask", &pack_mask_cuda);
  m.impl("unpack_mask", &unpack_mask_cuda);
}

}  // namespace multiflow::cuda
