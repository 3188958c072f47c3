// Included first by every isa_*.cpp, before CPU_CAPABILITY is defined and
// before the target pragma: the headers at::vec pulls in that are NOT per-ISA.
//
// Why: an inline function (c10::Half's conversion to float, a std:: template)
// that is first seen under `#pragma GCC target("avx2")` is compiled with AVX2,
// and if the compiler emits an out-of-line copy, the linker may keep that copy
// for the whole library, so a non-AVX2 CPU would fault in baseline code.
// Included here, they are compiled for the baseline in every translation unit
// and their include guards keep the per-ISA part from compiling them again.
// What remains per-ISA is in at::vec::<ISA> or our own anonymous namespaces.
#pragma once

#if defined(CPU_CAPABILITY) || defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#error "isa_prelude.h must come before CPU_CAPABILITY is defined"
#endif

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
