// POSIX shared-memory objects owned by a client process (RAII): created with
// O_CREAT|O_EXCL, mapped read-write, unmapped and unlinked on destruction.
// The daemon opens them by name (HostShmRef.name).
//
// Thread-safety: the object is not synchronised; its bytes may be written
// concurrently on disjoint ranges.
#pragma once

#include <cstdint>
#include <string>

#include "daemon/core/posix_handles.h"
#include "daemon/core/status.h"

namespace ws {

class ShmObject {
 public:
  // Creates and maps `name` ("/..."), `bytes` long (backing space is
  // allocated up front so a full /dev/shm fails here, not later with
  // SIGBUS). A zero-byte request creates a 1-byte object.
  static Result<ShmObject> Create(const std::string& name, uint64_t bytes);
  // "/ws-<pid>-<tag>-<n>", unique within the process and across processes.
  static std::string UniqueName(const std::string& tag);

  ShmObject() = default;
  ShmObject(ShmObject&& o) noexcept;
  ShmObject& operator=(ShmObject&& o) noexcept;
  ShmObject(const ShmObject&) = delete;
  ShmObject& operator=(const ShmObject&) = delete;
  ~ShmObject();

  bool valid() const { return map_.valid(); }
  uint8_t* data() const { return static_cast<uint8_t*>(map_.get()); }
  uint64_t size() const { return size_; }  // the requested size
  const std::string& name() const { return name_; }

 private:
  void Reset();
  std::string name_;
  UniqueMapping map_;  // at least 1 byte
  uint64_t size_ = 0;
};

}  // namespace ws
