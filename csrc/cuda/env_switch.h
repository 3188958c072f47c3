// A two-way switch of a CUDA op read from the environment at each call (the A/B knobs
// of the few-row kernels and of the public bitmap_linear): false for `usual`, unset or
// empty; true for `other`; anything else raises ValueError naming the op, the variable
// and the choices.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace multiflow::cuda {

inline bool env_switch(const char* var, const char* usual, const char* other, const char* op) {
  const char* v = std::getenv(var);
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, usual) == 0) {
    return false;
  }
  TORCH_CHECK_VALUE(std::strcmp(v, other) == 0, op, ": ", var, " must be one of ", usual, ", ", other,
                    " (or unset), got '", v, "'");
  return true;
}

}  // namespace multiflow::cuda
