// The executor for copy ops that touch device memory. This build's comes
// from its build files: the CUDA executor (daemon/dataplane/cuda/) in builds
// with CUDA, otherwise one that never starts (no_device_executor.cc).
//
// Thread-safety: see executor.h.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "daemon/core/status.h"
#include "daemon/dataplane/executor.h"

namespace ws {

struct DeviceExecutorOptions {
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
// referenced by an op must be pinned (Platform::PinHostRange) and mapped.
// FailedPrecondition when no device is usable; Unimplemented in builds
// without CUDA.
Result<std::unique_ptr<Executor>> MakeDeviceExecutor(const DeviceExecutorOptions& opts = {});

}  // namespace ws
