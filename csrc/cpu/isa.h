// Which instruction set the CPU inner kernels run with, and how they are built.
//
// A wheel must run on any x86-64 CPU, so nothing here is compiled with
// -march=native or global -mavx2 flags. Instead, like ATen's own kernels, the
// inner loops ("tiles") are compiled once per instruction set, each in its own
// translation unit:
//
//   isa_default.cpp   baseline x86-64 (or whatever the target is elsewhere)
//   isa_avx2.cpp      AVX2 + FMA + F16C
//   isa_avx512.cpp    AVX-512 F/BW/VL/DQ + FMA
//
// Each one sets CPU_CAPABILITY before including at::vec, so
// at::vec::Vectorized<float> is 8 or 16 lanes wide and lives in a namespace of
// that ISA's own (at::vec::AVX2, ...), and switches the compiler's target with
// a pragma for the rest of the file (setuptools cannot give one source file
// its own flags; the pragma keeps setup.py and CMake free of per-file flags).
// Op code (csrc/cpu/<op>.cpp, compiled for the baseline) asks selected_isa()
// once and calls through the chosen table of function pointers.
//
// selected_isa() follows torch's own choice, so ATEN_CPU_CAPABILITY=default,
// avx2 or avx512 steers these kernels too (the tests use it to run every path).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define MULTIFLOW_X86_ISAS 1
#else
#define MULTIFLOW_X86_ISAS 0
#endif

// Inside an isa_*.cpp: MULTIFLOW_ISA_FN(sq_sum_tiles) names sq_sum_tiles_avx2 etc.
#define MULTIFLOW_ISA_CONCAT_(name, isa) name##_##isa
#define MULTIFLOW_ISA_CONCAT(name, isa) MULTIFLOW_ISA_CONCAT_(name, isa)
#define MULTIFLOW_ISA_FN(name) MULTIFLOW_ISA_CONCAT(name, MULTIFLOW_ISA)

namespace multiflow::cpu {

enum class Isa { kDefault, kAvx2, kAvx512 };

// torch's CPU capability (at::get_cpu_capability), read once.
Isa selected_isa();

const char* isa_name(Isa isa);

// The table built for the selected ISA, given one function per ISA that
// returns its table (off x86-64 the AVX ones are never called).
template <typename Table>
Table pick_for_isa(Table (*for_default)(), Table (*for_avx2)(), Table (*for_avx512)()) {
  switch (selected_isa()) {
    case Isa::kAvx512:
      return for_avx512();
    case Isa::kAvx2:
      return for_avx2();
    default:
      return for_default();
  }
}

}  // namespace multiflow::cpu

// In op code: the table of function pointers for the selected ISA, from the
// per-ISA functions prefix_default(), prefix_avx2() and prefix_avx512() (off
// x86-64 only prefix_default exists, and it serves for every ISA):
//
//   static const SqSumTiles table = MULTIFLOW_ISA_TABLE(sq_sum_tiles);
#if MULTIFLOW_X86_ISAS
#define MULTIFLOW_ISA_TABLE(prefix) \
  ::multiflow::cpu::pick_for_isa(&prefix##_default, &prefix##_avx2, &prefix##_avx512)
#else
#define MULTIFLOW_ISA_TABLE(prefix) \
  ::multiflow::cpu::pick_for_isa(&prefix##_default, &prefix##_default, &prefix##_default)
#endif
