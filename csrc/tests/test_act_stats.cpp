// sq_sum_accumulate_ through the dispatcher, against a plain loop in double.
#include <ATen/ATen.h>

#include <cmath>
#include <optional>

#include "tests/harness.h"

namespace {

using multiflow::test::op;

void sq_sum_accumulate_(const at::Tensor& acc, const at::Tensor& x, const std::optional<at::Tensor>& token_mask) {
  static const auto handle =
      op<void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>("sq_sum_accumulate_");
  handle.call(acc, x, token_mask);
}

// acc_in[j] + sum over kept tokens of x[t, j]^2, in double.
std::vector<double> expected_sums(const at::Tensor& acc_in, const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  const int64_t features = x.size(-1);
  const at::Tensor x2 = x.to(at::kDouble).reshape({-1, features}).contiguous();
  const at::Tensor m = mask.has_value() ? mask->reshape({-1}).contiguous() : at::ones({x2.size(0)}, at::kBool);
  const auto xs = x2.accessor<double, 2>();
  const auto ms = m.accessor<bool, 1>();
  const auto acc = acc_in.accessor<float, 1>();
  std::vector<double> out(features);
  for (int64_t j = 0; j < features; ++j) {
    out[j] = acc[j];
  }
  for (int64_t t = 0; t < x2.size(0); ++t) {
    if (!ms[t]) {
      continue;
    }
    for (int64_t j = 0; j < features; ++j) {
      out[j] += xs[t][j] * xs[t][j];
    }
  }
  return out;
}

// The kernel's float32 sum of n terms may be off by a few ulps per term at
// most (a loose bound, far above the cascade sum's real error).
void check_sums(const at::Tensor& acc_in, const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  const at::Tensor acc = acc_in.clone();
  sq_sum_accumulate_(acc, x, mask);
  const std::vector<double> exact = expected_sums(acc_in, x, mask);
  const auto got = acc.accessor<float, 1>();
  const double terms = static_cast<double>(x.numel() / std::max<int64_t>(x.size(-1), 1)) + 1;
  for (size_t j = 0; j < exact.size(); ++j) {
    const double bound = 2 * terms * 1.2e-7 * std::abs(exact[j]) + 1e-30;
    MF_CHECK(std::abs(got[j] - exact[j]) <= bound, "feature ", j, ": got ", got[j], ", expected ", exact[j]);
  }
}

MF_TEST(sq_sum_without_mask) {
  at::manual_seed(1);
  // 300 features: a full 256-column tile and a ragged one, with a vector tail.
  check_sums(at::rand({300}) + 0.5, at::randn({37, 300}), std::nullopt);
}

MF_TEST(sq_sum_with_token_mask) {
  at::manual_seed(2);
  const at::Tensor x = at::randn({2, 50, 70});
  const at::Tensor mask = at::rand({2, 50}) < 0.5;
  check_sums(at::rand({70}) + 0.5, x, mask);
  check_sums(at::rand({70}) + 0.5, x.to(at::kHalf), mask);
  check_sums(at::rand({70}) + 0.5, x.to(at::kBFloat16), mask);
}

MF_TEST(sq_sum_many_tokens_several_chunks) {
  at::manual_seed(3);
  const at::Tensor x = at::randn({3000, 20});
  check_sums(at::rand({20}) + 0.5, x, at::rand({3000}) < 0.7);
}

MF_TEST(sq_sum_all_masked_leaves_acc) {
  at::manual_seed(4);
  const at::Tensor acc = at::rand({9});
  const at::Tensor before = acc.clone();
  sq_sum_accumulate_(acc, at::randn({5, 9}), at::zeros({5}, at::kBool));
  MF_CHECK(at::equal(acc, before));
}

MF_TEST(sq_sum_errors_name_the_argument) {
  MF_CHECK_THROWS(sq_sum_accumulate_(at::zeros({8}, at::kDouble), at::randn({3, 8}), std::nullopt),
                  "acc (the accumulator) must be float32");
  MF_CHECK_THROWS(sq_sum_accumulate_(at::zeros({8}), at::randn({3, 8}), at::ones({4}, at::kBool)),
                  "token_mask must have shape");
}

}  // namespace
