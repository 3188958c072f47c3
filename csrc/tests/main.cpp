// The runner of the C++ tests: runs every MF_TEST (or those whose name holds
// argv[1]) and exits 0 only if all pass.
//
// ctest runs it once per CPU inner-loop ISA (ATEN_CPU_CAPABILITY=default, avx2,
// avx512; see csrc/cpu/isa.h), so every per-ISA copy of the kernels is tested.
// Where the CPU lacks the ISA asked for, the run exits 77, which ctest reports
// as skipped (torch would otherwise take the request and fault).
#include <ATen/Version.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "tests/harness.h"

namespace multiflow::test {

std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

}  // namespace multiflow::test

namespace {

constexpr int kSkipped = 77;

bool cpu_has(const std::string& isa) {
  if (isa == "default") {
    return true;
  }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return false;
}

std::string lower(std::string s) {
  for (char& c : s) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  using multiflow::test::registry;
  const char* wanted = std::getenv("ATEN_CPU_CAPABILITY");
  if (wanted != nullptr && !cpu_has(lower(wanted))) {
    std::printf("SKIPPED: this CPU cannot run ATEN_CPU_CAPABILITY=%s\n", wanted);
    return kSkipped;
  }
  const std::string capability = at::get_cpu_capability();
  std::printf("torch CPU capability: %s\n", capability.c_str());
  if (wanted != nullptr && lower(capability) != lower(wanted)) {
    std::printf("FAILED: ATEN_CPU_CAPABILITY=%s asked for, torch chose %s\n", wanted, capability.c_str());
    return 1;
  }

  const std::string filter = argc > 1 ? argv[1] : "";
  int passed = 0;
  int failed = 0;
  for (const auto& test : registry()) {
    if (!filter.empty() && std::string(test.name).find(filter) == std::string::npos) {
      continue;
    }
    std::string error;
    try {
      test.fn();
    } catch (const multiflow::test::Failure& f) {
      error = f.message;
    } catch (const c10::Error& e) {
      error = std::string("c10::Error: ") + e.what_without_backtrace();
    } catch (const std::exception& e) {
      error = std::string("exception: ") + e.what();
    }
    if (error.empty()) {
      ++passed;
      std::printf("ok      %s\n", test.name);
    } else {
      ++failed;
      std::printf("FAILED  %s\n        %s\n", test.name, error.c_str());
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  if (passed + failed == 0) {
    std::printf("FAILED: no test matches \"%s\"\n", filter.c_str());
    return 1;
  }
  return failed == 0 ? 0 : 1;
}
