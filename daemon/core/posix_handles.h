// RAII guards for POSIX handles, shared by the daemon and the clients:
// UniqueFd closes a file descriptor, UniqueMapping unmaps an mmap()ed range.
// Both are move-only; a moved-from guard owns nothing.
//
// Close() / Unmap() release early and return the system call's result (0, or
// -1 with errno set) for callers that report those errors; the destructor
// ignores them.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <utility>

namespace ws {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { (void)Close(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      (void)Close();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Gives up ownership without closing.
  int release() { return std::exchange(fd_, -1); }
  // Closes now (no-op returning 0 when empty).
  int Close() {
    if (fd_ < 0) return 0;
    return ::close(std::exchange(fd_, -1));
  }

 private:
  int fd_ = -1;
};

class UniqueMapping {
 public:
  UniqueMapping() = default;
  // Takes a successful mmap() result (not MAP_FAILED) of `size` bytes.
  UniqueMapping(void* addr, size_t size) : addr_(addr), size_(size) {}
  ~UniqueMapping() { (void)Unmap(); }
  UniqueMapping(UniqueMapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  UniqueMapping& operator=(UniqueMapping&& o) noexcept {
    if (this != &o) {
      (void)Unmap();
      addr_ = std::exchange(o.addr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  UniqueMapping(const UniqueMapping&) = delete;
  UniqueMapping& operator=(const UniqueMapping&) = delete;

  void* get() const { return addr_; }
  size_t size() const { return size_; }
  bool valid() const { return addr_ != nullptr; }
  // Gives up ownership without unmapping.
  void* release() {
    size_ = 0;
    return std::exchange(addr_, nullptr);
  }
  // Unmaps now (no-op returning 0 when empty).
  int Unmap() {
    if (addr_ == nullptr) return 0;
    const size_t n = std::exchange(size_, 0);
    return ::munmap(std::exchange(addr_, nullptr), n);
  }

 private:
  void* addr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace ws
