// Fault injection by wrapping the real parts (as LevelDB's EnvWrapper and
// fault-injection Env): every call goes to the wrapped executor or memory
// domain unless a fault is armed, so tests run the real host executor over
// the real host shm domain and still reach the error paths.
//
//  - FaultInjectingExecutor: counts runs; holds a Run() inside until
//    released (to act while a copy is in flight); fails the Nth run or every
//    run whose ops match a predicate.
//  - FaultInjectingMemoryDomain: counts Map/Trim calls; fails Map() of a
//    named object; returns a mapping shorter than asked for (a broken domain).
//  - FakeClock: a Clock that moves only when the test advances it.
//  - ShmDir: a private directory of real shm files (on /dev/shm's tmpfs) for a
//    HostShmDomain, so parallel test processes never share object names.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "daemon/core/clock.h"
#include "daemon/core/posix_handles.h"
#include "daemon/dataplane/executor.h"
#include "daemon/mem/host_shm.h"
#include "daemon/mem/memory.h"

namespace ws::testing {

class FaultInjectingExecutor final : public Executor {
 public:
  explicit FaultInjectingExecutor(std::unique_ptr<Executor> real) : real_(std::move(real)) {}

  int threads() const override { return real_->threads(); }
  Status health() const override { return real_->health(); }

  // Blocks every Run() (before it copies anything) until Release().
  void Hold() {
    std::lock_guard lk(mu_);
    hold_ = true;
  }
  void Release() {
    std::lock_guard lk(mu_);
    hold_ = false;
    cv_.notify_all();
  }
  // Waits until a Run() is held inside (Hold() first); false after 10 s.
  bool WaitInRun() {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, std::chrono::seconds(10), [&] { return in_run_ > 0; });
  }
  // Run number n (1-based, counted from construction) fails with `st`
  // without copying; n = 0: every run from now on.
  void FailRun(int n, Status st) {
    std::lock_guard lk(mu_);
    fail_run_ = n;
    fail_ = std::move(st);
  }
  void FailWith(Status st) { FailRun(0, std::move(st)); }
  // Every run with an op whose label satisfies `pred` fails with `st`.
  void FailOpsMatching(std::function<bool(const std::string& label)> pred, Status st) {
    std::lock_guard lk(mu_);
    fail_pred_ = std::move(pred);
    fail_pred_status_ = std::move(st);
  }
  int runs() const {
    std::lock_guard lk(mu_);
    return runs_;
  }

 protected:
  Result<uint64_t> RunValidated(const std::vector<kernels::CopyOp>& ops, const OpNamer& name) override {
    {
      std::unique_lock lk(mu_);
      const int n = ++runs_;
      ++in_run_;
      cv_.notify_all();
      cv_.wait(lk, [&] { return !hold_; });
      --in_run_;
      if (!fail_.ok() && (fail_run_ == 0 || fail_run_ == n)) return fail_;
      if (fail_pred_)
        for (size_t i = 0; i < ops.size(); ++i)
          if (fail_pred_(OpName(name, i))) return fail_pred_status_;
    }
    return real_->RunNamed(ops, name);
  }

 private:
  std::unique_ptr<Executor> real_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool hold_ = false;
  int in_run_ = 0;
  int runs_ = 0;
  int fail_run_ = 0;
  Status fail_;
  std::function<bool(const std::string&)> fail_pred_;
  Status fail_pred_status_;
};

class FaultInjectingMemoryDomain final : public MemoryDomain {
 public:
  explicit FaultInjectingMemoryDomain(std::unique_ptr<MemoryDomain> real) : real_(std::move(real)) {}

  DomainCaps caps() const override { return real_->caps(); }
  using MemoryDomain::Map;
  Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string& what, const Accessor& by) override {
    {
      std::lock_guard lk(mu_);
      ++map_calls_;
      if (auto it = fail_map_.find(ref.name); it != fail_map_.end()) return it->second.WithContext(what);
    }
    WS_ASSIGN_OR_RETURN(auto m, real_->Map(ref, what, by));
    std::lock_guard lk(mu_);
    if (auto it = short_by_.find(ref.name); it != short_by_.end() && it->second <= m->size())
      return std::shared_ptr<Mapping>(std::make_shared<ShortMapping>(std::move(m), it->second));
    if (as_device_ >= 0) return std::shared_ptr<Mapping>(std::make_shared<DeviceLabeled>(std::move(m), as_device_));
    return m;
  }
  void Trim() override {
    count(&trims_);
    real_->Trim();
  }
  void TrimStale() override { real_->TrimStale(); }
  void TrimCuda() override {
    count(&cuda_trims_);
    real_->TrimCuda();
  }

  // Map() of the object `name` (as in MemoryRef::name) fails with `st`.
  void FailMap(const std::string& name, Status st) {
    std::lock_guard lk(mu_);
    fail_map_[name] = std::move(st);
  }
  // Mappings of `name` come back `bytes` shorter than the reference asked for.
  void ShortenMap(const std::string& name, uint64_t bytes) {
    std::lock_guard lk(mu_);
    short_by_[name] = bytes;
  }
  // Mappings made from now on say they are CUDA memory of device ordinal
  // `device` (their bytes stay host memory, so the host executor still
  // copies them): the device paths of the coordinator on a CPU machine.
  void PresentAsDevice(int device) {
    std::lock_guard lk(mu_);
    as_device_ = device;
  }
  int map_calls() const { return get(map_calls_); }
  int trims() const { return get(trims_); }
  int cuda_trims() const { return get(cuda_trims_); }

 private:
  class ShortMapping final : public Mapping {
   public:
    ShortMapping(std::shared_ptr<Mapping> m, uint64_t by) : m_(std::move(m)), by_(by) {}
    void* data() const override { return m_->data(); }
    uint64_t size() const override { return m_->size() - by_; }
    MemoryKind kind() const override { return m_->kind(); }
    int device() const override { return m_->device(); }
    bool writable() const override { return m_->writable(); }
    Status Reserve() const override { return m_->Reserve(); }
    const void* object() const override { return m_->object(); }
    MemoryExtent extent() const override {
      MemoryExtent e = m_->extent();
      e.end -= by_;
      return e;
    }

   private:
    std::shared_ptr<Mapping> m_;
    uint64_t by_;
  };
  class DeviceLabeled final : public Mapping {
   public:
    DeviceLabeled(std::shared_ptr<Mapping> m, int device) : m_(std::move(m)), device_(device) {}
    void* data() const override { return m_->data(); }
    uint64_t size() const override { return m_->size(); }
    MemoryKind kind() const override { return MemoryKind::kCudaIpc; }
    int device() const override { return device_; }
    bool writable() const override { return m_->writable(); }
    Status CheckBacked() const override { return m_->CheckBacked(); }
    Status Reserve() const override { return m_->Reserve(); }
    const void* object() const override { return m_->object(); }
    MemoryExtent extent() const override { return m_->extent(); }

   private:
    std::shared_ptr<Mapping> m_;
    int device_;
  };
  void count(int* n) {
    std::lock_guard lk(mu_);
    ++*n;
  }
  int get(const int& n) const {
    std::lock_guard lk(mu_);
    return n;
  }

  std::unique_ptr<MemoryDomain> real_;
  mutable std::mutex mu_;
  std::map<std::string, Status> fail_map_;
  std::map<std::string, uint64_t> short_by_;
  int as_device_ = -1;
  int map_calls_ = 0;
  int trims_ = 0;
  int cuda_trims_ = 0;
};

class FakeClock final : public Clock {
 public:
  TimePoint Now() const override {
    std::lock_guard lk(mu_);
    return now_;
  }
  void Advance(std::chrono::nanoseconds d) {
    std::lock_guard lk(mu_);
    now_ += d;
  }

 private:
  mutable std::mutex mu_;
  TimePoint now_{std::chrono::hours(1)};
};

// Real files in a private directory on /dev/shm (removed with the ShmDir),
// for a HostShmDomain with HostShmOptions::dir = path(): the reference name
// "/x" names path()/x. The directory is "ws-test-<pid>-XXXXXX": a process
// that dies without destructors (the child of a "threadsafe" death test
// re-runs the fixture and aborts) leaves its directory behind, and the next
// ShmDir (made or destroyed) removes those of processes that no longer exist.
class ShmDir {
 public:
  ShmDir() {
    RemoveStale();
    std::string tmpl = "/dev/shm/ws-test-" + std::to_string(::getpid()) + "-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp " + tmpl + ": " + std::strerror(errno));
    path_ = tmpl;
  }
  ~ShmDir() {
    objects_.clear();
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
    RemoveStale();  // a death test's child has exited by now
  }
  ShmDir(const ShmDir&) = delete;
  ShmDir& operator=(const ShmDir&) = delete;

  const std::string& path() const { return path_; }

  // Removes /dev/shm/ws-test-<pid>-* directories whose process is gone.
  static void RemoveStale() {
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator("/dev/shm", ec)) {
      const std::string name = e.path().filename().string();
      if (name.rfind("ws-test-", 0) != 0) continue;
      const size_t dash = name.find('-', 8);
      if (dash == std::string::npos) continue;
      const long pid = std::strtol(name.substr(8, dash - 8).c_str(), nullptr, 10);
      std::error_code rm;
      if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) std::filesystem::remove_all(e.path(), rm);
    }
  }

  // A zero-filled object "/name" of `size` bytes, mapped here read-write
  // (mode 0600, or 0400 when !writable: the domain then maps it read-only).
  // Replaces an object of that name (a new inode).
  uint8_t* Add(const std::string& name, size_t size, bool writable = true) {
    const std::string file = path_ + name;
    std::lock_guard lk(mu_);
    objects_.erase(name);
    ::unlink(file.c_str());
    UniqueFd fd(::open(file.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, writable ? 0600 : 0400));
    if (!fd.valid() || ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
      throw std::runtime_error("create " + file + ": " + std::strerror(errno));
    Object& o = objects_[name];
    o.size = size;
    if (size > 0) {
      void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
      if (p == MAP_FAILED) throw std::runtime_error("mmap " + file + ": " + std::strerror(errno));
      o.map = UniqueMapping(p, size);
    }
    return static_cast<uint8_t*>(o.map.get());
  }
  // Add(name, bytes.size()) holding `bytes`.
  void Add(const std::string& name, const std::vector<uint8_t>& bytes, bool writable = true) {
    uint8_t* p = Add(name, bytes.size(), writable);
    if (!bytes.empty()) std::memcpy(p, bytes.data(), bytes.size());
  }
  // The object's bytes as they are now.
  std::vector<uint8_t> Bytes(const std::string& name) const {
    std::lock_guard lk(mu_);
    const Object& o = objects_.at(name);
    const uint8_t* p = static_cast<const uint8_t*>(o.map.get());
    return std::vector<uint8_t>(p, p + o.size);
  }
  // Gives the object to `uid` (the test runs as root for the ownership tests).
  void Chown(const std::string& name, uid_t uid) const {
    const std::string file = path_ + name;
    if (::chown(file.c_str(), uid, static_cast<gid_t>(-1)) != 0)
      throw std::runtime_error("chown " + file + ": " + std::strerror(errno));
  }
  uint8_t* Data(const std::string& name) const {
    std::lock_guard lk(mu_);
    return static_cast<uint8_t*>(objects_.at(name).map.get());
  }

 private:
  struct Object {
    UniqueMapping map;
    size_t size = 0;
  };
  std::string path_;
  mutable std::mutex mu_;
  std::map<std::string, Object> objects_;
};

// The real host shm domain over `dir`, wrapped.
inline std::unique_ptr<FaultInjectingMemoryDomain> WrappedHostDomain(const ShmDir& dir) {
  HostShmOptions o;
  o.dir = dir.path();
  return std::make_unique<FaultInjectingMemoryDomain>(std::make_unique<HostShmDomain>(o));
}

// The real host executor, wrapped.
inline std::unique_ptr<FaultInjectingExecutor> WrappedHostExecutor(int threads = 2) {
  return std::make_unique<FaultInjectingExecutor>(MakeHostExecutor(ExecutorOptions{threads, 1 << 12}));
}

}  // namespace ws::testing
