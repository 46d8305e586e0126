#include "daemon/mem/ipc_domain.h"

#include <cstdio>
#include <map>
#include <string>
#include <utility>

#include "daemon/core/thread_annotations.h"

namespace ws {
namespace {

std::string Hex8(const std::string& bytes) {
  std::string out;
  char buf[3];
  for (size_t i = 0; i < bytes.size() && i < 8; ++i) {
    std::snprintf(buf, sizeof(buf), "%02x", static_cast<unsigned char>(bytes[i]));
    out += buf;
  }
  return out;
}

std::string Describe(const MemoryRef& ref) {
  return "cuda_ipc{device=" + ref.device_uuid + " handle=" + Hex8(ref.cuda_handle) + "... offset=" +
         std::to_string(ref.offset) + " length=" + std::to_string(ref.length) + "}";
}

class IpcMapping final : public Mapping {
 public:
  IpcMapping(std::shared_ptr<IpcAllocation> a, uint64_t offset, uint64_t length)
      : a_(std::move(a)), offset_(offset), length_(length) {}
  void* data() const override { return a_->base() + offset_; }
  uint64_t size() const override { return length_; }
  MemoryKind kind() const override { return MemoryKind::kCudaIpc; }
  int device() const override { return a_->device(); }
  bool writable() const override { return true; }
  MemoryExtent extent() const override {
    const auto begin = reinterpret_cast<uint64_t>(a_->base()) + offset_;
    return MemoryExtent{MemoryKind::kCudaIpc, static_cast<uint64_t>(a_->device()), 0, begin, begin + length_};
  }

 private:
  std::shared_ptr<IpcAllocation> a_;
  uint64_t offset_, length_;
};

class IpcDomain final : public MemoryDomain {
 public:
  explicit IpcDomain(Platform& platform) : platform_(platform) {}

  DomainCaps caps() const override {
    DomainCaps c;
    c.cuda_ipc = true;
    return c;
  }

  using MemoryDomain::Map;
  Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string& what, const Accessor& by) override {
    if (ref.kind != MemoryKind::kCudaIpc) return InvalidArgument(what + ": not a CUDA IPC reference");
    if (!by.local) {
      return PermissionDenied(what + ": " + Describe(ref) +
                              ": CUDA IPC references need a local peer with known credentials (not " +
                              (by.who.empty() ? "uid " + std::to_string(by.uid) : by.who) + ")");
    }
    if (ref.cuda_handle.size() != platform_.IpcHandleBytes()) {
      return InvalidArgument(what + ": " + Describe(ref) + ": handle must be " +
                             std::to_string(platform_.IpcHandleBytes()) + " bytes (cudaIpcMemHandle_t), got " +
                             std::to_string(ref.cuda_handle.size()));
    }
    auto dev = platform_.DeviceByUuid(ref.device_uuid);
    if (!dev.ok()) return dev.status().WithContext(what);
    const std::string key = std::to_string(*dev) + ":" + ref.cuda_handle;

    MutexLock lock(&mu_);
    std::shared_ptr<IpcAllocation> a;
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      a = it->second;
    } else {
      auto opened = platform_.OpenIpc(ref.cuda_handle, *dev, what + ": " + Describe(ref));
      if (!opened.ok()) return opened.status();
      a = std::move(opened).value();
      cache_.emplace(key, a);
    }
    if (ref.offset > a->size() || ref.length > a->size() - ref.offset) {
      return OutOfRange(what + ": " + Describe(ref) + ": offset " + std::to_string(ref.offset) + " + length " +
                        std::to_string(ref.length) + " exceeds the allocation size " + std::to_string(a->size()));
    }
    return std::shared_ptr<Mapping>(std::make_shared<IpcMapping>(std::move(a), ref.offset, ref.length));
  }

  void Trim() override {
    MutexLock lock(&mu_);
    for (auto it = cache_.begin(); it != cache_.end();) {
      if (it->second.use_count() == 1) {
        it = cache_.erase(it);
      } else {
        ++it;
      }
    }
  }

 private:
  Platform& platform_;
  Mutex mu_;
  std::map<std::string, std::shared_ptr<IpcAllocation>> cache_ WS_GUARDED_BY(mu_);
};

}  // namespace

Result<std::unique_ptr<MemoryDomain>> MakeIpcDomain(Platform& platform) {
  WS_RETURN_IF_ERROR(platform.DeviceCount().status());
  return std::unique_ptr<MemoryDomain>(std::make_unique<IpcDomain>(platform));
}

}  // namespace ws
