// The order key of the selection ops, shared by the CPU and CUDA kernels.
//
// Every backend selects on a uint32 key per element that orders like
// torch.kthvalue and torch.sort order the float32 values:
//   -0.0 is first turned into +0.0 (the two compare equal),
//   NaN (either sign) maps to 0xFFFFFFFF, above +inf (torch puts NaN last),
//   a negative float maps to ~bits, a non-negative one to bits | 0x80000000.
// So key(a) < key(b) exactly when a < b, key(a) == key(b) exactly when a == b
// (NaNs all equal and largest), and the k-th smallest key is the key of
// torch.kthvalue's answer. float_of_key inverts it (NaN comes back as the
// quiet NaN 0x7FFFFFFF).
//
// The radix passes of the k-th selection, most significant digit first: pass p
// histograms the kRadixBits[p] key bits from bit kRadixShift[p] up, counting
// only the elements whose bits above them equal the prefix that the earlier
// passes chose; the bucket holding the k-th element extends the prefix. After
// the last pass the prefix is the whole key of the answer.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MULTIFLOW_HOST_DEVICE __host__ __device__
#else
#define MULTIFLOW_HOST_DEVICE
#endif

namespace multiflow {

inline constexpr int kRadixPasses = 3;
inline constexpr int kRadixBits[kRadixPasses] = {11, 11, 10};
inline constexpr int kRadixShift[kRadixPasses] = {21, 10, 0};
inline constexpr int kRadixBuckets = 1 << 11;  // the widest digit

// Internal linkage: the per-ISA CPU translation units (see cpu/isa.h) each keep
// their own copy, so no AVX build of these can stand in for the baseline's.
namespace {

MULTIFLOW_HOST_DEVICE inline uint32_t key_of_float(float f) {
  if (f != f) {
    return 0xFFFFFFFFu;
  }
  f += 0.0f;  // -0.0 + 0.0 == +0.0 (round to nearest); every other value is unchanged
#if defined(__CUDA_ARCH__)
  const uint32_t bits = __float_as_uint(f);
#else
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
#endif
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
  return bits ^ flip;
}

MULTIFLOW_HOST_DEVICE inline float float_of_key(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

}  // namespace
}  // namespace multiflow
