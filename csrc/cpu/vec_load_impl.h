// Loads shared by the per-ISA inner loops (<family>_tile_impl.h), for one ISA.
// Included only through those headers, by the isa_*.cpp files after they set
// CPU_CAPABILITY. Unlike the tile headers it is included once per translation
// unit (#pragma once: every family's loops in that unit use the same copy),
// and each isa_*.cpp is its own unit, so every ISA still gets its own.
//
// The names live in multiflow::cpu's anonymous namespace (internal linkage:
// nothing here becomes a symbol that another ISA's object could define too),
// which the families' own namespaces below multiflow::cpu all see.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "vec_load_impl.h is per-ISA: include it only from an isa_*.cpp (see isa.h)"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace multiflow::cpu {
namespace {  // internal linkage: every ISA's copy stays its own

using FloatVec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = FloatVec::size();

// FloatVec::size() consecutive elements, converted to float32 lanes
// (fp16 / bf16 widen exactly).
inline FloatVec load_as_float(const float* p) {
  return FloatVec::loadu(p);
}
inline FloatVec load_as_float(const c10::Half* p) {
  FloatVec v;
  at::vec::load_fp32_from_fp16(p, v);
  return v;
}
inline FloatVec load_as_float(const c10::BFloat16* p) {
  FloatVec v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
}

}  // namespace
}  // namespace multiflow::cpu
