// sparse24_pack / sparse24_unpack / sparse24_linear on CPU.
//
// pack and unpack copy elements by their bits (2 or 4 bytes, whatever the
// float type: the round trip is exact, NaN and -0.0 included), parallel over
// rows, one per-ISA row function per element size (sparse24_tile_impl.h). pack
// reads each chunk's 4 mask bools as a 4-bit keep pattern and looks up the
// chunk's two positions (kChunkPicks: kept ones first, then the lowest unused);
// a chunk that keeps more than 2 marks its row, and the op raises after the
// pass, naming the rows, so nothing it allocated is returned. The row functions:
//   AVX-512  32 columns a step (2 metadata words, 16 values): the mask bytes
//            tested into a keep pattern, the metadata from a 256-entry table
//            per byte of it, the values one permute of the weights (zeroed at
//            filler positions); unpack computes every output lane's source
//            value from the broadcast metadata: one masked permute per word
//            (float32) or per step (16-bit elements, in 16-bit lanes);
//   AVX2     the same, 16 columns (1 word, 8 values) a step, half a word per
//            permute;
//   default  chunk by chunk in scalar code, which is also every ISA's loop for
//            a row's last columns short of a whole step (so no load or store
//            leaves a row).
// Every path writes the same bits for any input, unpack for any metadata (an
// invalid code too: the chunk's second value wins where both name one position).
//
// sparse24_linear: each parallel task owns a block of output rows and streams
// their values and metadata from memory once; the per-ISA row kernel
// (sparse24_tile_impl.h) multiplies each vector of values by the x elements at
// the positions the metadata names (gathered in registers), for a block of rows
// of x, block after block (the task's rows stay in L2 for the later blocks). x
// is widened to float32 once, into rows padded with zeros to whole windows of
// the kernel. No dense copy of the weight is made.
//
// Determinism: every output element is summed by one task in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <sstream>
#include <tuple>
#include <vector>

#include "ceil_div.h"
#include "cpu/dispatch_activation.h"
#include "dtypes.h"
#include "cpu/isa.h"
#include "cpu/sparse24_chunk.h"
#include "cpu/sparse24_tile.h"
#include "sparse24.h"

namespace multiflow::cpu {
namespace {

// Output rows per parallel task of the streaming kernel.
constexpr int64_t kRowGrain = 16;

// Bad rows the error message names.
constexpr int64_t kRowsNamed = 8;

const Sparse24Tiles& tiles() {
  static const Sparse24Tiles table = MULTIFLOW_ISA_TABLE(sparse24_tiles);
  return table;
}

// The row function of the element bits E (uint32_t or uint16_t).
template <typename E, typename Fn32, typename Fn16>
auto pick_for_bits(Fn32 fn32, Fn16 fn16) {
  if constexpr (sizeof(E) == 4) {
    return fn32;
  } else {
    return fn16;
  }
}

// The ValueError for the rows whose flag is set (none: no error).
void report_bad_rows(const Sparse24PackProblem& p, const std::vector<uint8_t>& bad) {
  std::vector<int64_t> rows;
  int64_t n_bad = 0;
  for (int64_t r = 0; r < p.rows; ++r) {
    if (bad[r]) {
      if (n_bad < kRowsNamed) {
        rows.push_back(r);
      }
      ++n_bad;
    }
  }
  if (n_bad == 0) {
    return;
  }
  std::ostringstream named;
  for (size_t i = 0; i < rows.size(); ++i) {
    named << (i ? ", " : "") << rows[i];
  }
  if (n_bad > kRowsNamed) {
    named << ", ...";
  }
  // The first offending chunk of the first bad row, as an example.
  const auto* m = reinterpret_cast<const uint8_t*>(p.mask.const_data_ptr<bool>()) + rows[0] * p.cols;
  int64_t q = 0;
  while (q + 1 < p.cols / 4 && kChunkPicks.pick[keep_pattern(m + 4 * q)].valid) {
    ++q;
  }
  const int kept = std::popcount(keep_pattern(m + 4 * q));
  TORCH_CHECK_VALUE(
      false, "multiflow::sparse24_pack: mask is not 2:4: rows [", named.str(),
      "] keep more than 2 of 4 consecutive weights (", n_bad, n_bad == 1 ? " row" : " rows", " in total; row ",
      rows[0], " keeps ", kept, " of columns ", 4 * q, "..", 4 * q + 3, ")");
}

std::tuple<at::Tensor, at::Tensor> sparse24_pack_cpu(const at::Tensor& weight, const at::Tensor& mask) {
  const Sparse24PackProblem p = prepare_sparse24_pack(weight, mask);
  const int64_t rows = p.rows, cols = p.cols, words = sparse24_words(cols);
  at::Tensor values = at::empty({rows, cols / 2}, p.weight.options());
  at::Tensor metadata = at::empty({rows, words}, p.weight.options().dtype(at::kShort));
  std::vector<uint8_t> bad(rows, 0);
  const auto* m = reinterpret_cast<const uint8_t*>(p.mask.const_data_ptr<bool>());
  uint16_t* meta = reinterpret_cast<uint16_t*>(metadata.mutable_data_ptr<int16_t>());
  with_element_bits(p.weight.scalar_type(), [&](auto zero) {
    using E = decltype(zero);
    const E* w = static_cast<const E*>(p.weight.const_data_ptr());
    E* v = static_cast<E*>(values.mutable_data_ptr());
    const Sparse24PackRowFn<E> pack_row = pick_for_bits<E>(tiles().pack_row32, tiles().pack_row16);
    at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        bad[r] = !pack_row(w + r * cols, m + r * cols, cols, v + r * (cols / 2), meta + r * words);
      }
    });
  });
  report_bad_rows(p, bad);
  return {values, metadata};
}

at::Tensor sparse24_unpack_cpu(const at::Tensor& values, const at::Tensor& metadata) {
  const Sparse24Problem p = prepare_sparse24_unpack(values, metadata);
  const int64_t rows = p.rows, cols = p.cols, words = sparse24_words(cols);
  at::Tensor out = at::empty({rows, cols}, p.values.options());
  const uint16_t* meta = reinterpret_cast<const uint16_t*>(p.metadata.const_data_ptr<int16_t>());
  with_element_bits(p.values.scalar_type(), [&](auto zero) {
    using E = decltype(zero);
    const E* v = static_cast<const E*>(p.values.const_data_ptr());
    E* o = static_cast<E*>(out.mutable_data_ptr());
    const Sparse24UnpackRowFn<E> unpack_row = pick_for_bits<E>(tiles().unpack_row32, tiles().unpack_row16);
    at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        unpack_row(v + r * (cols / 2), meta + r * words, cols, o + r * cols);
      }
    });
  });
  return out;
}

at::Tensor sparse24_linear_cpu(
    const at::Tensor& x,
    const at::Tensor& values,
    const at::Tensor& metadata,
    const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "multiflow::sparse24_linear";
  const Sparse24Problem p = prepare_sparse24_linear(x, values, metadata, bias);
  const int64_t m = p.m, n = p.rows, k = p.cols;
  const int64_t words = sparse24_words(k);
  at::Tensor y = at::empty({m, n}, p.x.options());
  if (m == 0 || n == 0) {
    return y.view(p.out_shape);
  }
  dispatch_activation(op, p.x.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* v = p.values.const_data_ptr<scalar_t>();
    const int16_t* meta = p.metadata.const_data_ptr<int16_t>();
    const scalar_t* bias_ptr = p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    // x widened to float32, rows padded with zeros to whole windows of the kernel.
    const int64_t ldx = ceil_div(k, kSparse24XPadCols) * kSparse24XPadCols;
    at::Tensor xf = at::zeros({m, ldx}, p.x.options().dtype(at::kFloat));
    if (k > 0) {
      xf.narrow(1, 0, k).copy_(p.x);
    }
    const float* xp = xf.const_data_ptr<float>();
    const Sparse24RowsFn rows = for_activation_dtype(op, tiles(), p.x.scalar_type());
    at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(m * kSparse24RowsPerCall);
      for (int64_t r0 = begin; r0 < end; r0 += kSparse24RowsPerCall) {
        const int64_t nr = std::min(kSparse24RowsPerCall, end - r0);
        rows(v + r0 * (k / 2), meta + r0 * words, k, nr, xp, m, ldx, acc.data());
        for (int64_t j = 0; j < nr; ++j) {
          const float bias_r = bias_ptr ? static_cast<float>(bias_ptr[r0 + j]) : 0.0f;
          for (int64_t i = 0; i < m; ++i) {
            out[i * n + r0 + j] = static_cast<scalar_t>(acc[j * m + i] + bias_r);
          }
        }
      }
    });
  });
  return y.view(p.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(multiflow, CPU, m) {
  m.impl("sparse24_pack", &sparse24_pack_cpu);
  m.impl("sparse24_unpack", &sparse24_unpack_cpu);
  m.impl("sparse24_linear", &sparse24_linear_cpu);
}

}  // namespace multiflow::cpu
