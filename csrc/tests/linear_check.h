// The check shared by the C++ tests of the linear ops over compressed weights
// (test_bitmap.cpp, test_sparse24.cpp): y against a double loop over the dense
// masked weight; the kernels sum K float32 terms, then round once to the dtype.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "tests/harness.h"

namespace multiflow::test {

// y (m, n) = x (m, k) @ w_masked (n, k)^T + b (n), all in dtype; `what` names
// the case in a failure.
inline void check_linear_against_loops(
    const at::Tensor& y, const at::Tensor& x, const at::Tensor& w_masked, const at::Tensor& b, const std::string& what) {
  const at::ScalarType dtype = x.scalar_type();
  const int64_t m = x.size(0), n = w_masked.size(0), k = x.size(1);
  const at::Tensor yd = y.to(at::kDouble), wd = w_masked.to(at::kDouble), xd = x.to(at::kDouble), bd = b.to(at::kDouble);
  const auto ws = wd.accessor<double, 2>();
  const auto xs = xd.accessor<double, 2>();
  const auto bs = bd.accessor<double, 1>();
  const auto ys = yd.accessor<double, 2>();
  const double out_eps = dtype == at::kFloat ? 0.0 : dtype == at::kHalf ? 1.0 / 1024 : 1.0 / 128;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t r = 0; r < n; ++r) {
      double exact = bs[r], scale = std::abs(bs[r]);
      for (int64_t c = 0; c < k; ++c) {
        exact += xs[i][c] * ws[r][c];
        scale += std::abs(xs[i][c] * ws[r][c]);
      }
      const double bound = 2.0 * k * 1.2e-7 * scale + out_eps * std::abs(exact) + 1e-30;
      MF_CHECK(std::abs(ys[i][r] - exact) <= bound, what, " m ", m, " row ", r, " token ", i, ": got ", ys[i][r],
               ", expected ", exact);
    }
  }
}

}  // namespace multiflow::test
