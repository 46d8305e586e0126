// The daemon's data plane: one memory domain and one executor built together,
// so they agree on CUDA. CUDA references are accepted only when a CUDA
// executor exists to run the copies; when the executor cannot start (no
// context, exclusive mode, a GPU older than every architecture built), the
// domain refuses CUDA references naming that failure and the executor refuses
// any op that still reaches device memory, instead of dereferencing device
// pointers on the CPU.
//
// Device queries, pinning and IPC come from a Platform (daemon/platform/),
// the device executor from DataPlaneOptions::device_executor (this build's
// MakeDeviceExecutor by default), so host-only builds test how the pieces
// are put together with fakes.
//
// Sticky CUDA errors (illegal or misaligned address, launch failure, ...)
// leave the CUDA context unusable until the process exits: once the CUDA
// executor reports one (Executor::health()), the data plane's executor
// refuses every later Run with that error and calls
// DataPlaneOptions::on_fatal once, so the daemon can stop serving and exit
// for its supervisor to restart it.
//
// Thread-safety: the executor and domain are thread-safe (see executor.h,
// memory.h); on_fatal is called at most once, from a copying thread.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "daemon/core/status.h"
#include "daemon/dataplane/device_executor.h"
#include "daemon/dataplane/executor.h"
#include "daemon/mem/memory.h"
#include "daemon/platform/platform.h"

namespace ws {

struct DataPlaneOptions {
  ExecutorOptions executor;
  // Called once, with the error, when the CUDA executor becomes unusable.
  std::function<void(const Status&)> on_fatal;
  // Makes the executor for ops touching device memory (tests inject fakes).
  std::function<Result<std::unique_ptr<Executor>>(const DeviceExecutorOptions&)> device_executor = MakeDeviceExecutor;
};

struct DataPlane {
  std::unique_ptr<MemoryDomain> domain;
  std::unique_ptr<Executor> executor;
  // Ok when CUDA references are accepted; otherwise why not (also the text
  // of every refusal).
  Status cuda;
};

// `platform` must outlive the data plane; its DeviceSupport() decides
// whether device memory is served at all.
DataPlane MakeDataPlane(const DataPlaneOptions& opts, Platform& platform);
inline DataPlane MakeDataPlane(const DataPlaneOptions& opts) { return MakeDataPlane(opts, DefaultPlatform()); }

}  // namespace ws
