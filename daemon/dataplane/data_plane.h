// The daemon's data plane: one memory domain and one executor built together,
// so they agree on CUDA. CUDA references are accepted only when a CUDA
// executor exists to run the copies; when the executor cannot start (no
// context, exclusive mode, a GPU older than every architecture built), the
// domain refuses CUDA references naming that failure and the executor refuses
// any op that still reaches device memory, instead of dereferencing device
// pointers on the CPU.
//
// The CUDA side sits behind CudaPlatform (cf. LevelDB's Env), so host-only
// builds test how the pieces are put together with a fake.
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
#include "daemon/dataplane/executor.h"
#include "daemon/mem/host_shm.h"
#include "daemon/mem/memory.h"

namespace ws {

// The few CUDA calls the data plane's assembly needs.
class CudaPlatform {
 public:
  virtual ~CudaPlatform() = default;
  // The CUDA IPC memory domain (FailedPrecondition when no device is usable).
  virtual Result<std::unique_ptr<MemoryDomain>> MakeDomain() = 0;
  // The executor for ops touching device memory.
  virtual Result<std::unique_ptr<Executor>> MakeExecutor() = 0;
  // Device ordinal of the memory at p, or -1 for host memory.
  virtual int PointerDevice(const void* p) = 0;
  // HostShmOptions::pin for host objects the device copies may read.
  virtual decltype(HostShmOptions::pin) Pin() = 0;
};

// This build's platform: nullptr without CUDA (WS_WITH_CUDA=OFF).
CudaPlatform* DefaultCudaPlatform();

struct DataPlaneOptions {
  ExecutorOptions executor;
  // Called once, with the error, when the CUDA executor becomes unusable.
  std::function<void(const Status&)> on_fatal;
};

struct DataPlane {
  std::unique_ptr<MemoryDomain> domain;
  std::unique_ptr<Executor> executor;
  // Ok when CUDA references are accepted; otherwise why not (also the text
  // of every refusal).
  Status cuda;
};

// `cuda` may be nullptr (no CUDA in this build).
DataPlane MakeDataPlane(const DataPlaneOptions& opts, CudaPlatform* cuda);
inline DataPlane MakeDataPlane(const DataPlaneOptions& opts) { return MakeDataPlane(opts, DefaultCudaPlatform()); }

}  // namespace ws
