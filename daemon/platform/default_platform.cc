// The platform factory: the one place that knows whether this build has CUDA.
#include "daemon/platform/platform.h"

#if WS_WITH_CUDA
#include "daemon/platform/cuda/cuda_platform.h"
#endif

namespace ws {

Platform& DefaultPlatform() {
#if WS_WITH_CUDA
  return cuda::CudaPlatform();
#else
  return HostPlatform();
#endif
}

}  // namespace ws
