// CUDA side of the data plane (library ws_cuda, built only with CUDA). This
// header is plain C++ (no CUDA headers) so ws_dataplane can call into it.
//
// Devices are always identified by UUID ("GPU-xxxxxxxx-xxxx-..."), never by
// ordinal: CUDA_VISIBLE_DEVICES differs between the trainer, the engine and
// the daemon.
//
// Thread-safety: everything here is thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "daemon/core/status.h"
#include "daemon/dataplane/executor.h"
#include "daemon/mem/memory.h"

namespace ws::cuda {

// Number of visible devices; FailedPrecondition (naming the CUDA error) when
// the runtime reports none or fails.
Result<int> DeviceCount();

// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" of a device ordinal.
Result<std::string> DeviceUuid(int ordinal);

// Ordinal of the visible device with this UUID ("GPU-" prefix and case are
// optional); NotFound when it is not visible to this process.
Result<int> DeviceByUuid(const std::string& uuid);

// The CUDA IPC memory domain. Handles are opened once per (device, handle)
// and cached; an opened allocation is closed when the cache (see Trim()) and
// every Mapping of it are gone. Offsets are validated against the
// allocation's size (cuMemGetAddressRange); references from an Accessor
// that is not `local` are refused. FailedPrecondition when no device is
// usable.
Result<std::unique_ptr<MemoryDomain>> MakeCudaIpcDomain();

// HostShmOptions::pin for host objects on a CUDA machine (the data plane
// sets lazy_pin, so only objects a device copy touches are pinned): registers
// the range (cudaHostRegister, mapped; read-only when the object is) so the
// copy kernels read it directly; unregistered when the token drops. Never fails:
// when registration is refused the object still maps (host-to-host copies
// need no pinning) and the CUDA executor quotes the recorded reason when an
// op reaches that memory.
Result<std::shared_ptr<void>> PinHostRange(void* base, uint64_t size, bool writable, const std::string& name);

// Device ordinal of memory at p, or -1 for host memory (pageable or pinned).
int PointerDevice(const void* p);

struct CudaExecutorOptions {
  // Same-dtype, non-transposed ops at least this large are issued as
  // cudaMemcpyAsync / cudaMemcpy2DAsync (copy engines) instead of through
  // the batched kernel.
  uint64_t memcpy_min_bytes = 1u << 20;
  // Called with each host address an op reads or writes before the op is
  // issued, to pin it on first use (PinHostObject of a lazy_pin host
  // domain). NotFound (not such an object) is ignored; other errors refuse
  // the op.
  std::function<Status(const void*)> pin_host;
};

// Runs ops whose destination (or source) is device memory: per destination
// device one stream, all kernel-path ops of a Run() as ONE batched launch,
// large plain pieces as async memcpys, completion by event. Host memory
// referenced by an op must be registered (PinHostRange) and mapped.
Result<std::unique_ptr<Executor>> MakeCudaExecutor(const CudaExecutorOptions& opts = {});

// Exporter side (tests, clients): the cudaIpcMemHandle_t (64 bytes) of the
// allocation holding dev_ptr, the owning device's UUID and dev_ptr's offset
// in that allocation. Memory from the VMM API (PyTorch's expandable
// segments) cannot be exported this way and is refused with instructions.
struct IpcExport {
  std::string handle;
  std::string device_uuid;
  uint64_t offset = 0;
  uint64_t allocation_size = 0;
};
Result<IpcExport> ExportIpcHandle(const void* dev_ptr);

}  // namespace ws::cuda
