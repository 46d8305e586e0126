// Memory domains: where source shards and engine parameters live, behind one
// small interface (cf. LevelDB's Env). A host shared-memory domain works on
// every machine and backs all tests; the device IPC domain (ipc_domain.h,
// over the platform's IPC) is added by MakeMemoryDomain() when built with
// CUDA and a device is present.
//
// Thread-safety: MemoryDomain implementations are thread-safe. A Mapping is
// immutable; its bytes may be written concurrently by copy workers on
// disjoint ranges.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "daemon/core/status.h"

namespace ws {

enum class MemoryKind : uint8_t { kHostShm = 0, kCudaIpc = 1 };

const char* MemoryKindName(MemoryKind k);  // "host_shm", "cuda_ipc"

// Where a copy reads and where it writes: the memory kinds of its two ends
// and whether both are on this node. Transports declare the routes they
// serve (daemon/transport/transport.h).
struct Route {
  MemoryKind src = MemoryKind::kHostShm;
  MemoryKind dst = MemoryKind::kHostShm;
  bool same_node = true;
  bool operator==(const Route&) const = default;
  std::string ToString() const;  // "host_shm -> cuda_ipc on this node"
};

// Who a mapping is made for. The daemon maps memory on behalf of a peer and
// only memory that peer owns (docs/security.md). Nothing is mapped for a peer
// that is not `local` (credentials the kernel vouched for: unix socket
// SO_PEERCRED, or the daemon itself). Host objects must be regular files
// directly under /dev/shm (no subdirectories, no symbolic links, no FIFOs or
// devices), owned by `uid` (mapped as the owner permission bits allow) or by
// a group in `gids` (as the group bits allow); `any_owner` lifts only the
// ownership rule. CUDA IPC references need a `local` peer.
struct Accessor {
  bool local = false;       // credentials known (unix-socket peer or in-process)
  bool any_owner = false;   // admin: objects of any owner (still only files directly under /dev/shm)
  uint32_t uid = 0;
  std::vector<uint32_t> gids;  // groups whose objects this peer may map (allowed by config and held by the peer)
  std::string who;             // for messages, e.g. "uid 1000 (pid 42)"

  // The daemon process itself (tests, in-process tools): its effective uid.
  static Accessor Self();
};

// Where a mapping's bytes live, comparable across mappings and engines:
// two extents overlap iff they name the same object and their ranges meet.
// Host shm: object = (st_dev, st_ino), range = file offsets. CUDA: object =
// (device ordinal, 0), range = device virtual addresses in the daemon.
struct MemoryExtent {
  MemoryKind kind = MemoryKind::kHostShm;
  uint64_t object_a = 0, object_b = 0;
  uint64_t begin = 0, end = 0;  // [begin, end)
  bool Overlaps(const MemoryExtent& o) const {
    return kind == o.kind && object_a == o.object_a && object_b == o.object_b && begin < end && o.begin < o.end &&
           begin < o.end && o.begin < end;
  }
  std::string ToString() const;  // "shm inode 12:345 bytes [0, 4096)"
};

// The domain form of a proto MemoryRef.
struct MemoryRef {
  MemoryKind kind = MemoryKind::kHostShm;
  std::string name;          // host: shm_open name ("/ws-x") or "/dev/shm/ws-x" (one component)
  std::string cuda_handle;   // cuda: 64-byte cudaIpcMemHandle_t
  std::string device_uuid;   // cuda: "GPU-xxxxxxxx-..."
  uint64_t offset = 0;
  uint64_t length = 0;

  std::string ToString() const;  // for error messages
};

// A mapped range. Keeps the underlying object mapped for as long as it lives
// (RAII); the domain's cache holds one reference per object.
class Mapping {
 public:
  virtual ~Mapping() = default;
  // Base address of the *referenced range* (object base + ref.offset).
  virtual void* data() const = 0;
  virtual uint64_t size() const = 0;
  virtual MemoryKind kind() const = 0;
  // Device ordinal for CUDA mappings, -1 for host memory.
  virtual int device() const = 0;
  // False when the object could only be opened read-only (fine for trainer
  // sources; engine destinations must check it).
  virtual bool writable() const { return true; }
  // Checks that the mapped range is still backed by its object (a peer that
  // truncates a mapped shm object would make the next access SIGBUS).
  virtual Status CheckBacked() const { return Status::Ok(); }
  // For writable destinations, at registration: allocates the backing store
  // of the range now, so later writes cannot run out of space (host shm:
  // fallocate; a full /dev/shm is ResourceExhausted saying how much is free).
  // CUDA memory is allocated already: Ok.
  virtual Status Reserve() const { return Status::Ok(); }
  // Identity of the underlying object: mappings of one object return the same
  // pointer, so callers can check each object once rather than every range.
  virtual const void* object() const { return this; }
  // The bytes this mapping covers, for overlap checks between parameters.
  virtual MemoryExtent extent() const = 0;
  // The mapping this one is a slice of (SliceMapping, through any nesting)
  // and this one's byte offset in it; itself and 0 when not a slice. Lets
  // the sync layer address several slices of one mapping through one op.
  virtual std::pair<const Mapping*, uint64_t> Whole() const { return {this, 0}; }
};

// [offset, offset + length) of `whole` (which must cover it) as a mapping of
// its own, sharing `whole`'s object: one Map of a range several references
// fall in, then a slice per reference.
std::shared_ptr<Mapping> SliceMapping(std::shared_ptr<Mapping> whole, uint64_t offset, uint64_t length);
// The same for many ranges (offset, length) of one `whole` at once: the
// slices share one allocation (which keeps `whole` alive) instead of one
// each, for the tens of thousands of shards of a layer message.
std::vector<std::shared_ptr<Mapping>> SliceMappings(std::shared_ptr<Mapping> whole,
                                                    const std::vector<std::pair<uint64_t, uint64_t>>& ranges);

// The reference kinds a domain maps.
struct DomainCaps {
  bool host_shm = false;
  bool cuda_ipc = false;
};

class MemoryDomain {
 public:
  virtual ~MemoryDomain() = default;
  virtual DomainCaps caps() const = 0;
  // Maps `ref` for `by`, validating offset+length against the object's size
  // and that `by` may use the object (see Accessor). Objects are opened once
  // and cached by identity; repeated calls are cheap. Errors name `what` (the
  // tensor or parameter the reference belongs to).
  virtual Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string& what, const Accessor& by) = 0;
  // For the daemon itself and tests: Map(ref, what, Accessor::Self()).
  Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string& what) {
    return Map(ref, what, Accessor::Self());
  }
  // Drops cached objects that are no longer referenced by any live Mapping.
  virtual void Trim() = 0;
  // Drops only unreferenced cached objects whose owner has gone: the name no
  // longer exists or now names another object (a trainer that exited and
  // unlinked its shm). Cheap enough to call every few seconds; keeps live
  // trainers' objects cached across syncs.
  virtual void TrimStale() {}
  // Drops only unreferenced CUDA IPC allocations, closing their handles (a
  // trainer may free that memory once its sync is over: empty_cache, OOM
  // retry, restart). Host objects stay cached.
  virtual void TrimCuda() {}
};

// Host shared memory (POSIX shm / files under /dev/shm).
std::unique_ptr<MemoryDomain> MakeHostShmDomain();

// For fault guards that caught a SIGBUS at `addr` (`writing`: the faulting
// access was a write): why, from the live host object mapped there, e.g.
// "shared memory object '/ws-x' was truncated while being copied: ..." or
// "out of space in /dev/shm while writing shared memory object '/ws-x' ...".
// Empty when no live host mapping covers addr. Not async-signal-safe: call it
// after leaving the signal handler.
std::string DiagnoseMemoryFault(const void* addr, bool writing);

// The factory: host domain always; CUDA IPC too when built with CUDA and a
// device and the CUDA executor are usable (otherwise CUDA refs are refused
// with a clear error). The domain of MakeDataPlane (daemon/dataplane/
// data_plane.h), which the daemon uses to get a matching executor.
std::unique_ptr<MemoryDomain> MakeMemoryDomain();

// Host references go to `host`; CUDA references to `cuda`, or, when it is
// null, are refused with cuda_unavailable's code and message.
std::unique_ptr<MemoryDomain> MakeCompositeDomain(std::unique_ptr<MemoryDomain> host,
                                                  std::unique_ptr<MemoryDomain> cuda, Status cuda_unavailable);

}  // namespace ws
