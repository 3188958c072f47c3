// The floating dtypes the ops take for weights and activations, shared by the
// device-independent argument checks (csrc/*.cpp), and the bit-pattern dispatch of
// the kernels that copy weights without converting them (host code, CPU and CUDA).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace multiflow {

// float32, float16 or bfloat16.
inline bool is_weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Calls fn(E{}) with E the unsigned integer of t's element size (4 bytes for float32,
// 2 for float16 / bfloat16): pack / unpack kernels copy elements by their bits, so
// round trips are exact (NaN payloads, -0.0 included).
template <typename Fn>
void with_element_bits(at::ScalarType t, const Fn& fn) {
  if (c10::elementSize(t) == 4) {
    fn(uint32_t{});
  } else {
    fn(uint16_t{});
  }
}

}  // namespace multiflow
