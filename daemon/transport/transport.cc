#include "daemon/transport/transport.h"

#include "daemon/platform/platform.h"

namespace ws {

TransportCaps LocalTransport::caps() const {
  TransportCaps c;
  c.host_memory = true;
  c.cuda_memory = cuda_memory_;
  c.cross_node = false;
  c.zero_copy = true;
  return c;
}

std::unique_ptr<LocalTransport> MakeLocalTransport(const ExecutorOptions& opts) {
  const bool cuda = DefaultPlatform().DeviceCount().ok();
  return std::make_unique<LocalTransport>(std::shared_ptr<Executor>(MakeExecutor(opts)), cuda);
}

}  // namespace ws
