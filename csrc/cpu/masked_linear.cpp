// masked_linear and its backward on CPU: blocked GEMMs whose B operand is built
// tile by tile, with the mask applied while the tile is built; a forward with
// 1-16 rows of x instead takes the few-row kernel (MaskedGemvFn), which reads each
// weight row in place (once per 8 rows of x) with the mask applied in registers.
//
//   forward  y  (M x N) = x (M x K) @ (W*M)^T      B tile [k][n] = w[n, k] * bit(n, k)
//   grad_x  gx  (M x K) = g (M x N) @ (W*M)        B tile [n][k] = w[n, k] * bit(n, k)
//   grad_w  gw  (N x K) = (g^T (N x M) @ x) * M    B tile [m][k] = x[m, k]; the epilogue
//                                                  writes bit(n, k) ? sum : 0
//
// Blocking: an output block is kBlockRows rows x kBlockCols columns; a parallel
// task owns one column block and a run of row blocks. The reduction runs
// kBlockDepth at a time, each step filling a float32 B tile (kBlockDepth x
// kBlockCols, 128 KiB: L2) in a buffer of the task's own, which the per-ISA
// micro-kernel (masked_tile_impl.h) streams through in register panels for
// every row block of the run. A is read in place as float32 (half inputs are
// widened once, up front). Accumulation is float32 throughout; the epilogue
// adds the bias and rounds once to the output dtype.
//
// Determinism: every output element belongs to one task and is summed in a
// fixed order, whatever the thread count: blocked GEMMs depth blocks ascending,
// p ascending inside; the few-row kernel its row's vector lanes, then the
// row's partial last word.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ceil_div.h"
#include "cpu/dispatch_activation.h"
#include "cpu/isa.h"
#include "cpu/masked_tile.h"
#include "masked_linear.h"

namespace multiflow::cpu {
namespace {

constexpr int64_t kBlockRows = 96;   // a multiple of the micro-kernel's 6-row panels
constexpr int64_t kBlockCols = 128;  // a multiple of kMaskedColPad
constexpr int64_t kBlockDepth = 256;
// Row blocks a task multiplies with each B tile at most (its accumulators: 1.5 MiB).
constexpr int64_t kMaxRunBlocks = 32;

// The forward with at most this many rows of x takes the few-row kernel (MaskedGemvFn,
// kMaskedGemvRows rows per pass over a weight row), which reads the weight in place;
// more rows take the blocked GEMM, which builds masked weight tiles once per run of row
// blocks.
constexpr int64_t kGemvMaxRows = 16;

const MaskedTiles& tiles() {
  static const MaskedTiles table = MULTIFLOW_ISA_TABLE(masked_tiles);
  return table;
}

// w where bit k of the row is set, else +0.0f (even for a NaN or Inf w), without a
// branch: a random mask would mispredict half of them.
inline float masked_value(float w, const int32_t* row_words, int64_t k) {
  const uint32_t keep = 0u - ((static_cast<uint32_t>(row_words[k >> 5]) >> (k & 31)) & 1u);
  uint32_t u;
  std::memcpy(&u, &w, sizeof(u));
  u &= keep;
  std::memcpy(&w, &u, sizeof(u));
  return w;
}

// out (rows x cols) = A (rows x depth, float32 at a with strides a_rs, a_cs) @ B,
// block by block. fill(b, ldb, d0, db, c0, cb) writes b[p * ldb + j] = B[d0 + p, c0 + j]
// for p < db, j < cb; epilogue(c, ldc, r0, rb, c0, cb) consumes the finished block
// c[i * ldc + j] = out[r0 + i, c0 + j].
//
// A task owns one column block and a run of row blocks: for each depth block it fills
// the B tile once and multiplies every one of its row blocks with it (the fill, a
// masked and possibly transposed copy of the weight, is paid once per tile, not once per
// row block: 2048 rows are 22 row blocks). Each output element is still summed depth
// block by depth block, p ascending, whatever the split into tasks.
template <typename Fill, typename Epilogue>
void blocked_gemm(
    int64_t rows,
    int64_t cols,
    int64_t depth,
    const float* a,
    int64_t a_rs,
    int64_t a_cs,
    const Fill& fill,
    const Epilogue& epilogue) {
  if (rows == 0 || cols == 0) {
    return;
  }
  const GemmTileFn gemm = tiles().gemm;
  const int64_t n_col_blocks = ceil_div(cols, kBlockCols);
  const int64_t n_row_blocks = ceil_div(rows, kBlockRows);
  // Row blocks per task: all of them (at most kMaxRunBlocks), unless the column blocks
  // alone would leave threads idle (at least two tasks per thread where the rows allow).
  const int64_t want_tasks = 2 * static_cast<int64_t>(at::get_num_threads());
  const int64_t row_runs = std::min(n_row_blocks, std::max<int64_t>(1, ceil_div(want_tasks, n_col_blocks)));
  const int64_t run_blocks = std::min(kMaxRunBlocks, ceil_div(n_row_blocks, row_runs));
  const int64_t n_runs = ceil_div(n_row_blocks, run_blocks);
  at::parallel_for(0, n_col_blocks * n_runs, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    std::vector<float> b_tile(kBlockDepth * kBlockCols);
    std::vector<float> c_blocks(run_blocks * kBlockRows * kBlockCols);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb0 = (t / n_col_blocks) * run_blocks;  // first row block of the run
      const int64_t rb_end = std::min(n_row_blocks, rb0 + run_blocks);
      const int64_t c0 = (t % n_col_blocks) * kBlockCols;
      const int64_t cb = std::min(kBlockCols, cols - c0);
      const int64_t cb_pad = ceil_div(cb, kMaskedColPad) * kMaskedColPad;
      std::fill(c_blocks.begin(), c_blocks.end(), 0.0f);
      for (int64_t d0 = 0; d0 < depth; d0 += kBlockDepth) {
        const int64_t db = std::min(kBlockDepth, depth - d0);
        float* b = b_tile.data();
        if (cb_pad != cb) {  // the padding columns feed only columns nobody reads; keep them finite
          for (int64_t p = 0; p < db; ++p) {
            std::fill(b + p * kBlockCols + cb, b + p * kBlockCols + cb_pad, 0.0f);
          }
        }
        fill(b, kBlockCols, d0, db, c0, cb);
        for (int64_t blk = rb0; blk < rb_end; ++blk) {
          const int64_t r0 = blk * kBlockRows;
          const int64_t rb = std::min(kBlockRows, rows - r0);
          float* c = c_blocks.data() + (blk - rb0) * kBlockRows * kBlockCols;
          gemm(a + r0 * a_rs + d0 * a_cs, a_rs, a_cs, b, kBlockCols, c, kBlockCols, rb, cb_pad, db);
        }
      }
      for (int64_t blk = rb0; blk < rb_end; ++blk) {
        const int64_t r0 = blk * kBlockRows;
        epilogue(c_blocks.data() + (blk - rb0) * kBlockRows * kBlockCols, kBlockCols, r0,
                 std::min(kBlockRows, rows - r0), c0, cb);
      }
    }
  });
}

at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

// B tile [p][j] = (W*M)[c0 + j, d0 + p]: the masked weight, transposed (forward).
template <typename scalar_t>
auto masked_weight_t(const scalar_t* w, const int32_t* bits, int64_t k, int64_t words) {
  return [=](float* b, int64_t ldb, int64_t d0, int64_t db, int64_t c0, int64_t cb) {
    for (int64_t j = 0; j < cb; ++j) {
      const scalar_t* w_row = w + (c0 + j) * k;
      const int32_t* bit_row = bits + (c0 + j) * words;
      for (int64_t p = 0; p < db; ++p) {
        const int64_t kk = d0 + p;
        b[p * ldb + j] = masked_value(static_cast<float>(w_row[kk]), bit_row, kk);
      }
    }
  };
}

// B tile [p][j] = (W*M)[d0 + p, c0 + j]: the masked weight as stored (grad_x), a row
// of the tile per vectorised masked copy (c0 is a multiple of kBlockCols, so of 32).
template <typename scalar_t>
auto masked_weight(const scalar_t* w, const int32_t* bits, int64_t k, int64_t words) {
  const MaskedCopyFn copy = for_activation_dtype("multiflow::masked_linear_backward", tiles().copy,
                                                 c10::CppTypeToScalarType<scalar_t>::value);
  return [=](float* b, int64_t ldb, int64_t d0, int64_t db, int64_t c0, int64_t cb) {
    for (int64_t p = 0; p < db; ++p) {
      copy(w + (d0 + p) * k + c0, bits + (d0 + p) * words, c0, cb, b + p * ldb);
    }
  };
}

at::Tensor masked_linear_cpu(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& mask_bits,
    const std::optional<at::Tensor>& bias) {
  const MaskedLinearProblem p = prepare_masked_linear(x, weight, mask_bits, bias);
  at::Tensor y = at::empty({p.m, p.n}, p.x.options());
  const at::Tensor xf = as_float(p.x);
  const int64_t words = p.mask_bits.size(1);
  dispatch_activation("multiflow::masked_linear", p.x.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* bias_ptr = p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const int64_t n = p.n;
    if (p.m <= kGemvMaxRows && p.k > 0) {
      // Few rows (memory-bound): each weight row is read in place, once per kMaskedGemvRows
      // rows of x, which meet it in registers; no weight tile is built.
      const MaskedGemvFn gemv = for_activation_dtype("multiflow::masked_linear", tiles().gemv, p.x.scalar_type());
      const scalar_t* w = p.weight.const_data_ptr<scalar_t>();
      const int32_t* bits = p.mask_bits.const_data_ptr<int32_t>();
      const float* xp = xf.const_data_ptr<float>();
      const int64_t m = p.m, k = p.k;
      at::parallel_for(0, n, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
        float acc[kMaskedGemvRows];
        for (int64_t r = begin; r < end; ++r) {
          const float b = bias_ptr ? static_cast<float>(bias_ptr[r]) : 0.0f;
          for (int64_t i0 = 0; i0 < m; i0 += kMaskedGemvRows) {
            const int64_t mb = std::min(kMaskedGemvRows, m - i0);
            gemv(w + r * k, bits + r * words, k, xp + i0 * k, mb, acc);
            for (int64_t i = 0; i < mb; ++i) {
              out[(i0 + i) * n + r] = static_cast<scalar_t>(acc[i] + b);
            }
          }
        }
      });
      return;
    }
    blocked_gemm(
        p.m, p.n, p.k, xf.const_data_ptr<float>(), p.k, 1,
        masked_weight_t(p.weight.const_data_ptr<scalar_t>(), p.mask_bits.const_data_ptr<int32_t>(), p.k, words),
        [&](const float* c, int64_t ldc, int64_t r0, int64_t rb, int64_t c0, int64_t cb) {
          for (int64_t i = 0; i < rb; ++i) {
            scalar_t* y_row = out + (r0 + i) * n + c0;
            for (int64_t j = 0; j < cb; ++j) {
              const float b = bias_ptr ? static_cast<float>(bias_ptr[c0 + j]) : 0.0f;
              y_row[j] = static_cast<scalar_t>(c[i * ldc + j] + b);
            }
          }
        });
  });
  return y.view(p.out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& mask_bits,
    std::array<bool, 3> output_mask) {
  const MaskedLinearProblem p = prepare_masked_linear_backward(grad_out, x, weight, mask_bits);
  at::Tensor grad_x = skipped_grad(x);
  at::Tensor grad_w = skipped_grad(x);
  at::Tensor grad_b = skipped_grad(x);
  const at::Tensor gf = as_float(p.grad_out);
  const int64_t words = p.mask_bits.size(1);
  const int64_t m = p.m, n = p.n, k = p.k;
  dispatch_activation("multiflow::masked_linear_backward", p.x.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const int32_t* bits = p.mask_bits.const_data_ptr<int32_t>();
    if (output_mask[0]) {
      grad_x = at::empty({m, k}, p.x.options());
      scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
      blocked_gemm(
          m, k, n, gf.const_data_ptr<float>(), n, 1,
          masked_weight(p.weight.const_data_ptr<scalar_t>(), bits, k, words),
          [&](const float* c, int64_t ldc, int64_t r0, int64_t rb, int64_t c0, int64_t cb) {
            for (int64_t i = 0; i < rb; ++i) {
              for (int64_t j = 0; j < cb; ++j) {
                out[(r0 + i) * k + c0 + j] = static_cast<scalar_t>(c[i * ldc + j]);
              }
            }
          });
      grad_x = grad_x.view(x.sizes());
    }
    if (output_mask[1]) {
      grad_w = at::empty({n, k}, p.x.options());
      scalar_t* out = grad_w.mutable_data_ptr<scalar_t>();
      const at::Tensor xf = as_float(p.x);
      const float* xp = xf.const_data_ptr<float>();
      // A = g^T: element (row n, depth m) of g (M x N) is at n + m * N.
      blocked_gemm(
          n, k, m, gf.const_data_ptr<float>(), 1, n,
          [=](float* b, int64_t ldb, int64_t d0, int64_t db, int64_t c0, int64_t cb) {
            for (int64_t q = 0; q < db; ++q) {
              std::copy(xp + (d0 + q) * k + c0, xp + (d0 + q) * k + c0 + cb, b + q * ldb);
            }
          },
          [&](const float* c, int64_t ldc, int64_t r0, int64_t rb, int64_t c0, int64_t cb) {
            // The sums where the mask keeps the weight, else 0: a vectorised masked copy
            // (into the output itself for float32, via a row of float32 for 16-bit types).
            const MaskedCopyFn copy = tiles().copy.f32;
            float row[kBlockCols];
            for (int64_t i = 0; i < rb; ++i) {
              scalar_t* out_row = out + (r0 + i) * k + c0;
              if constexpr (std::is_same_v<scalar_t, float>) {
                copy(c + i * ldc, bits + (r0 + i) * words, c0, cb, out_row);
              } else {
                copy(c + i * ldc, bits + (r0 + i) * words, c0, cb, row);
                std::copy(row, row + cb, out_row);
              }
            }
          });
    }
    if (output_mask[2]) {
      // Column sums of g, tokens in order for each feature (deterministic).
      grad_b = at::empty({n}, p.x.options());
      scalar_t* out = grad_b.mutable_data_ptr<scalar_t>();
      const float* g = gf.const_data_ptr<float>();
      at::parallel_for(0, n, /*grain_size=*/256, [&](int64_t begin, int64_t end) {
        std::vector<float> acc(end - begin, 0.0f);
        for (int64_t t = 0; t < m; ++t) {
          const float* g_row = g + t * n;
          for (int64_t j = begin; j < end; ++j) {
            acc[j - begin] += g_row[j];
          }
        }
        for (int64_t j = begin; j < end; ++j) {
          out[j] = static_cast<scalar_t>(acc[j - begin]);
        }
      });
    }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CPU, m) {
  m.impl("masked_linear", &masked_linear_cpu);
  m.impl("masked_linear_backward", &masked_linear_backward_cpu);
}

}  // namespace multiflow::cpu
