// The A/B switches of the CUDA ops, read from the environment at each call (the knobs
// of the few-row kernels and of the public bitmap_linear): env_choice gives the index of
// the variable's value in `choices` (0, the usual one, for unset or empty); anything else
// raises ValueError naming the op, the variable and the choices. env_switch is the
// two-way case: false for `usual`, true for `other`.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

namespace multiflow::cuda {

inline int env_choice(const char* var, std::initializer_list<const char*> choices, const char* op) {
  const char* v = std::getenv(var);
  if (v == nullptr || v[0] == '\0') {
    return 0;
  }
  int i = 0;
  std::string names;
  for (const char* c : choices) {
    if (std::strcmp(v, c) == 0) {
      return i;
    }
    names += (i++ > 0 ? ", " : "");
    names += c;
  }
  TORCH_CHECK_VALUE(false, op, ": ", var, " must be one of ", names, " (or unset), got '", v, "'");
  return 0;  // not reached
}

inline bool env_switch(const char* var, const char* usual, const char* other, const char* op) {
  return env_choice(var, {usual, other}, op) == 1;
}

}  // namespace multiflow::cuda
