// bitmap_pack / bitmap_unpack / bitmap_linear through the dispatcher, against
// plain loops. The masks mix densities so that every CPU kernel of
// bitmap_linear runs (one row of x, 2-4 rows, 5+ rows at most half kept, 5+
// rows more than half kept); ctest runs this once per ISA.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <sstream>
#include <tuple>
#include <vector>

#include "cpu/bitmap_tile.h"
#include "cpu/isa.h"
#include "tests/harness.h"
#include "tests/linear_check.h"

#if defined(__linux__)
#include <random>

#include "tests/page_end.h"
#endif

namespace {

using multiflow::test::op;
using Format = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Format pack(const at::Tensor& weight, const at::Tensor& mask) {
  static const auto handle = op<Format(const at::Tensor&, const at::Tensor&)>("bitmap_pack");
  return handle.call(weight, mask);
}

at::Tensor unpack(const Format& f, int64_t in_features) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(
          "bitmap_unpack");
  return handle.call(std::get<0>(f), std::get<1>(f), std::get<2>(f), std::get<3>(f), in_features);
}

at::Tensor linear(const at::Tensor& x, const Format& f, int64_t in_features, const std::optional<at::Tensor>& bias) {
  static const auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, int64_t, const std::optional<at::Tensor>&)>(
      "bitmap_linear");
  return handle.call(x, std::get<0>(f), std::get<1>(f), std::get<2>(f), std::get<3>(f), in_features, bias);
}

// y = x W^T + b against a double loop (linear_check.h).
void check_linear(at::ScalarType dtype, int64_t m, int64_t n, int64_t k, double density) {
  const at::Tensor w = at::randn({n, k}).to(dtype);
  const at::Tensor mask = at::rand({n, k}) < density;
  const at::Tensor x = at::randn({m, k}).to(dtype);
  const at::Tensor b = at::randn({n}).to(dtype);
  const Format f = pack(w, mask);
  const at::Tensor wm = at::where(mask, w, at::zeros({}, w.options()));
  MF_CHECK(at::equal(unpack(f, k), wm), "unpack(pack(W, M)) != W * M, dtype ", dtype, ", ", n, "x", k);
  std::ostringstream what;
  what << "bitmap_linear " << dtype << " density " << density;
  multiflow::test::check_linear_against_loops(linear(x, f, k, b), x, wm, b, what.str());
}

MF_TEST(bitmap_linear_against_loops) {
  at::manual_seed(21);
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (int64_t m : {1, 3, 5, 20}) {
      for (double density : {0.004, 0.25, 0.8}) {
        check_linear(dtype, m, 37, 100, density);  // 100 columns: a partial last word
      }
    }
    check_linear(dtype, 1, 9, 1056, 0.3);
    check_linear(dtype, 17, 9, 1056, 0.3);
  }
}

MF_TEST(bitmap_rejects_bad_formats) {
  at::manual_seed(22);
  const at::Tensor w = at::randn({6, 40});
  const at::Tensor mask = at::rand({6, 40}) < 0.5;
  const auto [values, bits, row_ptr, block_ptr] = pack(w, mask);
  // Row 2 claims one value more than its bits (values grown to keep row_ptr[-1] = nnz).
  at::Tensor counts = mask.sum(1);
  counts.index_put_({2}, counts[2] + 1);
  const at::Tensor shifted = at::cat({at::zeros({1}, at::kLong), counts.cumsum(0)}).to(at::kInt);
  const at::Tensor more = at::randn({shifted[-1].item<int32_t>()});
  for (int64_t m : {1, 3, 7}) {
    const at::Tensor x = at::randn({m, 40});
    MF_CHECK_THROWS(linear(x, {more, bits, shifted, block_ptr}, 40, std::nullopt), "row_ptr does not match bits: row 2");
    // A bit past in_features in row 4, counted by row_ptr.
    at::Tensor padded = bits.clone();
    padded.index_put_({4, 1}, padded[4][1].item<int32_t>() | (1 << 20));
    at::Tensor c4 = mask.sum(1);
    c4.index_put_({4}, c4[4] + 1);
    const at::Tensor rp4 = at::cat({at::zeros({1}, at::kLong), c4.cumsum(0)}).to(at::kInt);
    const at::Tensor v4 = at::randn({rp4[-1].item<int32_t>()});
    MF_CHECK_THROWS(linear(x, {v4, padded, rp4, block_ptr}, 40, std::nullopt), "bits sets bits past in_features = 40 in row 4");
  }
}

#if defined(__linux__)
// One row through the selected ISA's pack / unpack row kernels, every buffer (inputs and
// outputs) at a page end, against a plain loop: the kernels' whole-vector stores must stop
// at the row's own elements (in the op, the next row's belong to another task).
template <typename E>
void check_convert_row(const multiflow::cpu::BitmapTiles& tiles, int64_t cols, double density, std::mt19937& gen) {
  using multiflow::test::AtPageEnd;
  const int64_t words = (cols + 31) / 32;
  AtPageEnd<E> w(cols);
  AtPageEnd<int32_t> bits(words);
  std::bernoulli_distribution keep(density);
  std::uniform_int_distribution<uint32_t> any_bits;
  std::vector<E> kept;
  for (int64_t wd = 0; wd < words; ++wd) {
    bits.data()[wd] = 0;
  }
  for (int64_t c = 0; c < cols; ++c) {
    w.data()[c] = static_cast<E>(any_bits(gen));
    if (keep(gen)) {
      bits.data()[c / 32] |= static_cast<int32_t>(1u << (c % 32));
      kept.push_back(w.data()[c]);
    }
  }
  const auto n = static_cast<int64_t>(kept.size());
  AtPageEnd<E> values(n);
  (sizeof(E) == 4 ? tiles.pack32 : tiles.pack16)(w.data(), cols, bits.data(), values.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    MF_CHECK(values.data()[i] == kept[i], "pack, ", 8 * sizeof(E), "-bit, ", cols, " columns: value ", i);
  }
  AtPageEnd<E> dense(cols);
  (sizeof(E) == 4 ? tiles.unpack32 : tiles.unpack16)(values.data(), values.data() + n, bits.data(), cols, dense.data());
  for (int64_t c = 0; c < cols; ++c) {
    const bool set = (static_cast<uint32_t>(bits.data()[c / 32]) >> (c % 32)) & 1u;
    MF_CHECK(dense.data()[c] == (set ? w.data()[c] : E{0}), "unpack, ", 8 * sizeof(E), "-bit, ", cols,
             " columns: column ", c);
  }
}

MF_TEST(bitmap_convert_rows_stay_in_their_buffers) {
  const multiflow::cpu::BitmapTiles tiles = MULTIFLOW_ISA_TABLE(multiflow::cpu::bitmap_tiles);
  std::mt19937 gen(23);
  for (int64_t cols : {1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 100, 1100}) {
    for (double density : {0.0, 0.2, 0.6, 0.95, 1.0}) {
      check_convert_row<uint32_t>(tiles, cols, density, gen);
      check_convert_row<uint16_t>(tiles, cols, density, gen);
    }
  }
}
#endif

}  // namespace
