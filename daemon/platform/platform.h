// The platform seam (cf. LevelDB's Env): what the daemon asks of the machine
// beyond plain host memory, behind one interface: device queries, pinning
// host memory for device access, and exporting / opening device memory
// across processes (IPC). Two implementations: the host platform (no
// devices; every device call refuses, naming the build) and the CUDA
// platform (daemon/platform/cuda/). DefaultPlatform() picks this build's.
//
// Devices are identified by UUID ("GPU-xxxxxxxx-xxxx-..."), never by ordinal
// across processes: CUDA_VISIBLE_DEVICES differs between the trainer, the
// engine and the daemon.
//
// Thread-safety: every method is thread-safe; a Platform lives for the
// whole process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "daemon/core/status.h"

namespace ws {

// Device memory of another process opened from its IPC handle; closed when
// this object goes.
class IpcAllocation {
 public:
  IpcAllocation() = default;
  IpcAllocation(const IpcAllocation&) = delete;
  IpcAllocation& operator=(const IpcAllocation&) = delete;
  virtual ~IpcAllocation() = default;

  virtual int device() const = 0;     // ordinal in this process
  virtual char* base() const = 0;     // the allocation's start
  virtual uint64_t size() const = 0;  // the allocation's size in bytes
};

// Exporter side (clients, tests): the handle of the allocation holding a
// device pointer, the owning device's UUID and the pointer's offset in that
// allocation.
struct IpcExport {
  std::string handle;
  std::string device_uuid;
  uint64_t offset = 0;
  uint64_t allocation_size = 0;
};

class Platform {
 public:
  virtual ~Platform() = default;

  virtual const char* name() const = 0;  // "host", "cuda"
  // Ok when this build can serve device memory at all; otherwise why not
  // (the host platform: Unimplemented naming the build). Devices may still
  // be absent: see DeviceCount().
  virtual Status DeviceSupport() const = 0;

  // ---- device queries
  // Number of visible devices; FailedPrecondition naming the cause when
  // there is none.
  virtual Result<int> DeviceCount() = 0;
  // "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" of a device ordinal.
  virtual Result<std::string> DeviceUuid(int ordinal) = 0;
  // Ordinal of the visible device with this UUID ("GPU-" prefix and case
  // optional); NotFound when it is not visible to this process.
  virtual Result<int> DeviceByUuid(const std::string& uuid) = 0;
  // Device ordinal of the memory at p, or -1 for host memory.
  virtual int PointerDevice(const void* p) = 0;

  // ---- host pinning
  // Makes [base, base + size) of a host object readable (and, when
  // `writable`, writable) by device copies until the returned token drops.
  // `name` names the object in errors.
  virtual Result<std::shared_ptr<void>> PinHostRange(void* base, uint64_t size, bool writable,
                                                     const std::string& name) = 0;

  // ---- IPC export / open
  // Size of an IPC handle in bytes (0: no IPC on this platform).
  virtual size_t IpcHandleBytes() const = 0;
  // The handle of the allocation holding dev_ptr.
  virtual Result<IpcExport> ExportIpc(const void* dev_ptr) = 0;
  // Opens `handle` (IpcHandleBytes() long) on device ordinal `device`.
  // `what` names the reference in errors.
  virtual Result<std::unique_ptr<IpcAllocation>> OpenIpc(const std::string& handle, int device,
                                                         const std::string& what) = 0;

  // ---- the daemon's own device memory
  // `bytes` of memory on device ordinal `device` (the staging buffers of
  // chunks sent between nodes' GPUs), freed when the last copy of the
  // returned pointer drops. `what` names the buffer in errors. Platforms
  // without devices refuse.
  virtual Result<std::shared_ptr<void>> AllocDevice(int device, uint64_t bytes, const std::string& what) {
    (void)device;
    (void)bytes;
    return Unimplemented(what + ": the " + std::string(name()) + " platform allocates no device memory");
  }
};

// The host platform: no devices.
Platform& HostPlatform();

// This build's platform: the CUDA platform when built with CUDA, otherwise
// the host platform. Never destroyed.
Platform& DefaultPlatform();

}  // namespace ws
