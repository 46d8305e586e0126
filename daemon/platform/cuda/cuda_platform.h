// The CUDA platform (built only with CUDA): device queries, pinning host
// memory (cudaHostRegister) and CUDA IPC (cudaIpcGetMemHandle /
// cudaIpcOpenMemHandle), as the Platform interface and as plain functions
// for CUDA-only code (the CUDA executor, the NCCL transport, weightsyncctl's
// device buffers, GPU tests). Plain C++: no CUDA headers here.
//
// Thread-safety: everything here is thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "daemon/core/status.h"
#include "daemon/platform/platform.h"

namespace ws::cuda {

// The CUDA implementation of Platform. Never destroyed.
Platform& CudaPlatform();

// Number of visible devices; FailedPrecondition (naming the CUDA error) when
// the runtime reports none or fails.
Result<int> DeviceCount();

// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" of a device ordinal.
Result<std::string> DeviceUuid(int ordinal);

// Ordinal of the visible device with this UUID ("GPU-" prefix and case are
// optional); NotFound when it is not visible to this process.
Result<int> DeviceByUuid(const std::string& uuid);

// Platform::PinHostRange on a CUDA machine (the data plane pins host objects
// lazily, so only objects a device copy touches are pinned): registers the
// range (cudaHostRegister, mapped; read-only when the object is) so the copy
// kernels read it directly; unregistered when the token drops. Never fails:
// when registration is refused the object still maps (host-to-host copies
// need no pinning) and the CUDA executor quotes the recorded reason
// (PinFailureFor, cuda_util.h) when an op reaches that memory.
Result<std::shared_ptr<void>> PinHostRange(void* base, uint64_t size, bool writable, const std::string& name);

// Device ordinal of memory at p, or -1 for host memory (pageable or pinned).
int PointerDevice(const void* p);

// The cudaIpcMemHandle_t (64 bytes) of the allocation holding dev_ptr.
// Memory from the VMM API (PyTorch's expandable segments) cannot be exported
// this way and is refused with instructions.
Result<IpcExport> ExportIpcHandle(const void* dev_ptr);

// Opens a cudaIpcMemHandle_t on device ordinal `device` (once per handle in
// a process: a second open of the same handle fails). `what` names the
// reference in errors.
Result<std::unique_ptr<IpcAllocation>> OpenIpcHandle(const std::string& handle, int device, const std::string& what);

}  // namespace ws::cuda
