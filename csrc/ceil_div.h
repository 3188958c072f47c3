// Integer helpers shared by the CPU drivers (csrc/cpu/*.cpp) and the CUDA
// launchers (csrc/cuda/*.cu): host code only.
#pragma once

#include <cstdint>

namespace multiflow {

// ceil(a / b) for a >= 0 and b > 0: how many blocks of b cover a.
constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace multiflow
