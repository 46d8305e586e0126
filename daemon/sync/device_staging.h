// Device staging of chunks across nodes: the buffers a source node packs a
// window into on its GPU and a destination node receives it into on its GPU
// (the NCCL path of syncs across nodes, docs/architecture.md), seen as
// Mappings so the executor's bound ops (BindPack, BindScatter) read and
// write them like any engine buffer. The daemon's implementation allocates
// through the platform (MakePlatformDeviceStaging); CPU tests substitute
// host memory that says it is device memory.
//
// Thread-safety: every method may be called from any thread; a buffer is
// immutable after construction (the bytes are the users').
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "daemon/core/status.h"
#include "daemon/mem/memory.h"
#include "daemon/platform/platform.h"

namespace ws::server {

class DeviceStaging {
 public:
  virtual ~DeviceStaging() = default;
  // The UUID of the device a mapping lives on (Mapping::device()).
  virtual Result<std::string> DeviceUuid(int ordinal) = 0;
  // A buffer of `bytes` on the device with this UUID (kind cuda_ipc).
  virtual Result<std::shared_ptr<Mapping>> Allocate(const std::string& device_uuid, uint64_t bytes) = 0;
};

// Over `platform` (must outlive it): cudaMalloc'd buffers in CUDA builds.
std::unique_ptr<DeviceStaging> MakePlatformDeviceStaging(Platform* platform);

}  // namespace ws::server
