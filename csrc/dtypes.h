// The floating dtypes the ops take for weights and activations, shared by the
// device-independent argument checks (csrc/*.cpp).
#pragma once

#include <c10/core/ScalarType.h>

namespace multiflow {

// float32, float16 or bfloat16.
inline bool is_weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace multiflow
