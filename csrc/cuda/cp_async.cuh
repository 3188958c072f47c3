// cp.async (sm_80+): 16-byte copies from global to shared memory that do not pass through
// registers, in flight while the thread goes on. Shared by the CUDA kernels that stage
// tiles (sparse24.cu's mma.sp GEMM, bitmap.cu's tensor-core gemv). Below sm_80 these are
// empty: their callers launch only on sm_80+ (the host checks the device).
#pragma once

#include <cuda_runtime.h>

namespace multiflow::cuda {

// Copies 16 bytes gmem -> shared address smem_addr (both 16-byte aligned); in_bounds
// false: writes 16 zero bytes and reads nothing (gmem must still be a valid address).
__device__ __forceinline__ void cp_async16_at(unsigned smem_addr, const void* gmem, bool in_bounds) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_bytes = in_bounds ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes));
#endif
}

// The same with a generic pointer to shared memory.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool in_bounds) {
  cp_async16_at(static_cast<unsigned>(__cvta_generic_to_shared(smem)), gmem, in_bounds);
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits for all but the newest committed group.
__device__ __forceinline__ void cp_async_wait_one() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 1;\n" ::);
#endif
}

// Commits the copies issued so far and waits for every one of this thread's copies.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace multiflow::cuda
