// The activation dtypes of the CPU ops (float32, float16, bfloat16):
// dispatch_activation calls fn with a value of the matching C++ type (float,
// c10::Half, c10::BFloat16); for_activation_dtype picks a per-dtype table
// entry. Baseline code only (the op drivers, not the per-ISA tiles).
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

// The entry of a per-dtype table (members f32, f16, bf16) for dtype t.
template <typename Table>
const auto& for_activation_dtype(const char* op, const Table& table, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return table.f32;
    case at::kHalf: return table.f16;
    case at::kBFloat16: return table.bf16;
    default: break;
  }
  TORCH_CHECK(false, op, ": no CPU kernel for dtype ", t);
  return table.f32;  // unreachable
}

}  // namespace multiflow::cpu
