// Host shared-memory domain: POSIX shm objects ("/ws-x", shm_open) and
// files under /dev/shm, each mapped once, whole, MAP_SHARED.
//
// Objects are cached by (st_dev, st_ino). Every Map() stats the name, so an
// object re-created under the same name (new inode) or resized is remapped
// instead of reusing a stale mapping. A cached object stays mapped while the
// cache or any Mapping holds it; Trim() drops the cache's reference to
// objects no Mapping uses. Since a cached mapping keeps its inode alive, an
// inode number cannot be recycled for a different object while cached.
//
// Thread-safety: all methods are thread-safe; mmap runs outside the lock.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "daemon/mem/memory.h"

namespace ws {

struct HostShmOptions {
  // Pre-fault the page tables at map time (once per object) so copies do not
  // take a page fault per 4 KiB on every first touch.
  bool populate = true;
  // Called once per newly mapped object, e.g. to cudaHostRegister it. The
  // returned token is released before the object is unmapped. An error fails
  // the Map() that created the object.
  std::function<Result<std::shared_ptr<void>>(void* base, uint64_t size, bool writable,
                                              const std::string& name)>
      pin;
};

class HostShmDomain final : public MemoryDomain {
 public:
  explicit HostShmDomain(HostShmOptions opts = {});
  ~HostShmDomain() override;

  DomainCaps caps() const override;
  using MemoryDomain::Map;
  Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string& what, const Accessor& by) override;
  void Trim() override;
  void TrimStale() override;

  // Objects currently held by the cache (for tests and status).
  size_t cached_objects() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Resolves a host ref name to a filesystem path: "/ws-x" -> "/dev/shm/ws-x";
// "/dev/shm/a/b" stays. Anything else (relative names, other directories,
// ".." components) is InvalidArgument.
Result<std::string> ResolveShmPath(const std::string& name);

}  // namespace ws
