#include "daemon/transport/transport.h"

#if WS_WITH_CUDA
#include "daemon/platform/cuda/cuda_platform.h"
#endif

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
  bool cuda = false;
#if WS_WITH_CUDA
  cuda = cuda::DeviceCount().ok();
#endif
  return std::make_unique<LocalTransport>(std::shared_ptr<Executor>(MakeExecutor(opts)), cuda);
}

}  // namespace ws
