// The activation dtypes of the matmul ops on CPU (float32, float16, bfloat16):
// fn is called with a value of the matching C++ type (float, c10::Half,
// c10::BFloat16). Baseline code only (the op drivers, not the per-ISA tiles).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace multiflow::cpu {

template <typename Fn>
void dispatch_activation(const char* op, at::ScalarType t, const Fn& fn) {
  switch (t) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

}  // namespace multiflow::cpu
