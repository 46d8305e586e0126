// MakeDeviceExecutor of builds without CUDA (chosen by the build files).
#include "daemon/dataplane/device_executor.h"

namespace ws {

Result<std::unique_ptr<Executor>> MakeDeviceExecutor(const DeviceExecutorOptions&) {
  return Unimplemented("this weightsync build has no CUDA support (built with WS_WITH_CUDA=OFF)");
}

}  // namespace ws
