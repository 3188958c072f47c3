#include "cpu/isa.h"

#include <ATen/Version.h>

#include <string>

namespace multiflow::cpu {

Isa selected_isa() {
  static const Isa isa = [] {
#if MULTIFLOW_X86_ISAS
    // "DEFAULT", "AVX2" or "AVX512": torch has already checked the CPU (cpuinfo)
    // and applied ATEN_CPU_CAPABILITY, so we never pick an ISA torch would not.
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") {
      return Isa::kAvx512;
    }
    if (capability == "AVX2") {
      return Isa::kAvx2;
    }
#endif
    return Isa::kDefault;
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace multiflow::cpu
