#include "daemon/sync/device_staging.h"

#include <utility>

namespace ws::server {
namespace {

class DeviceBuffer final : public Mapping {
 public:
  DeviceBuffer(std::shared_ptr<void> mem, uint64_t bytes, int device)
      : mem_(std::move(mem)), size_(bytes), device_(device) {}
  void* data() const override { return mem_.get(); }
  uint64_t size() const override { return size_; }
  MemoryKind kind() const override { return MemoryKind::kCudaIpc; }
  int device() const override { return device_; }
  MemoryExtent extent() const override {
    MemoryExtent e;
    e.kind = MemoryKind::kCudaIpc;
    e.object_a = static_cast<uint64_t>(device_);
    e.begin = reinterpret_cast<uintptr_t>(mem_.get());
    e.end = e.begin + size_;
    return e;
  }

 private:
  const std::shared_ptr<void> mem_;
  const uint64_t size_;
  const int device_;
};

class PlatformDeviceStaging final : public DeviceStaging {
 public:
  explicit PlatformDeviceStaging(Platform* p) : p_(p) {}
  Result<std::string> DeviceUuid(int ordinal) override { return p_->DeviceUuid(ordinal); }
  Result<std::shared_ptr<Mapping>> Allocate(const std::string& device_uuid, uint64_t bytes) override {
    WS_ASSIGN_OR_RETURN(int dev, p_->DeviceByUuid(device_uuid));
    WS_ASSIGN_OR_RETURN(std::shared_ptr<void> mem, p_->AllocDevice(dev, bytes, "chunk staging buffer"));
    return std::shared_ptr<Mapping>(std::make_shared<DeviceBuffer>(std::move(mem), bytes, dev));
  }

 private:
  Platform* const p_;
};

}  // namespace

std::unique_ptr<DeviceStaging> MakePlatformDeviceStaging(Platform* platform) {
  return std::make_unique<PlatformDeviceStaging>(platform);
}

}  // namespace ws::server
