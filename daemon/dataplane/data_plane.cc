#include "daemon/dataplane/data_plane.h"

#include <future>
#include <string>
#include <utility>
#include <vector>

#include "daemon/core/thread_annotations.h"
#include "daemon/mem/host_shm.h"
#include "daemon/mem/ipc_domain.h"

namespace ws {
namespace {

// Routes ops touching device memory to the CUDA executor (refused when there
// is none), the rest to the host pool; latches the CUDA executor's fatal
// error.
class DispatchExecutor final : public Executor {
 public:
  DispatchExecutor(std::unique_ptr<Executor> host, std::unique_ptr<Executor> gpu, Status no_gpu, Platform& platform,
                   std::function<void(const Status&)> on_fatal)
      : host_(std::move(host)),
        gpu_(std::move(gpu)),
        no_gpu_(std::move(no_gpu)),
        platform_(platform),
        on_fatal_(std::move(on_fatal)) {}

  int threads() const override { return host_->threads(); }

  Status health() const override {
    {
      MutexLock lock(&mu_);
      if (!fatal_.ok()) return fatal_;
    }
    if (!gpu_) return Status::Ok();
    Status h = gpu_->health();
    if (!h.ok()) Latch(h);
    return h;
  }

 protected:
  Result<uint64_t> RunValidated(const std::vector<kernels::CopyOp>& ops, const OpNamer& name) override {
    if (Status h = health(); !h.ok()) return h;
    std::vector<kernels::CopyOp> host_ops, gpu_ops;
    std::vector<size_t> host_index, gpu_index;  // position of each in `ops`, for names
    for (size_t i = 0; i < ops.size(); ++i) {
      const bool on_gpu = platform_.PointerDevice(ops[i].dst) >= 0 ||
                          (!ops[i].zero_fill && platform_.PointerDevice(ops[i].src) >= 0);
      if (on_gpu && !gpu_) {
        return FailedPrecondition(name(i) + ": the copy touches device memory, but " + no_gpu_.message());
      }
      (on_gpu ? gpu_ops : host_ops).push_back(ops[i]);
      (on_gpu ? gpu_index : host_index).push_back(i);
    }
    const OpNamer host_name = [&](size_t k) { return name(host_index[k]); };
    const OpNamer gpu_name = [&](size_t k) { return name(gpu_index[k]); };
    if (gpu_ops.empty()) return host_->RunNamed(host_ops, host_name);
    if (host_ops.empty()) return Checked(gpu_->RunNamed(gpu_ops, gpu_name));
    auto gpu = std::async(std::launch::async, [&] { return gpu_->RunNamed(gpu_ops, gpu_name); });
    auto host = host_->RunNamed(host_ops, host_name);
    auto dev = Checked(gpu.get());
    if (!dev.ok()) return dev.status();
    if (!host.ok()) return host.status();
    return *host + *dev;
  }

 private:
  Result<uint64_t> Checked(Result<uint64_t> r) const {
    if (!r.ok()) (void)health();  // a failed run may have broken the context
    return r;
  }

  void Latch(const Status& h) const {
    {
      MutexLock lock(&mu_);
      if (!fatal_.ok()) return;
      fatal_ = h;
    }
    if (on_fatal_) on_fatal_(h);
  }

  std::unique_ptr<Executor> host_;
  std::unique_ptr<Executor> gpu_;  // nullptr: no CUDA executor, see no_gpu_
  Status no_gpu_;
  Platform& platform_;
  std::function<void(const Status&)> on_fatal_;
  mutable Mutex mu_;
  mutable Status fatal_ WS_GUARDED_BY(mu_);  // the first fatal error, for good
};

}  // namespace

DataPlane MakeDataPlane(const DataPlaneOptions& opts, Platform& platform) {
  DataPlane dp;
  auto host = MakeHostExecutor(opts.executor);
  if (Status support = platform.DeviceSupport(); !support.ok()) {
    dp.cuda = support;
    dp.domain = MakeCompositeDomain(MakeHostShmDomain(), nullptr, dp.cuda);
    dp.executor = std::move(host);
    return dp;
  }
  // The executor first: CUDA references are accepted only if it runs.
  DeviceExecutorOptions dev;
  dev.pin_host = PinHostObject;
  auto gpu = opts.device_executor ? opts.device_executor(dev)
                                  : Result<std::unique_ptr<Executor>>(Internal("no device executor factory"));
  Result<std::unique_ptr<MemoryDomain>> dom = gpu.ok() ? MakeIpcDomain(platform)
                                                       : Result<std::unique_ptr<MemoryDomain>>(gpu.status());
  if (!gpu.ok()) {
    dp.cuda = FailedPrecondition("the CUDA executor could not start: " + gpu.status().message());
  } else if (!dom.ok()) {
    dp.cuda = FailedPrecondition("no usable CUDA device: " + dom.status().message());
  }
  if (!dp.cuda.ok()) {
    dp.domain = MakeCompositeDomain(MakeHostShmDomain(), nullptr, dp.cuda);
    dp.executor = std::make_unique<DispatchExecutor>(std::move(host), nullptr, dp.cuda, platform, opts.on_fatal);
    return dp;
  }
  HostShmOptions shm;
  // Host objects become readable by the copy kernels, pinned when a device
  // copy first needs them.
  shm.pin = [&platform](void* base, uint64_t size, bool writable, const std::string& name) {
    return platform.PinHostRange(base, size, writable, name);
  };
  shm.lazy_pin = true;
  dp.domain = MakeCompositeDomain(std::make_unique<HostShmDomain>(std::move(shm)), std::move(dom).value(), Status());
  dp.executor = std::make_unique<DispatchExecutor>(std::move(host), std::move(gpu).value(), Status(), platform,
                                                   opts.on_fatal);
  return dp;
}

std::unique_ptr<Executor> MakeExecutor(const ExecutorOptions& opts) {
  DataPlaneOptions o;
  o.executor = opts;
  return MakeDataPlane(o).executor;
}

std::unique_ptr<MemoryDomain> MakeMemoryDomain() {
  DataPlaneOptions o;
  o.executor.threads = 1;
  return MakeDataPlane(o).domain;
}

}  // namespace ws
