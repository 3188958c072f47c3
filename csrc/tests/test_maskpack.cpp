// pack_mask / unpack_mask through the dispatcher, against plain bit loops.
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

#include "tests/harness.h"

namespace {

using multiflow::test::op;

at::Tensor pack_mask(const at::Tensor& mask) {
  static const auto handle = op<at::Tensor(const at::Tensor&)>("pack_mask");
  return handle.call(mask);
}

at::Tensor unpack_mask(const at::Tensor& bits, int64_t cols) {
  static const auto handle = op<at::Tensor(const at::Tensor&, int64_t)>("unpack_mask");
  return handle.call(bits, cols);
}

// Bit b of word w of row r is mask[r, 32w + b].
at::Tensor pack_by_loop(const at::Tensor& mask) {
  const at::Tensor m = mask.contiguous();
  const int64_t rows = m.size(0), cols = m.size(1), words = (cols + 31) / 32;
  at::Tensor bits = at::zeros({rows, words}, at::kInt);
  const auto ms = m.accessor<bool, 2>();
  auto bs = bits.accessor<int32_t, 2>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      if (ms[r][c]) {
        bs[r][c / 32] = static_cast<int32_t>(static_cast<uint32_t>(bs[r][c / 32]) | (1u << (c % 32)));
      }
    }
  }
  return bits;
}

at::Tensor unpack_by_loop(const at::Tensor& bits, int64_t cols) {
  const int64_t rows = bits.size(0);
  at::Tensor mask = at::zeros({rows, cols}, at::kBool);
  const auto bs = bits.accessor<int32_t, 2>();
  auto ms = mask.accessor<bool, 2>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      ms[r][c] = (static_cast<uint32_t>(bs[r][c / 32]) >> (c % 32)) & 1u;
    }
  }
  return mask;
}

// Every int32 bit pattern, the padding bits of each row's last word included.
at::Tensor random_words(int64_t rows, int64_t cols) {
  const int64_t lo = std::numeric_limits<int32_t>::min();
  return at::randint(lo, -lo, {rows, (cols + 31) / 32}, at::kLong).to(at::kInt);
}

MF_TEST(pack_mask_bit_layout) {
  // One bit at a time; bit 31 is the sign bit of the int32 word.
  for (int64_t c = 0; c < 70; ++c) {
    at::Tensor mask = at::zeros({2, 70}, at::kBool);
    mask[1][c] = true;
    const at::Tensor bits = pack_mask(mask);
    MF_CHECK(bits.scalar_type() == at::kInt && bits.size(0) == 2 && bits.size(1) == 3, "shape ", bits.sizes());
    for (int64_t w = 0; w < 3; ++w) {
      const int64_t want = (w != c / 32) ? 0
                           : (c % 32 == 31) ? std::numeric_limits<int32_t>::min()
                                            : (int64_t{1} << (c % 32));
      MF_CHECK(bits[0][w].item<int32_t>() == 0, "column ", c, ": row 0 word ", w);
      MF_CHECK(bits[1][w].item<int32_t>() == want, "column ", c, ": word ", w, " is ", bits[1][w].item<int32_t>());
    }
  }
  const at::Tensor ones = pack_mask(at::ones({1, 33}, at::kBool));
  MF_CHECK(ones[0][0].item<int32_t>() == -1 && ones[0][1].item<int32_t>() == 1, "padding bits must be 0");
}

MF_TEST(pack_mask_matches_loop_and_round_trips) {
  at::manual_seed(5);
  for (int64_t rows : {0, 1, 5}) {
    for (int64_t cols : {0, 1, 31, 32, 33, 63, 64, 65, 100, 1000, 8193, 20000}) {
      for (double density : {0.0, 0.02, 0.5, 1.0}) {
        const at::Tensor mask = at::rand({rows, cols}) < density;
        const at::Tensor bits = pack_mask(mask);
        MF_CHECK(at::equal(bits, pack_by_loop(mask)), rows, " x ", cols, ", density ", density);
        MF_CHECK(at::equal(unpack_mask(bits, cols), mask), "round trip ", rows, " x ", cols);
      }
    }
  }
}

MF_TEST(unpack_mask_matches_loop_and_ignores_padding) {
  at::manual_seed(6);
  for (int64_t rows : {1, 5, 300}) {
    for (int64_t cols : {1, 31, 32, 33, 100, 1000, 8193}) {
      const at::Tensor bits = random_words(rows, cols);
      MF_CHECK(at::equal(unpack_mask(bits, cols), unpack_by_loop(bits, cols)), rows, " x ", cols);
    }
  }
}

MF_TEST(pack_mask_non_contiguous) {
  at::manual_seed(7);
  const at::Tensor transposed = (at::rand({70, 40}) < 0.5).t();
  MF_CHECK(at::equal(pack_mask(transposed), pack_by_loop(transposed)));
  const at::Tensor row_slice = (at::rand({30, 143}) < 0.5).slice(0, 1, 30, 3).slice(1, 3, 73);
  MF_CHECK(at::equal(pack_mask(row_slice), pack_by_loop(row_slice)));
}

MF_TEST(mask_pack_errors_name_the_argument) {
  MF_CHECK_THROWS(pack_mask(at::ones({3, 8})), "mask must be a bool tensor");
  MF_CHECK_THROWS(pack_mask(at::ones({8}, at::kBool)), "mask must have shape (R, C)");
  MF_CHECK_THROWS(unpack_mask(at::zeros({3, 1}, at::kInt), 40), "W = ceil(cols / 32) = 2");
  MF_CHECK_THROWS(unpack_mask(at::zeros({3, 0}, at::kInt), -1), "cols must be >= 0");
}

}  // namespace
