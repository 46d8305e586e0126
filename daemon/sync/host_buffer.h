// A daemon-owned host buffer seen as a Mapping, so the executor's bound ops
// (BindOp) can read from or write into it: the staging buffers of syncs
// across nodes (packed chunks before they are sent, received chunks before
// they are scattered). 64-byte aligned, zeroed; freed with the object.
//
// Thread-safety: immutable after construction (the bytes are the users').
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "daemon/core/status.h"
#include "daemon/mem/memory.h"

namespace ws::server {

class HostBuffer final : public Mapping {
 public:
  static Result<std::shared_ptr<HostBuffer>> Create(uint64_t bytes) {
    const uint64_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (p == nullptr) return ResourceExhausted("cannot allocate a " + std::to_string(bytes) + "-byte staging buffer");
    std::memset(p, 0, rounded == 0 ? 64 : rounded);
    return std::shared_ptr<HostBuffer>(new HostBuffer(p, bytes));
  }
  ~HostBuffer() override { std::free(data_); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* data() const override { return data_; }
  uint64_t size() const override { return size_; }
  MemoryKind kind() const override { return MemoryKind::kHostShm; }  // host memory, copied by the host executor
  int device() const override { return -1; }
  MemoryExtent extent() const override {
    MemoryExtent e;
    e.object_a = reinterpret_cast<uintptr_t>(data_);
    e.end = size_;
    return e;
  }

 private:
  HostBuffer(void* p, uint64_t n) : data_(p), size_(n) {}
  void* const data_;
  const uint64_t size_;
};

}  // namespace ws::server
