// The host platform: plain host memory, no devices. Every device call
// refuses, naming the build.
#include <memory>
#include <string>

#include "daemon/platform/platform.h"

namespace ws {
namespace {

class HostOnlyPlatform final : public Platform {
 public:
  const char* name() const override { return "host"; }
  Status DeviceSupport() const override { return NoDevices(); }

  Result<int> DeviceCount() override { return NoDevices(); }
  Result<std::string> DeviceUuid(int) override { return NoDevices(); }
  Result<int> DeviceByUuid(const std::string&) override { return NoDevices(); }
  int PointerDevice(const void*) override { return -1; }

  // Host memory needs no pinning for host copies.
  Result<std::shared_ptr<void>> PinHostRange(void* base, uint64_t, bool, const std::string&) override {
    return std::shared_ptr<void>(base, [](void*) {});
  }

  size_t IpcHandleBytes() const override { return 0; }
  Result<IpcExport> ExportIpc(const void*) override { return NoDevices(); }
  Result<std::unique_ptr<IpcAllocation>> OpenIpc(const std::string&, int, const std::string& what) override {
    return NoDevices().WithContext(what);
  }

 private:
  static Status NoDevices() {
    return Unimplemented("this weightsync build has no CUDA support (built with WS_WITH_CUDA=OFF)");
  }
};

}  // namespace

Platform& HostPlatform() {
  static HostOnlyPlatform* p = new HostOnlyPlatform();
  return *p;
}

}  // namespace ws
