// bitmap_pack / bitmap_unpack / bitmap_linear on CPU.
//
// pack and unpack copy elements by their bits (2 or 4 bytes, whatever the
// float type: the round trip is exact, NaN and -0.0 included), parallel over
// rows, with the per-ISA row kernels of bitmap_tile_impl.h (AVX-512: register
// compress / expand per 16 columns, or per 32 for 16-bit elements with
// AVX512-VBMI2; AVX2: table-driven permutes per 8 columns; baseline: a
// count-trailing-zeros walk). pack counts
// each row's kept weights (and its block_ptr entries) from the packed words
// first and takes the exclusive prefix sum for row_ptr; unpack writes every
// element of its fresh output once, zeros included.
//
// bitmap_linear is for the memory-bound regime (few tokens): each parallel
// task owns a block of output rows and streams their values and bits once;
// the per-ISA row kernel (bitmap_tile_impl.h) decodes a row segment into L1
// and dots it with every row of x. x is widened to float32 once, into rows
// padded with zeros to whole words (or used in place when it already is
// float32 in whole words). No dense copy of the weight is made. Rows whose
// bits set a padding bit past in_features are rejected like wrong counts.
// Where x has no inf / NaN, two kernels that multiply kept columns only:
// one row of x (the token-by-token case; AVX-512 and AVX2) is
// compressed to each weight row's kept columns (gemv; with AVX512-VBMI2 the
// kept columns of sparse rows are listed by a byte compress: MULTIFLOW_CPU_VBMI2=0
// turns that off); 5 or more rows (every ISA), when
// at most half the weights are kept, go transposed, each kept weight meeting
// the 16-row vector of x at its column (spmm). Both check the counts
// themselves. Everything else: the segment / register kernels above.
//
// Determinism: every output element is summed by one task in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "bitmap.h"
#include "cpu/bitmap_tile.h"
#include "cpu/dispatch_activation.h"
#include "dtypes.h"
#include "cpu/isa.h"
#include "maskpack.h"

namespace multiflow::cpu {
namespace {

// Output rows per parallel task.
constexpr int64_t kRowGrain = 16;
static_assert(kRowGrain <= kBitmapGemvMaxRows, "a one-row kernel call takes a task's block of rows");

// The transposed-x kernel (BitmapSpmmFn) takes 5 or more rows of x (at 1-4 the
// kernels that expand the weight in registers are faster) when at most half of
// the weights are kept: its work is per kept weight, the segment kernel's per
// column, both linear in the rows of x (measured, benchmarks/RESULTS.md). Its
// transposed copy of x is x's size (rows rounded up to 16).
constexpr int64_t kSpmmMinRows = 5;

const BitmapTiles& tiles() {
  static const BitmapTiles table = MULTIFLOW_ISA_TABLE(bitmap_tiles);
  return table;
}

inline int popcount32(uint32_t u) {
  u = u - ((u >> 1) & 0x55555555u);
  u = (u & 0x33333333u) + ((u >> 2) & 0x33333333u);
  u = (u + (u >> 4)) & 0x0F0F0F0Fu;
  return static_cast<int>((u * 0x01010101u) >> 24);
}

// No inf / NaN among x[0, n): the bit pattern test vectorises at the baseline ISA.
bool all_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, sizeof(u));
    bad |= static_cast<uint32_t>((u & 0x7F800000u) == 0x7F800000u);
  }
  return bad == 0;
}

int64_t row_count(const int32_t* row_words, int64_t words) {
  int64_t n = 0;
  for (int64_t w = 0; w < words; ++w) {
    n += popcount32(static_cast<uint32_t>(row_words[w]));
  }
  return n;
}

// The bits of a row's last word past in_features: pack_mask leaves them 0, and
// a set one would name a column that neither x nor the dense weight has.
uint32_t padding_bits(int64_t cols) {
  const int64_t used = cols % 32;
  return used == 0 ? 0u : ~((1u << used) - 1u);
}

bool has_padding_bits(const int32_t* row_words, int64_t words, uint32_t padding) {
  return padding != 0u && (static_cast<uint32_t>(row_words[words - 1]) & padding) != 0u;
}

// A row the kernels must not read: its count in bits differs from row_ptr's,
// or it sets padding bits.
bool bad_row(const int32_t* row_words, int64_t words, uint32_t padding, int64_t count) {
  return has_padding_bits(row_words, words, padding) || count != row_count(row_words, words);
}

// Raises the error for row r (r < 0: no bad row).
void report_bad_row(const char* op, const BitmapProblem& p, int64_t r) {
  const int32_t* bits = p.bits.const_data_ptr<int32_t>();
  const int32_t* rp = p.row_ptr.const_data_ptr<int32_t>();
  const int64_t words = p.bits.size(1);
  TORCH_CHECK(
      r < 0 || !has_padding_bits(bits + r * words, words, padding_bits(p.cols)), op,
      ": bits sets bits past in_features = ", p.cols, " in row ", r,
      " (the last word's padding bits must be 0, as pack_mask leaves them)");
  TORCH_CHECK(
      r < 0, op, ": row_ptr does not match bits: row ", r, " has ", r < 0 ? 0 : row_count(bits + r * words, words),
      " kept weights in bits but row_ptr[", r + 1, "] - row_ptr[", r, "] = ", r < 0 ? 0 : rp[r + 1] - rp[r]);
}

// One pass over a row's words: at_block(b, n) at the start of each block b >= 1 (its first
// word 16 b), n = the row's kept count before it (block_ptr entry b - 1); returns the row's
// kept count.
template <typename AtBlock>
int64_t walk_row_blocks(const int32_t* row_words, int64_t words, AtBlock at_block) {
  constexpr int64_t kBlockWords = kBitmapBlockCols / 32;
  int64_t n = 0;
  for (int64_t w = 0; w < words; ++w) {
    if (w > 0 && w % kBlockWords == 0) {
      at_block(w / kBlockWords, n);
    }
    n += popcount32(static_cast<uint32_t>(row_words[w]));
  }
  return n;
}

// A row's kept count (*kept), and the first block b >= 1 whose block_ptr entry [b - 1]
// differs from the row's kept count before column 512 b, or 0. The CPU kernels do not read
// block_ptr (the CUDA kernels do, to start a chunk without scanning the row).
int64_t count_row_blocks(const int32_t* row_words, int64_t words, const int32_t* bp_row, int64_t* kept) {
  int64_t bad = 0;
  *kept = walk_row_blocks(row_words, words, [&](int64_t b, int64_t n) {
    if (bad == 0 && bp_row[b - 1] != n) {
      bad = b;  // every block start w < words has its entry: bp_cols = ceil(words / 16) - 1
    }
  });
  return bad;
}

// Every row's kept count in bits must match row_ptr (the kernels trust it to
// stay inside values), no padding bit may be set, and block_ptr must match the bits (the
// CPU kernels do not read it, but a format unpack accepts must also be right on CUDA):
// one pass over the words, before unpack writes anything (bitmap_linear checks each row
// just before it reads it instead, and not block_ptr, which it does not read).
void check_row_counts(const char* op, const BitmapProblem& p) {
  const int32_t* bits = p.bits.const_data_ptr<int32_t>();
  const int32_t* rp = p.row_ptr.const_data_ptr<int32_t>();
  const int32_t* bp = p.block_ptr.const_data_ptr<int32_t>();
  const int64_t words = p.bits.size(1);
  const int64_t bp_cols = p.block_ptr.size(1);
  const uint32_t padding = padding_bits(p.cols);
  std::atomic<int64_t> bad{-1};
  std::atomic<int64_t> bad_bp{-1};
  at::parallel_for(0, p.rows, /*grain_size=*/64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t kept = 0;
      const int64_t block = count_row_blocks(bits + r * words, words, bp + r * bp_cols, &kept);
      std::atomic<int64_t>* first = has_padding_bits(bits + r * words, words, padding) || kept != rp[r + 1] - rp[r]
                                        ? &bad
                                        : block != 0 ? &bad_bp : nullptr;
      if (first != nullptr) {
        int64_t expect = -1;
        first->compare_exchange_strong(expect, r);
        return;
      }
    }
  });
  report_bad_row(op, p, bad.load());
  const int64_t r = bad_bp.load();
  if (r >= 0) {
    int64_t kept = 0;
    const int64_t b = count_row_blocks(bits + r * words, words, bp + r * bp_cols, &kept);
    int64_t n = 0;
    for (int64_t w = 0; w < std::min(words, b * (kBitmapBlockCols / 32)); ++w) {
      n += popcount32(static_cast<uint32_t>(bits[r * words + w]));
    }
    TORCH_CHECK(false, op, ": block_ptr does not match bits: row ", r, " keeps ", n, " weights before column ",
                b * kBitmapBlockCols, " but block_ptr[", r, ", ", b - 1, "] = ", bp[r * bp_cols + b - 1]);
  }
}

at::Tensor pack_mask_op(const at::Tensor& mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("multiflow::pack_mask", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bitmap_pack_cpu(
    const at::Tensor& weight,
    const at::Tensor& mask) {
  const BitmapPackProblem p = prepare_bitmap_pack(weight, mask);
  const at::Tensor bits = pack_mask_op(p.mask);
  const int64_t rows = p.rows, cols = p.cols;
  const int64_t words = packed_words(cols);
  const int64_t bp_cols = bitmap_block_ptr_cols(cols);
  const int32_t* b = bits.const_data_ptr<int32_t>();

  // Counts and block_ptr first, one pass over each row's words (counts in int64: the total
  // is checked before it is narrowed to row_ptr's int32). block_ptr entry b - 1 of a row:
  // its kept count in words [0, 16 b).
  at::Tensor block_ptr = at::empty({rows, bp_cols}, weight.options().dtype(at::kInt));
  int32_t* bp = block_ptr.mutable_data_ptr<int32_t>();
  std::vector<int64_t> counts(rows + 1, 0);
  at::parallel_for(0, rows, /*grain_size=*/64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      counts[r + 1] = walk_row_blocks(b + r * words, words, [&](int64_t blk, int64_t n) {
        bp[r * bp_cols + blk - 1] = static_cast<int32_t>(n);  // < 2^31: n <= cols
      });
    }
  });
  for (int64_t r = 0; r < rows; ++r) {  // exclusive prefix sum: serial, `rows` additions
    counts[r + 1] += counts[r];
  }
  TORCH_CHECK(counts[rows] <= kBitmapMaxNnz, "multiflow::bitmap_pack: the bitmap format holds at most 2^31 - 1 kept ",
              "weights (row_ptr is int32), the mask keeps ", counts[rows]);
  at::Tensor row_ptr = at::empty({rows + 1}, weight.options().dtype(at::kInt));
  int32_t* rp = row_ptr.mutable_data_ptr<int32_t>();
  for (int64_t r = 0; r <= rows; ++r) {
    rp[r] = static_cast<int32_t>(counts[r]);
  }

  at::Tensor values = at::empty({counts[rows]}, weight.options());
  with_element_bits(weight.scalar_type(), [&](auto zero) {
    using E = decltype(zero);
    const BitmapPackRowFn pack = sizeof(E) == 4 ? tiles().pack32 : tiles().pack16;
    const E* w = static_cast<const E*>(p.weight.const_data_ptr());
    E* v = static_cast<E*>(values.mutable_data_ptr());
    at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        pack(w + r * cols, cols, b + r * words, v + rp[r], rp[r + 1] - rp[r]);
      }
    });
  });
  return {values, bits, row_ptr, block_ptr};
}

at::Tensor bitmap_unpack_cpu(
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features) {
  const BitmapProblem p = prepare_bitmap_unpack(values, bits, row_ptr, block_ptr, in_features);
  check_row_counts("multiflow::bitmap_unpack", p);
  // Every element is written (zeros included) by the row kernel: no zero fill first.
  at::Tensor out = at::empty({p.rows, p.cols}, p.values.options());
  const int64_t words = p.bits.size(1), cols = p.cols;
  const int32_t* b = p.bits.const_data_ptr<int32_t>();
  const int32_t* rp = p.row_ptr.const_data_ptr<int32_t>();
  with_element_bits(p.values.scalar_type(), [&](auto zero) {
    using E = decltype(zero);
    const BitmapUnpackRowFn unpack = sizeof(E) == 4 ? tiles().unpack32 : tiles().unpack16;
    const E* v = static_cast<const E*>(p.values.const_data_ptr());
    const E* v_end = v + p.values.numel();
    E* o = static_cast<E*>(out.mutable_data_ptr());
    at::parallel_for(0, p.rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        unpack(v + rp[r], v_end, b + r * words, cols, o + r * cols);
      }
    });
  });
  return out;
}

at::Tensor bitmap_linear_cpu(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& bits,
    const at::Tensor& row_ptr,
    const at::Tensor& block_ptr,
    int64_t in_features,
    const std::optional<at::Tensor>& bias) {
  const BitmapProblem p = prepare_bitmap_linear(x, values, bits, row_ptr, block_ptr, in_features, bias);
  const int64_t m = p.m, n = p.rows, k = p.cols;
  const int64_t words = p.bits.size(1);
  const int64_t ldx = words * 32;
  at::Tensor y = at::empty({m, n}, p.x.options());
  if (m == 0 || n == 0) {  // no row is read: row_ptr's order is checked here instead
    check_row_ptr_order("multiflow::bitmap_linear", p.row_ptr.const_data_ptr<int32_t>(), n);
    return y.view(p.out_shape);
  }
  // x widened to float32, rows padded with zeros to whole words (x itself
  // where it already is that).
  at::Tensor xf;
  if (p.x.scalar_type() == at::kFloat && k == ldx) {
    xf = p.x;
  } else {
    xf = at::zeros({m, ldx}, p.x.options().dtype(at::kFloat));
    if (k > 0) {
      xf.narrow(1, 0, k).copy_(p.x);
    }
  }
  const float* xp = xf.const_data_ptr<float>();
  const int32_t* b = p.bits.const_data_ptr<int32_t>();
  const int32_t* rp = p.row_ptr.const_data_ptr<int32_t>();
  dispatch_activation("multiflow::bitmap_linear", p.x.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    constexpr bool f32 = std::is_same_v<scalar_t, float>, f16 = std::is_same_v<scalar_t, c10::Half>;
    const BitmapTiles& t = tiles();
    const BitmapRowFn row = f32 ? t.row_f32 : f16 ? t.row_f16 : t.row_bf16;
    const BitmapGemvFn gemv = f32 ? t.gemv_f32 : f16 ? t.gemv_f16 : t.gemv_bf16;
    const BitmapSpmmFn spmm = f32 ? t.spmm_f32 : f16 ? t.spmm_f16 : t.spmm_bf16;
    const scalar_t* v = p.values.const_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const int64_t n_values = p.values.numel();
    const uint32_t padding = padding_bits(k);
    std::atomic<int64_t> bad{-1};
    std::atomic<bool> out_of_order{false};  // some block's rows leave values by row_ptr

    // One task's output rows [begin, end) in blocks of `block`: each block's row_ptr
    // entries checked to keep its rows inside values, then its rows checked just
    // before the kernel reads them (their words are in L1 then: the
    // padding bits, and the counts unless the kernel checks them itself; so which
    // bad row of a block is named may differ between kernels), then
    // kernel(r0, nr) (-1, or the block's first row whose count is wrong) sums
    // acc[j * m + i] for the block's row j and x row i, then y = acc + bias. With
    // the counts right no kernel uses a value outside its row (loads may run into
    // the next rows' values, never past the tensor).
    auto run_blocks = [&](int64_t begin, int64_t end, int64_t block, bool kernel_checks_counts, const float* acc,
                          auto&& kernel) {
      for (int64_t r0 = begin; r0 < end; r0 += block) {
        const int64_t nr = std::min(block, end - r0);
        if (!rows_inside_values(rp, r0, nr, n_values)) {  // row_ptr's order, left to here by prepare
          out_of_order = true;
          return;
        }
        int64_t wrong = -1;
        for (int64_t r = r0; r < r0 + nr && wrong < 0; ++r) {
          const int32_t* words_r = b + r * words;
          if (kernel_checks_counts ? has_padding_bits(words_r, words, padding)
                                   : bad_row(words_r, words, padding, rp[r + 1] - rp[r])) {
            wrong = r;
          }
        }
        if (wrong < 0) {
          const int64_t j = kernel(r0, nr);
          wrong = j >= 0 ? r0 + j : -1;
        }
        if (wrong >= 0) {
          int64_t expect = -1;
          bad.compare_exchange_strong(expect, wrong);
          return;
        }
        for (int64_t j = 0; j < nr; ++j) {
          const float bias_r = bias_ptr ? static_cast<float>(bias_ptr[r0 + j]) : 0.0f;
          for (int64_t i = 0; i < m; ++i) {
            out[i * n + r0 + j] = static_cast<scalar_t>(acc[j * m + i] + bias_r);
          }
        }
      }
    };

    if (m == 1 && gemv != nullptr && all_finite(xp, ldx)) {
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        float acc[kRowGrain];
        run_blocks(begin, end, kRowGrain, true, acc, [&](int64_t r0, int64_t nr) {
          return gemv(v, n_values, rp + r0, b + r0 * words, words, nr, xp, acc);
        });
      });
    } else if (m >= kSpmmMinRows && spmm != nullptr && 2 * n_values <= n * k &&
               ldx <= std::numeric_limits<int32_t>::max() && all_finite(xp, m * ldx)) {  // int32 column lists
      // x transposed in groups of 16 rows: xt[g][c][l] = x[16 g + l][c], zero past m.
      const int64_t groups = (m + kBitmapSpmmGroup - 1) / kBitmapSpmmGroup;
      std::vector<float> xt(groups * ldx * kBitmapSpmmGroup);
      at::parallel_for(0, groups * ldx, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t gc = begin; gc < end; ++gc) {
          const int64_t g = gc / ldx, c = gc - g * ldx;
          for (int64_t l = 0; l < kBitmapSpmmGroup; ++l) {
            const int64_t i = g * kBitmapSpmmGroup + l;
            xt[gc * kBitmapSpmmGroup + l] = i < m ? xp[i * ldx + c] : 0.0f;
          }
        }
      });
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<int32_t> idx(kRowGrain * (words * 32 + kBitmapSpmmGroup));
        std::vector<float> acc(kRowGrain * m);
        run_blocks(begin, end, kRowGrain, true, acc.data(), [&](int64_t r0, int64_t nr) {
          return spmm(v, rp + r0, b + r0 * words, words, nr, xt.data(), m, idx.data(), acc.data());
        });
      });
    } else {
      at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(m * kBitmapRowsPerCall * kBitmapScratchPerRow);
        std::vector<float> acc(m * kBitmapRowsPerCall);
        run_blocks(begin, end, kBitmapRowsPerCall, false, acc.data(), [&](int64_t r0, int64_t nr) {
          row(v, n_values, rp + r0, b + r0 * words, words, nr, xp, m, ldx, scratch.data(), acc.data());
          return int64_t{-1};
        });
      });
    }
    // On any failure row_ptr's order is checked first, whole, as the serial pass before the
    // kernels did: a task stops at its first bad block, so which blocks checked their
    // order depends on the thread count.
    if (out_of_order.load() || bad.load() >= 0) {
      check_row_ptr_order("multiflow::bitmap_linear", rp, n);  // raises, naming the first row out of order
      TORCH_INTERNAL_ASSERT(!out_of_order.load(), "bitmap_linear: a block's rows left values with row_ptr in order");
    }
    report_bad_row("multiflow::bitmap_linear", p, bad.load());
  });
  return y.view(p.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CPU, m) {
  m.impl("bitmap_pack", &bitmap_pack_cpu);
  m.impl("bitmap_unpack", &bitmap_unpack_cpu);
  m.impl("bitmap_linear", &bitmap_linear_cpu);
}

}  // namespace multiflow::cpu
