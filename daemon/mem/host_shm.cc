#include "daemon/mem/host_shm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

namespace ws {
namespace {

constexpr char kShmDir[] = "/dev/shm/";

std::string Errno(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// One mapped shm object. Unmapped (after releasing the pin token) when the
// last holder (cache or Mapping) drops it.
struct ShmObject {
  std::string path;
  dev_t dev = 0;
  ino_t ino = 0;
  uint64_t size = 0;
  void* base = nullptr;  // nullptr for a zero-size object
  bool writable = false;
  std::shared_ptr<void> pin;

  ~ShmObject() {
    pin.reset();
    if (base != nullptr) ::munmap(base, size);
  }
};

class HostMapping final : public Mapping {
 public:
  HostMapping(std::shared_ptr<ShmObject> obj, uint64_t offset, uint64_t length)
      : obj_(std::move(obj)), offset_(offset), length_(length) {}
  void* data() const override {
    return obj_->base == nullptr ? nullptr : static_cast<char*>(obj_->base) + offset_;
  }
  uint64_t size() const override { return length_; }
  MemoryKind kind() const override { return MemoryKind::kHostShm; }
  int device() const override { return -1; }
  bool writable() const override { return obj_->writable; }
  const void* object() const override { return obj_.get(); }
  MemoryExtent extent() const override {
    return MemoryExtent{MemoryKind::kHostShm, static_cast<uint64_t>(obj_->dev), static_cast<uint64_t>(obj_->ino),
                        offset_, offset_ + length_};
  }
  Status CheckBacked() const override {
    struct stat st;
    if (::stat(obj_->path.c_str(), &st) == 0 && st.st_dev == obj_->dev && st.st_ino == obj_->ino &&
        static_cast<uint64_t>(st.st_size) < offset_ + length_)
      return FailedPrecondition("host memory '" + obj_->path + "' shrank to " + std::to_string(st.st_size) +
                                " bytes after it was mapped (" + std::to_string(offset_ + length_) + " needed)");
    return Status::Ok();  // unlinked objects stay valid while mapped
  }

 private:
  std::shared_ptr<ShmObject> obj_;
  uint64_t offset_, length_;
};

using Key = std::pair<dev_t, ino_t>;

}  // namespace

Result<std::string> ResolveShmPath(const std::string& name) {
  std::string path;
  if (name.size() > 1 && name[0] == '/' && name.find('/', 1) == std::string::npos) {
    path = std::string("/dev/shm") + name;  // what shm_open(name) opens on Linux
  } else if (name.rfind(kShmDir, 0) == 0 && name.size() > sizeof(kShmDir) - 1) {
    path = name;
  } else {
    return InvalidArgument("host memory name '" + name +
                           "' is neither a POSIX shm name (\"/ws-x\") nor an absolute path under /dev/shm");
  }
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) == nullptr) {
    int e = errno;
    if (e == ENOENT) return NotFound("host memory '" + name + "' does not exist (" + path + ")");
    return InvalidArgument("host memory '" + name + "': cannot resolve " + path + ": " + Errno(e));
  }
  std::string real(buf);
  if (real.rfind(kShmDir, 0) != 0) {
    return InvalidArgument("host memory '" + name + "' resolves to " + real + ", outside /dev/shm");
  }
  return real;
}

struct HostShmDomain::Impl {
  HostShmOptions opts;
  mutable std::mutex mu;
  std::map<Key, std::shared_ptr<ShmObject>> cache;

  Result<std::shared_ptr<ShmObject>> Open(const std::string& name, const std::string& path) {
    bool writable = true;
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0 && (errno == EACCES || errno == EROFS || errno == EPERM)) {
      writable = false;
      fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    }
    if (fd < 0) {
      int e = errno;
      if (e == ENOENT) return NotFound("host memory '" + name + "' does not exist (" + path + ")");
      return FailedPrecondition("host memory '" + name + "': open " + path + ": " + Errno(e));
    }
    Fd guard(fd);
    struct stat st;
    if (::fstat(fd, &st) != 0) return Internal("host memory '" + name + "': fstat: " + Errno(errno));
    if (!S_ISREG(st.st_mode)) return InvalidArgument("host memory '" + name + "' (" + path + ") is not a regular file");
    auto obj = std::make_shared<ShmObject>();
    obj->path = path;
    obj->dev = st.st_dev;
    obj->ino = st.st_ino;
    obj->size = static_cast<uint64_t>(st.st_size);
    obj->writable = writable;
    if (obj->size > 0) {
      int prot = PROT_READ | (writable ? PROT_WRITE : 0);
      int flags = MAP_SHARED | (opts.populate ? MAP_POPULATE : 0);
      void* p = ::mmap(nullptr, obj->size, prot, flags, fd, 0);
      if (p == MAP_FAILED) {
        return FailedPrecondition("host memory '" + name + "': mmap of " + std::to_string(obj->size) +
                                  " bytes failed: " + Errno(errno));
      }
      obj->base = p;
      if (opts.pin) {
        auto token = opts.pin(p, obj->size, writable, name);
        if (!token.ok()) return token.status();
        obj->pin = std::move(token).value();
      }
    }
    return obj;
  }
};

HostShmDomain::HostShmDomain(HostShmOptions opts) : impl_(std::make_unique<Impl>()) { impl_->opts = std::move(opts); }
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
  auto path = ResolveShmPath(ref.name);
  if (!path.ok()) return path.status().WithContext(what);

  struct stat st;
  if (::stat(path->c_str(), &st) != 0) {
    int e = errno;
    if (e == ENOENT) return NotFound(what + ": host memory '" + ref.name + "' does not exist");
    return FailedPrecondition(what + ": host memory '" + ref.name + "': stat: " + Errno(e));
  }
  const Key key{st.st_dev, st.st_ino};
  std::shared_ptr<ShmObject> obj;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    auto it = impl_->cache.find(key);
    if (it != impl_->cache.end()) {
      if (it->second->size == static_cast<uint64_t>(st.st_size)) {
        obj = it->second;
      } else {
        impl_->cache.erase(it);  // resized: remap; live Mappings keep the old one
      }
    }
  }
  if (!obj) {
    auto opened = impl_->Open(ref.name, *path);
    if (!opened.ok()) return opened.status().WithContext(what);
    obj = std::move(opened).value();
    std::lock_guard<std::mutex> lock(impl_->mu);
    // A re-created name leaves its old inode in the cache; drop entries for
    // the same path so a stale object is not kept mapped until Trim().
    for (auto it = impl_->cache.begin(); it != impl_->cache.end();) {
      if (it->second->path == obj->path && it->first != Key{obj->dev, obj->ino}) {
        it = impl_->cache.erase(it);
      } else {
        ++it;
      }
    }
    auto [it, inserted] = impl_->cache.emplace(Key{obj->dev, obj->ino}, obj);
    if (!inserted) {
      if (it->second->size == obj->size) {
        obj = it->second;  // another thread mapped it first; ours unmaps here
      } else {
        it->second = obj;
      }
    }
  }
  if (ref.offset > obj->size || ref.length > obj->size - ref.offset) {
    return OutOfRange(what + ": host memory '" + ref.name + "' offset " + std::to_string(ref.offset) + " + length " +
                      std::to_string(ref.length) + " exceeds the object size " + std::to_string(obj->size));
  }
  return std::shared_ptr<Mapping>(std::make_shared<HostMapping>(std::move(obj), ref.offset, ref.length));
}

void HostShmDomain::Trim() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (auto it = impl_->cache.begin(); it != impl_->cache.end();) {
    if (it->second.use_count() == 1) {
      it = impl_->cache.erase(it);
    } else {
      ++it;
    }
  }
}

void HostShmDomain::TrimStale() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (auto it = impl_->cache.begin(); it != impl_->cache.end();) {
    struct stat st;
    const ShmObject& o = *it->second;
    const bool gone = ::stat(o.path.c_str(), &st) != 0 || st.st_dev != o.dev || st.st_ino != o.ino;
    if (gone && it->second.use_count() == 1) {
      it = impl_->cache.erase(it);
    } else {
      ++it;
    }
  }
}

size_t HostShmDomain::cached_objects() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->cache.size();
}

std::unique_ptr<MemoryDomain> MakeHostShmDomain() { return std::make_unique<HostShmDomain>(); }

}  // namespace ws
