#include "client/cpp/shm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <utility>

namespace ws {

Result<ShmObject> ShmObject::Create(const std::string& name, uint64_t bytes) {
  if (name.size() < 2 || name[0] != '/' || name.find('/', 1) != std::string::npos)
    return InvalidArgument("shm name \"" + name + "\" must be \"/\" followed by a name without slashes");
  UniqueFd fd(::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd.valid()) {
    int e = errno;
    std::string m = "shm_open " + name + ": " + std::strerror(e);
    return e == EEXIST ? AlreadyExists(m) : Internal(m);
  }
  const uint64_t mapped = bytes == 0 ? 1 : bytes;
  auto fail = [&](const char* what) {
    std::string m = std::string(what) + " " + name + " (" + std::to_string(mapped) + " bytes): " + std::strerror(errno);
    ::shm_unlink(name.c_str());
    return Internal(m);
  };
  if (::ftruncate(fd.get(), static_cast<off_t>(mapped)) != 0) return fail("ftruncate");
  int rc = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(mapped));
  if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
    errno = rc;
    return fail("cannot allocate shared memory");
  }
  void* p = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return fail("mmap");
  ShmObject o;
  o.name_ = name;
  o.map_ = UniqueMapping(p, mapped);
  o.size_ = bytes;
  return o;
}

std::string ShmObject::UniqueName(const std::string& tag) {
  static std::atomic<uint64_t> counter{0};
  return "/ws-" + std::to_string(::getpid()) + "-" + tag + "-" + std::to_string(counter.fetch_add(1));
}

ShmObject::ShmObject(ShmObject&& o) noexcept { *this = std::move(o); }

ShmObject& ShmObject::operator=(ShmObject&& o) noexcept {
  if (this != &o) {
    Reset();
    name_ = std::move(o.name_);
    map_ = std::move(o.map_);
    size_ = std::exchange(o.size_, 0);
    o.name_.clear();
  }
  return *this;
}

ShmObject::~ShmObject() { Reset(); }

void ShmObject::Reset() {
  if (map_.valid()) {
    map_.Unmap();
    ::shm_unlink(name_.c_str());
  }
  size_ = 0;
  name_.clear();
}

}  // namespace ws
