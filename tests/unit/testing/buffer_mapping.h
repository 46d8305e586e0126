// A heap buffer as a Mapping (host memory, 8-byte aligned), for tests that
// bind ops against mapped sizes without shared memory.
#pragma once

#include <cstdint>
#include <vector>

#include "daemon/mem/memory.h"

namespace ws::testing {

class BufferMapping final : public Mapping {
 public:
  explicit BufferMapping(size_t bytes) : buf_((bytes + 7) / 8 + 1), bytes_(bytes) {}
  void* data() const override { return const_cast<uint64_t*>(buf_.data()); }
  uint64_t size() const override { return bytes_; }
  MemoryKind kind() const override { return MemoryKind::kHostShm; }
  int device() const override { return -1; }
  MemoryExtent extent() const override { return {}; }

 private:
  std::vector<uint64_t> buf_;
  size_t bytes_;
};

}  // namespace ws::testing
