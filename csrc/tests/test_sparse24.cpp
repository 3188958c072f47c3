// sparse24_pack / sparse24_unpack / sparse24_linear through the dispatcher,
// against plain loops (the layout of csrc/sparse24.h, written out again).
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/isa.h"
#include "cpu/sparse24_tile.h"
#include "tests/harness.h"
#include "tests/linear_check.h"

#if defined(__linux__)
#include <random>

#include "tests/page_end.h"
#endif

namespace {

using multiflow::test::op;

std::tuple<at::Tensor, at::Tensor> pack(const at::Tensor& weight, const at::Tensor& mask) {
  static const auto handle = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>("sparse24_pack");
  return handle.call(weight, mask);
}

at::Tensor unpack(const at::Tensor& values, const at::Tensor& metadata) {
  static const auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&)>("sparse24_unpack");
  return handle.call(values, metadata);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata, const at::Tensor& bias) {
  static const auto handle =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
          "sparse24_linear");
  return handle.call(x, values, metadata, bias);
}

// A random 2:4 mask with 0, 1 or 2 kept per chunk, at random positions.
at::Tensor random_mask(int64_t rows, int64_t cols) {
  at::Tensor mask = at::zeros({rows, cols}, at::kBool);
  const at::Tensor draws = at::randint(0, 4, {rows, cols / 4, 2}, at::kLong);
  const at::Tensor keep = at::rand({rows, cols / 4, 2}) < 0.8;
  auto m = mask.accessor<bool, 2>();
  const auto d = draws.accessor<int64_t, 3>();
  const auto k = keep.accessor<bool, 3>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = 0; q < cols / 4; ++q) {
      for (int s = 0; s < 2; ++s) {
        m[r][4 * q + d[r][q][s]] = m[r][4 * q + d[r][q][s]] || k[r][q][s];
      }
    }
  }
  return mask;
}

// The format by hand: positions = kept ones, then the lowest unused, ascending;
// metadata nibble q % 4 of word q / 4 = first | second << 2.
void check_layout(const at::Tensor& weight, const at::Tensor& mask) {
  const auto [values, metadata] = pack(weight, mask);
  const int64_t rows = weight.size(0), cols = weight.size(1);
  MF_CHECK(values.sizes() == at::IntArrayRef({rows, cols / 2}), "values shape ", values.sizes());
  MF_CHECK(metadata.scalar_type() == at::kShort, "metadata dtype ", metadata.scalar_type());
  MF_CHECK(metadata.sizes() == at::IntArrayRef({rows, (cols + 15) / 16}), "metadata shape ", metadata.sizes());
  const at::Tensor w = weight.to(at::kFloat);
  const at::Tensor v = values.to(at::kFloat);
  const auto ws = w.accessor<float, 2>();
  const auto vs = v.accessor<float, 2>();
  const auto ms = mask.accessor<bool, 2>();
  const auto md = metadata.accessor<int16_t, 2>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t word = 0; word < metadata.size(1); ++word) {
      uint32_t expect = 0;
      for (int64_t q = 4 * word; q < std::min(cols / 4, 4 * word + 4); ++q) {
        int positions[2];
        int n = 0;
        for (int p = 0; p < 4 && n < 2; ++p) {
          if (ms[r][4 * q + p]) {
            positions[n++] = p;
          }
        }
        for (int p = 0; p < 4 && n < 2; ++p) {
          if (!ms[r][4 * q + p]) {
            positions[n++] = p;
          }
        }
        const int first = std::min(positions[0], positions[1]), second = std::max(positions[0], positions[1]);
        expect |= static_cast<uint32_t>(first | (second << 2)) << (4 * (q % 4));
        for (int s = 0; s < 2; ++s) {
          const int p = s == 0 ? first : second;
          const float want = ms[r][4 * q + p] ? ws[r][4 * q + p] : 0.0f;
          MF_CHECK(vs[r][2 * q + s] == want, "row ", r, " chunk ", q, " value ", s, ": got ", vs[r][2 * q + s]);
        }
      }
      const uint32_t got = static_cast<uint16_t>(md[r][word]);
      MF_CHECK(got == expect, "row ", r, " word ", word, ": got ", got, ", expected ", expect);
    }
  }
  const at::Tensor dense = unpack(values, metadata);
  MF_CHECK(at::equal(dense, at::where(mask, weight, at::zeros({}, weight.options()))), "unpack(pack(W, M)) != W * M");
}

MF_TEST(sparse24_pack_layout) {
  at::manual_seed(11);
  for (int64_t cols : {4, 12, 16, 20, 100, 1060}) {
    const at::Tensor mask = random_mask(7, cols);
    check_layout(at::randn({7, cols}), mask);
    check_layout(at::randn({7, cols}).to(at::kHalf), mask);
    check_layout(at::randn({7, cols}).to(at::kBFloat16), mask);
  }
}

MF_TEST(sparse24_pack_rejects_three_of_four) {
  at::Tensor mask = random_mask(4, 32);
  mask.index_put_({1, at::indexing::Slice(8, 12)}, true);
  MF_CHECK_THROWS(pack(at::randn({4, 32}), mask), "mask is not 2:4: rows [1] keep more than 2 of 4");
  MF_CHECK_THROWS(pack(at::randn({4, 30}), at::zeros({4, 30}, at::kBool)), "in_features must be a multiple of 4");
}

// y against a double loop (linear_check.h).
void check_linear(at::ScalarType dtype, int64_t m, int64_t n, int64_t k) {
  const at::Tensor w = at::randn({n, k}).to(dtype);
  const at::Tensor mask = random_mask(n, k);
  const at::Tensor x = at::randn({m, k}).to(dtype);
  const at::Tensor b = at::randn({n}).to(dtype);
  const auto [values, metadata] = pack(w, mask);
  multiflow::test::check_linear_against_loops(linear(x, values, metadata, b), x,
                                              at::where(mask, w, at::zeros({}, w.options())), b, "sparse24_linear");
}

MF_TEST(sparse24_linear_against_loops) {
  at::manual_seed(12);
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (int64_t m : {1, 3, 5, 9}) {
      check_linear(dtype, m, 37, 100);  // 37 rows: an odd one out; 100 = 6 * 16 + 4: a partial last word
    }
    check_linear(dtype, 2, 20, 1056);
  }
}

#if defined(__linux__)
// One row through the selected ISA's pack / unpack row functions and the baseline
// ISA's (the plain loops the Python tests check against the plain-torch twin), every
// buffer at a page end: the same bits and the same verdict, and no load or store past
// the row's elements (in the op, the next row's belong to another task).
template <typename E>
void check_convert_row(int64_t cols, bool three_of_four, std::mt19937& gen) {
  using multiflow::test::AtPageEnd;
  const multiflow::cpu::Sparse24Tiles tiles = MULTIFLOW_ISA_TABLE(multiflow::cpu::sparse24_tiles);
  const multiflow::cpu::Sparse24Tiles plain = multiflow::cpu::sparse24_tiles_default();
  auto pack_of = [](const multiflow::cpu::Sparse24Tiles& t) {
    if constexpr (sizeof(E) == 4) {
      return t.pack_row32;
    } else {
      return t.pack_row16;
    }
  };
  auto unpack_of = [](const multiflow::cpu::Sparse24Tiles& t) {
    if constexpr (sizeof(E) == 4) {
      return t.unpack_row32;
    } else {
      return t.unpack_row16;
    }
  };
  const int64_t words = (cols + 15) / 16;
  AtPageEnd<E> w(cols);
  AtPageEnd<uint8_t> mask(cols);
  std::uniform_int_distribution<uint32_t> any_bits;
  for (int64_t c = 0; c < cols; ++c) {
    w.data()[c] = static_cast<E>(any_bits(gen));
    // Mask bytes other than 0 / 1 count as kept; a random pattern per chunk (2:4 or not).
    const uint32_t keep = any_bits(gen);
    mask.data()[c] = (keep & 3u) == 0 ? 0 : static_cast<uint8_t>(keep >> 8);
  }
  if (!three_of_four) {  // at most 2 kept per chunk: clear the later ones
    for (int64_t q = 0; q < cols / 4; ++q) {
      int kept = 0;
      for (int p = 0; p < 4; ++p) {
        uint8_t& m = mask.data()[4 * q + p];
        kept += m != 0;
        if (kept > 2) {
          m = 0;
        }
      }
    }
  }
  AtPageEnd<E> values(cols / 2), want_values(cols / 2);
  AtPageEnd<uint16_t> meta(words), want_meta(words);
  const bool ok = pack_of(tiles)(w.data(), mask.data(), cols, values.data(), meta.data());
  const bool want_ok = pack_of(plain)(w.data(), mask.data(), cols, want_values.data(), want_meta.data());
  MF_CHECK(ok == want_ok, "pack's verdict, ", 8 * sizeof(E), "-bit, ", cols, " columns");
  for (int64_t i = 0; i < cols / 2; ++i) {
    MF_CHECK(values.data()[i] == want_values.data()[i], "pack, ", 8 * sizeof(E), "-bit, ", cols, " columns: value ", i);
  }
  for (int64_t i = 0; i < words; ++i) {
    MF_CHECK(meta.data()[i] == want_meta.data()[i], "pack, ", 8 * sizeof(E), "-bit, ", cols, " columns: word ", i);
  }
  // Unpack of any metadata (random codes, valid or not).
  for (int64_t i = 0; i < words; ++i) {
    meta.data()[i] = static_cast<uint16_t>(any_bits(gen));
  }
  AtPageEnd<E> dense(cols), want_dense(cols);
  unpack_of(tiles)(values.data(), meta.data(), cols, dense.data());
  unpack_of(plain)(values.data(), meta.data(), cols, want_dense.data());
  for (int64_t c = 0; c < cols; ++c) {
    MF_CHECK(dense.data()[c] == want_dense.data()[c], "unpack, ", 8 * sizeof(E), "-bit, ", cols, " columns: column ", c);
  }
}

MF_TEST(sparse24_convert_rows_stay_in_their_buffers) {
  std::mt19937 gen(29);
  for (int64_t cols : {4, 8, 12, 16, 20, 28, 32, 36, 44, 48, 60, 64, 68, 100, 1056}) {
    for (bool three_of_four : {false, true}) {
      check_convert_row<uint32_t>(cols, three_of_four, gen);
      check_convert_row<uint16_t>(cols, three_of_four, gen);
    }
  }
}
#endif

}  // namespace
