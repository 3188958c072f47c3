// Buffers that end right before a page with no access (Linux): the C++ tests of
// the per-ISA row kernels put every input and output there, so a load or store
// past a row's elements faults (ctest then reports the test failed).
#pragma once

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

#include "tests/harness.h"

namespace multiflow::test {

// n elements of E whose last byte lies just before a page with no access at all.
template <typename E>
class AtPageEnd {
 public:
  explicit AtPageEnd(int64_t n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = static_cast<size_t>(n) * sizeof(E);
    const size_t pages = bytes / page + 1;
    size_ = (pages + 1) * page;
    void* m = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    MF_CHECK(m != MAP_FAILED, "mmap failed");
    base_ = static_cast<char*>(m);
    MF_CHECK(mprotect(base_ + pages * page, page, PROT_NONE) == 0, "mprotect failed");
    data_ = reinterpret_cast<E*>(base_ + pages * page - bytes);
  }
  AtPageEnd(const AtPageEnd&) = delete;
  AtPageEnd& operator=(const AtPageEnd&) = delete;
  ~AtPageEnd() {
    munmap(base_, size_);
  }
  E* data() const {
    return data_;
  }

 private:
  char* base_ = nullptr;
  size_t size_ = 0;
  E* data_ = nullptr;
};

}  // namespace multiflow::test
#endif
