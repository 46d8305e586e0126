#include "daemon/mem/host_shm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <map>
#include <utility>

#include "daemon/core/posix_handles.h"
#include "daemon/core/thread_annotations.h"

namespace ws {
namespace {

std::string Errno(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

// A name from a peer, safe to quote: non-printable bytes as \xNN, long names cut.
std::string Printable(const std::string& s) {
  constexpr size_t kMax = 300;
  std::string out;
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (s.size() > kMax) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

const char* TypeName(mode_t mode) {
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISLNK(mode)) return "a symbolic link";
  return "not a regular file";
}

std::string Who(const Accessor& by) { return by.who.empty() ? "uid " + std::to_string(by.uid) : by.who; }

std::string Octal(mode_t mode) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(mode & 07777));
  return buf;
}

struct ShmObject;

// Every mapped ShmObject by base address, for DiagnoseMemoryFault() and
// PinHostObject(). An object leaves before it is unmapped; the lock keeps it
// alive while a diagnosis or a lazy pin uses it.
Mutex g_mapped_mu;
std::map<uintptr_t, ShmObject*> g_mapped WS_GUARDED_BY(g_mapped_mu);

// One mapped shm object, with the fd it was opened by. Unregistered, then
// unpinned, then unmapped when the last holder (cache or Mapping) drops it.
struct ShmObject {
  std::string name;  // the directory entry it was opened by (one component)
  std::string dir;   // for messages: "/dev/shm"
  UniqueFd fd;
  dev_t dev = 0;
  ino_t ino = 0;
  uint64_t size = 0;
  void* base = nullptr;  // nullptr for a zero-size object
  bool writable = false;  // mapped PROT_WRITE (fd opened O_RDWR)
  bool registered = false;
  std::shared_ptr<void> pin;
  // lazy_pin: the hook, until PinHostObject() has called it successfully
  // (guarded by g_mapped_mu).
  decltype(HostShmOptions::pin) lazy_pin WS_GUARDED_BY(g_mapped_mu);

  ShmObject() = default;
  ShmObject(const ShmObject&) = delete;
  ShmObject& operator=(const ShmObject&) = delete;
  ~ShmObject() {
    if (registered) {
      MutexLock lock(&g_mapped_mu);
      g_mapped.erase(reinterpret_cast<uintptr_t>(base));
    }
    pin.reset();
    if (base != nullptr) ::munmap(base, size);
  }
  std::string Quoted() const { return "'/" + Printable(name) + "'"; }
};

class HostMapping final : public Mapping {
 public:
  HostMapping(std::shared_ptr<ShmObject> obj, uint64_t offset, uint64_t length, bool writable)
      : obj_(std::move(obj)), offset_(offset), length_(length), writable_(writable) {}
  void* data() const override {
    return obj_->base == nullptr ? nullptr : static_cast<char*>(obj_->base) + offset_;
  }
  uint64_t size() const override { return length_; }
  MemoryKind kind() const override { return MemoryKind::kHostShm; }
  int device() const override { return -1; }
  bool writable() const override { return writable_; }
  const void* object() const override { return obj_.get(); }
  MemoryExtent extent() const override {
    return MemoryExtent{MemoryKind::kHostShm, static_cast<uint64_t>(obj_->dev), static_cast<uint64_t>(obj_->ino),
                        offset_, offset_ + length_};
  }
  // The object's own fd: also sees objects unlinked (or renamed over) since.
  Status CheckBacked() const override {
    struct stat st;
    if (::fstat(obj_->fd.get(), &st) != 0)
      return Internal("host memory " + obj_->Quoted() + ": fstat: " + Errno(errno));
    if (static_cast<uint64_t>(st.st_size) < offset_ + length_)
      return FailedPrecondition("host memory " + obj_->Quoted() + " shrank to " + std::to_string(st.st_size) +
                                " bytes after it was mapped (" + std::to_string(offset_ + length_) + " needed)");
    return Status::Ok();
  }
  Status Reserve() const override {
    if (length_ == 0) return Status::Ok();
    if (!writable_)
      return FailedPrecondition("host memory " + obj_->Quoted() +
                                " is mapped read-only; only writable ranges are reserved");
    int rc;
    do {
      rc = ::fallocate(obj_->fd.get(), FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset_), static_cast<off_t>(length_));
    } while (rc != 0 && errno == EINTR);
    if (rc == 0) return Status::Ok();
    const int e = errno;
    if (e == EOPNOTSUPP) return Status::Ok();  // cannot reserve here: writes allocate as they go
    if (e == ENOSPC) {
      struct statvfs vfs;
      const std::string free = ::fstatvfs(obj_->fd.get(), &vfs) == 0
                                   ? std::to_string(static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize)
                                   : std::string("unknown");
      return ResourceExhausted("out of space in " + obj_->dir + ": " + free + " bytes free (statvfs), host memory " +
                               obj_->Quoted() + " needs " + std::to_string(length_) + " bytes at offset " +
                               std::to_string(offset_));
    }
    return FailedPrecondition("host memory " + obj_->Quoted() + ": reserving " + std::to_string(length_) +
                              " bytes at offset " + std::to_string(offset_) + ": fallocate: " + Errno(e));
  }

 private:
  std::shared_ptr<ShmObject> obj_;
  uint64_t offset_, length_;
  bool writable_;
};

using Key = std::pair<dev_t, ino_t>;

// What `by` may do with an object, decided from the opened fd's fstat: the
// owner class uses the owner bits, a group in by.gids the group bits, an
// any_owner Accessor may read and write anything else.
struct Access {
  bool read = false, write = false;
};

Result<Access> AccessFor(const struct stat& st, const Accessor& by, const std::string& desc) {
  const mode_t m = st.st_mode;
  if (st.st_uid == by.uid) {
    if (!(m & S_IRUSR))
      return PermissionDenied(desc + " (mode " + Octal(m) + ") is not readable by its owner (" + Who(by) + ")");
    return Access{true, (m & S_IWUSR) != 0};
  }
  if (std::find(by.gids.begin(), by.gids.end(), static_cast<uint32_t>(st.st_gid)) != by.gids.end()) {
    if (!(m & S_IRGRP))
      return PermissionDenied(desc + " (mode " + Octal(m) + ") is not readable by its group " +
                                std::to_string(st.st_gid) + " (" + Who(by) + ")");
    return Access{true, (m & S_IWGRP) != 0};
  }
  if (by.any_owner) return Access{true, true};
  return PermissionDenied(desc + " is owned by uid " + std::to_string(st.st_uid) + " (group " +
                            std::to_string(st.st_gid) + "), not by the caller (" + Who(by) + ")");
}

}  // namespace

Result<std::string> ShmObjectName(const std::string& name, const std::string& dir) {
  std::string prefix = dir;
  while (prefix.size() > 1 && prefix.back() == '/') prefix.pop_back();
  prefix += '/';
  std::string obj;
  if (name.size() > prefix.size() - 1 && name.compare(0, prefix.size(), prefix) == 0) {
    obj = name.substr(prefix.size());
  } else if (!name.empty() && name[0] == '/') {
    obj = name.substr(1);
  } else {
    return InvalidArgument("host memory name '" + Printable(name) + "' is neither a POSIX shm name (\"/ws-x\") nor " +
                           prefix + "NAME");
  }
  if (obj.empty() || obj == "." || obj == ".." || obj.find('/') != std::string::npos ||
      obj.find('\0') != std::string::npos || obj.size() > NAME_MAX) {
    return InvalidArgument("host memory '" + Printable(name) + "' must be a name directly under " + dir +
                           " (one component: no '/', not '.' or '..', no NUL, at most " + std::to_string(NAME_MAX) +
                           " bytes)");
  }
  return obj;
}

struct HostShmDomain::Impl {
  HostShmOptions opts;
  UniqueFd dir;  // O_PATH fd of opts.dir; -1 when it could not be opened
  Status dir_error;  // why not
  mutable Mutex mu;
  std::map<Key, std::shared_ptr<ShmObject>> cache WS_GUARDED_BY(mu);

  // Opens `name` in the directory without following symbolic links or
  // blocking (FIFOs); falls back to read-only when writing is refused.
  Result<std::pair<UniqueFd, bool>> OpenEntry(const std::string& name, const std::string& desc) const {
    constexpr int kFlags = O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC;
    bool rw = true;
    int fd = ::openat(dir.get(), name.c_str(), O_RDWR | kFlags);
    if (fd < 0 && (errno == EACCES || errno == EPERM || errno == EROFS)) {
      rw = false;
      fd = ::openat(dir.get(), name.c_str(), O_RDONLY | kFlags);
    }
    if (fd >= 0) return std::make_pair(UniqueFd(fd), rw);
    const int e = errno;
    if (e == ENOENT) return NotFound(desc + " does not exist in " + opts.dir);
    if (e == ELOOP) {
      return InvalidArgument(desc + " is a symbolic link; host memory must be a regular file directly under " +
                             opts.dir);
    }
    // Say what it is for messages only (EISDIR, ENXIO for sockets, ...);
    // nothing is decided from this lookup.
    struct stat st;
    if (::fstatat(dir.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISREG(st.st_mode))
      return InvalidArgument(desc + " is " + TypeName(st.st_mode) + ", not a regular file");
    return FailedPrecondition(desc + ": open: " + Errno(e));
  }

  // Maps the opened object (whole). `fd` moves into the object.
  Result<std::shared_ptr<ShmObject>> MapObject(const std::string& name, const std::string& desc, UniqueFd fd,
                                               const struct stat& st, bool writable) const {
    auto obj = std::make_shared<ShmObject>();
    obj->name = name;
    obj->dir = opts.dir;
    obj->fd = std::move(fd);
    obj->dev = st.st_dev;
    obj->ino = st.st_ino;
    obj->size = static_cast<uint64_t>(st.st_size);
    obj->writable = writable;
    if (obj->size > 0) {
      int prot = PROT_READ | (writable ? PROT_WRITE : 0);
      int flags = MAP_SHARED | (opts.populate ? MAP_POPULATE : 0);
      void* p = ::mmap(nullptr, obj->size, prot, flags, obj->fd.get(), 0);
      if (p == MAP_FAILED) {
        return FailedPrecondition(desc + ": mmap of " + std::to_string(obj->size) + " bytes failed: " + Errno(errno));
      }
      obj->base = p;
      {
        MutexLock lock(&g_mapped_mu);
        g_mapped[reinterpret_cast<uintptr_t>(p)] = obj.get();
        obj->registered = true;
      }
      if (opts.pin && opts.lazy_pin) {
        MutexLock lock(&g_mapped_mu);
        obj->lazy_pin = opts.pin;
      } else if (opts.pin) {
        auto token = opts.pin(p, obj->size, writable, "/" + name);
        if (!token.ok()) return token.status();
        obj->pin = std::move(token).value();
      }
    }
    return obj;
  }
};

HostShmDomain::HostShmDomain(HostShmOptions opts) : impl_(std::make_unique<Impl>()) {
  impl_->opts = std::move(opts);
  int fd = ::open(impl_->opts.dir.c_str(), O_DIRECTORY | O_PATH | O_CLOEXEC);
  if (fd < 0) {
    impl_->dir_error = FailedPrecondition("cannot open the shared memory directory " + impl_->opts.dir + ": " +
                                          Errno(errno));
  }
  impl_->dir = UniqueFd(fd);
}
HostShmDomain::~HostShmDomain() = default;

DomainCaps HostShmDomain::caps() const {
  DomainCaps c;
  c.host_shm = true;
  return c;
}

Result<std::shared_ptr<Mapping>> HostShmDomain::Map(const MemoryRef& ref, const std::string& what,
                                                   const Accessor& by) {
  if (ref.kind != MemoryKind::kHostShm) {
    return InvalidArgument(what + ": " + ref.ToString() + " is not host shared memory");
  }
  auto name = ShmObjectName(ref.name, impl_->opts.dir);
  if (!name.ok()) return name.status().WithContext(what);
  const std::string desc = "host memory '" + Printable(ref.name) + "'";
  if (!by.local) {
    return PermissionDenied(what + ": " + desc + " cannot be mapped for " + Who(by) +
                              ": host memory needs a local peer with known credentials");
  }
  if (impl_->dir.get() < 0) return impl_->dir_error.WithContext(what);

  auto opened = impl_->OpenEntry(*name, desc);
  if (!opened.ok()) return opened.status().WithContext(what);
  auto [fd, rw] = std::move(opened).value();
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return Internal(what + ": " + desc + ": fstat: " + Errno(errno));
  if (!S_ISREG(st.st_mode))
    return InvalidArgument(what + ": " + desc + " is " + TypeName(st.st_mode) + ", not a regular file");
  auto access = AccessFor(st, by, desc);
  if (!access.ok()) return access.status().WithContext(what);
  const bool writable = rw && access->write;
  const uint64_t size = static_cast<uint64_t>(st.st_size);

  const Key key{st.st_dev, st.st_ino};
  std::shared_ptr<ShmObject> obj;
  {
    MutexLock lock(&impl_->mu);
    auto it = impl_->cache.find(key);
    if (it != impl_->cache.end()) {
      if (it->second->size != size) {
        impl_->cache.erase(it);  // resized: remap; live Mappings keep the old one
      } else if (it->second->writable || !writable) {
        obj = it->second;
      }  // else mapped read-only for an earlier peer: remap writable below
    }
  }
  if (!obj) {
    auto mapped = impl_->MapObject(*name, desc, std::move(fd), st, writable);
    if (!mapped.ok()) return mapped.status().WithContext(what);
    obj = std::move(mapped).value();
    MutexLock lock(&impl_->mu);
    // A re-created name leaves its old inode in the cache; drop entries for
    // the same name so a stale object is not kept mapped until Trim().
    for (auto it = impl_->cache.begin(); it != impl_->cache.end();) {
      if (it->second->name == obj->name && it->first != key) {
        it = impl_->cache.erase(it);
      } else {
        ++it;
      }
    }
    auto [it, inserted] = impl_->cache.emplace(key, obj);
    if (!inserted) {
      if (it->second->size == obj->size && (it->second->writable || !obj->writable)) {
        obj = it->second;  // another thread mapped it first; ours unmaps here
      } else {
        it->second = obj;
      }
    }
  }
  if (ref.offset > obj->size || ref.length > obj->size - ref.offset) {
    return OutOfRange(what + ": " + desc + " offset " + std::to_string(ref.offset) + " + length " +
                      std::to_string(ref.length) + " exceeds the object size " + std::to_string(obj->size));
  }
  return std::shared_ptr<Mapping>(std::make_shared<HostMapping>(std::move(obj), ref.offset, ref.length, writable));
}

void HostShmDomain::Trim() {
  MutexLock lock(&impl_->mu);
  for (auto it = impl_->cache.begin(); it != impl_->cache.end();) {
    if (it->second.use_count() == 1) {
      it = impl_->cache.erase(it);
    } else {
      ++it;
    }
  }
}

void HostShmDomain::TrimStale() {
  MutexLock lock(&impl_->mu);
  for (auto it = impl_->cache.begin(); it != impl_->cache.end();) {
    struct stat st;
    const ShmObject& o = *it->second;
    const bool gone = ::fstatat(impl_->dir.get(), o.name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 ||
                      st.st_dev != o.dev || st.st_ino != o.ino;
    if (gone && it->second.use_count() == 1) {
      it = impl_->cache.erase(it);
    } else {
      ++it;
    }
  }
}

size_t HostShmDomain::cached_objects() const {
  MutexLock lock(&impl_->mu);
  return impl_->cache.size();
}

std::unique_ptr<MemoryDomain> MakeHostShmDomain() { return std::make_unique<HostShmDomain>(); }

Status PinHostObject(const void* addr) {
  const auto a = reinterpret_cast<uintptr_t>(addr);
  MutexLock lock(&g_mapped_mu);
  auto it = g_mapped.upper_bound(a);
  if (it == g_mapped.begin() || a - std::prev(it)->first >= std::prev(it)->second->size)
    return NotFound("no mapped shared memory object contains this host address");
  ShmObject& o = *std::prev(it)->second;
  if (!o.lazy_pin) return Status::Ok();
  // Under the lock: the object cannot be unmapped meanwhile, and each object
  // is pinned once. Pinning is rare (once per object), so others wait little.
  auto token = o.lazy_pin(o.base, o.size, o.writable, "/" + o.name);
  if (!token.ok()) return token.status();
  o.pin = std::move(token).value();
  o.lazy_pin = nullptr;
  return Status::Ok();
}

std::string DiagnoseMemoryFault(const void* addr, bool writing) {
  const auto a = reinterpret_cast<uintptr_t>(addr);
  MutexLock lock(&g_mapped_mu);
  auto it = g_mapped.upper_bound(a);
  if (it == g_mapped.begin()) return {};
  --it;
  const ShmObject& o = *it->second;
  if (a - it->first >= o.size) return {};
  const uint64_t offset = a - it->first;
  struct stat st;
  if (::fstat(o.fd.get(), &st) != 0) return {};
  // A fault past the end of the file is a truncation; inside it, the
  // filesystem could not allocate the page (tmpfs full).
  if (static_cast<uint64_t>(st.st_size) <= offset) {
    return "shared memory object " + o.Quoted() + " was truncated while being copied: it is now " +
           std::to_string(st.st_size) + " bytes, the fault was at offset " + std::to_string(offset);
  }
  struct statvfs vfs;
  const std::string free = ::fstatvfs(o.fd.get(), &vfs) == 0
                               ? std::to_string(static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize)
                               : std::string("unknown");
  return "out of space in " + o.dir + " while " + (writing ? "writing" : "reading") + " shared memory object " +
         o.Quoted() + " at offset " + std::to_string(offset) + " (" + free +
         " bytes free, statvfs)";
}

}  // namespace ws
