// Host shared-memory domain: POSIX shm objects ("/ws-x", shm_open) and
// files directly under /dev/shm, each mapped once, whole, MAP_SHARED.
//
// Untrusted local clients name the objects and the daemon may run as root,
// so nothing is ever resolved or checked by path:
//  - a ref name is "/NAME" or "/dev/shm/NAME": exactly one component (no
//    '/', not "." or "..", no NUL, at most NAME_MAX bytes); subdirectories
//    are refused;
//  - NAME is opened relative to a directory fd of /dev/shm taken once at
//    construction, with O_NOFOLLOW|O_NONBLOCK (a symbolic link fails with
//    ELOOP, a FIFO cannot block the open), and every check uses fstat() of
//    the opened fd: only regular files, owned by the Accessor's uid (owner
//    permission bits apply), or by one of its gids (group bits apply), or
//    any owner for an `any_owner` Accessor; the Accessor must be `local`.
//    An object its class may only read is mapped read-only.
//
// Objects are cached by (st_dev, st_ino) of the opened fd. Every Map()
// opens and fstats the name (cheap), so an object re-created under the same
// name (new inode) or resized is remapped instead of reusing a stale
// mapping. A cached object keeps its fd open and stays mapped while the
// cache or any Mapping holds it; Trim() drops the cache's reference to
// objects no Mapping uses. Since a cached mapping keeps its inode alive, an
// inode number cannot be recycled for a different object while cached.
// CheckBacked() fstats the object's own fd; TrimStale() looks the name up
// with fstatat(AT_SYMLINK_NOFOLLOW) in the directory fd.
//
// Mapping::Reserve() fallocates the range (FALLOC_FL_KEEP_SIZE): tmpfs
// allocates the pages now, and a full /dev/shm is ResourceExhausted at
// registration instead of a SIGBUS mid-copy. DiagnoseMemoryFault() (memory.h)
// explains faults in objects mapped here: truncated, or out of space.
//
// Thread-safety: all methods are thread-safe; mmap runs outside the lock.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "daemon/mem/memory.h"

namespace ws {

struct HostShmOptions {
  // The directory objects live in. Only tests use another one (e.g. a small
  // tmpfs); ref names "/NAME" and "<dir>/NAME" then name dir/NAME.
  std::string dir = "/dev/shm";
  // Pre-fault the page tables at map time (once per object) so copies do not
  // take a page fault per 4 KiB on every first touch.
  bool populate = true;
  // Called once per newly mapped object, e.g. to cudaHostRegister it. The
  // returned token is released before the object is unmapped. An error fails
  // the Map() that created the object.
  std::function<Result<std::shared_ptr<void>>(void* base, uint64_t size, bool writable,
                                              const std::string& name)>
      pin;
  // Call `pin` not at map time but from PinHostObject(), when a device copy
  // first needs the object (host-to-host syncs never pin).
  bool lazy_pin = false;
};

// For lazy_pin domains: pins the mapped host object containing addr unless
// it is pinned already. NotFound when no object mapped by a HostShmDomain
// covers addr; the pin hook's error if it fails (the next call tries again).
Status PinHostObject(const void* addr);

class HostShmDomain final : public MemoryDomain {
 public:
  // Opens opts.dir once; if that fails, every Map() reports why.
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

// The object name a host ref names in `dir`: "/ws-x" -> "ws-x" and
// "<dir>/ws-x" -> "ws-x". Pure string check, no filesystem access. Anything
// else (relative names, other directories, subdirectories, "." and "..",
// NUL bytes, names over NAME_MAX) is InvalidArgument naming `name`.
Result<std::string> ShmObjectName(const std::string& name, const std::string& dir = "/dev/shm");

}  // namespace ws
