// A minimal test harness for the C++ tests of the CPU kernels (run by ctest),
// with no dependency beyond libtorch: CI machines start fresh and the build
// may download nothing.
//
//   MF_TEST(pack_mask_bit_layout) { MF_CHECK(a == b, "row ", r, ": got ", a); }
//
// A failed MF_CHECK ends its test (it throws) and the runner (main.cpp) goes on
// with the next one; so does a c10::Error thrown by an op.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace multiflow::test {

struct TestCase {
  const char* name;
  void (*fn)();
};

std::vector<TestCase>& registry();

struct Register {
  Register(const char* name, void (*fn)()) {
    registry().push_back({name, fn});
  }
};

// What a failed MF_CHECK throws: where, and what.
struct Failure {
  std::string message;
};

template <typename... Parts>
[[noreturn]] void fail(const char* file, int line, const char* condition, const Parts&... parts) {
  std::ostringstream os;
  os << file << ":" << line << ": check failed: " << condition;
  if constexpr (sizeof...(parts) > 0) {
    os << ": ";
    (os << ... << parts);
  }
  throw Failure{os.str()};
}

// An op of the multiflow namespace, called through the dispatcher as a C++
// user would: op<at::Tensor(const at::Tensor&)>("pack_mask").call(mask).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((std::string("multiflow::") + name).c_str(), "").typed<Signature>();
}

}  // namespace multiflow::test

#define MF_TEST(name)                                                                \
  static void name();                                                                \
  static const ::multiflow::test::Register name##_registered_(#name, &name);         \
  static void name()

// MF_CHECK(condition) or MF_CHECK(condition, message parts streamed with <<...).
#define MF_CHECK(condition, ...)                                                     \
  do {                                                                               \
    if (!(condition)) {                                                              \
      ::multiflow::test::fail(__FILE__, __LINE__, #condition __VA_OPT__(, ) __VA_ARGS__); \
    }                                                                                \
  } while (0)

// MF_CHECK_THROWS(statement, "text the error message must contain").
#define MF_CHECK_THROWS(statement, expected_text)                                    \
  do {                                                                               \
    bool mf_threw_ = false;                                                          \
    try {                                                                            \
      statement;                                                                     \
    } catch (const c10::Error& e) {                                                  \
      mf_threw_ = true;                                                              \
      const std::string mf_what_ = e.what_without_backtrace();                       \
      MF_CHECK(mf_what_.find(expected_text) != std::string::npos,                    \
               "the error does not say \"", expected_text, "\": ", mf_what_);       \
    }                                                                                \
    MF_CHECK(mf_threw_, #statement " did not throw");                                \
  } while (0)
