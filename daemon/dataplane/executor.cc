#include "daemon/dataplane/executor.h"

#include <future>
#include <utility>

#if WS_WITH_CUDA
#include "daemon/mem/cuda/cuda_domain.h"
#endif

namespace ws {

Status ValidateCopyOp(const kernels::CopyOp& op, const std::string& what) {
  auto bad = [&](const std::string& m) { return InvalidArgument(what + ": invalid copy op: " + m); };
  if (op.rows < 0 || op.cols < 0) {
    return bad("negative shape " + std::to_string(op.rows) + "x" + std::to_string(op.cols));
  }
  if (op.src_dtype > kernels::kF16 || op.dst_dtype > kernels::kF16) {
    return bad("unknown dtype code " + std::to_string(op.src_dtype) + " -> " + std::to_string(op.dst_dtype));
  }
  if (op.rows == 0 || op.cols == 0) return Status::Ok();
  if (op.dst == nullptr) return bad("null destination");
  if (!op.zero_fill && op.src == nullptr) return bad("null source");
  if (op.src_offset < 0 || op.dst_offset < 0 || op.src_ld < 0 || op.dst_ld < 0) return bad("negative offset or stride");
  if (op.rows > 1 && op.dst_ld < op.cols) {
    return bad("destination stride " + std::to_string(op.dst_ld) + " < cols " + std::to_string(op.cols) +
               " (rows would overlap)");
  }
  return Status::Ok();
}

void RunOpReference(const kernels::CopyOp& op) {
  const int64_t n = op.rows * op.cols;
  for (int64_t k = 0; k < n; ++k) kernels::RunElement(op, k);
}

namespace {

#if WS_WITH_CUDA
// Routes ops touching device memory to the CUDA executor, the rest to the host pool.
class DispatchExecutor final : public Executor {
 public:
  DispatchExecutor(std::unique_ptr<Executor> host, std::unique_ptr<Executor> gpu)
      : host_(std::move(host)), gpu_(std::move(gpu)) {}

  Result<uint64_t> Run(const std::vector<kernels::CopyOp>& ops) override { return RunLabeled(ops, {}); }

  Result<uint64_t> RunLabeled(const std::vector<kernels::CopyOp>& ops, const std::vector<std::string>& labels) override {
    std::vector<kernels::CopyOp> host_ops, gpu_ops;
    std::vector<std::string> host_labels, gpu_labels;
    for (size_t i = 0; i < ops.size(); ++i) {
      const std::string label = i < labels.size() ? labels[i] : std::string();
      WS_RETURN_IF_ERROR(ValidateCopyOp(ops[i], label.empty() ? "copy op " + std::to_string(i) : label));
      const bool on_gpu = cuda::PointerDevice(ops[i].dst) >= 0 ||
                          (!ops[i].zero_fill && cuda::PointerDevice(ops[i].src) >= 0);
      (on_gpu ? gpu_ops : host_ops).push_back(ops[i]);
      (on_gpu ? gpu_labels : host_labels).push_back(label);
    }
    if (gpu_ops.empty()) return host_->RunLabeled(host_ops, host_labels);
    if (host_ops.empty()) return gpu_->RunLabeled(gpu_ops, gpu_labels);
    auto gpu = std::async(std::launch::async, [&] { return gpu_->RunLabeled(gpu_ops, gpu_labels); });
    auto host = host_->RunLabeled(host_ops, host_labels);
    auto dev = gpu.get();
    if (!dev.ok()) return dev.status();
    if (!host.ok()) return host.status();
    return *host + *dev;
  }

  int threads() const override { return host_->threads(); }

 private:
  std::unique_ptr<Executor> host_;
  std::unique_ptr<Executor> gpu_;
};
#endif

}  // namespace

std::unique_ptr<Executor> MakeExecutor(const ExecutorOptions& opts) {
  auto host = MakeHostExecutor(opts);
#if WS_WITH_CUDA
  if (cuda::DeviceCount().ok()) {
    auto gpu = cuda::MakeCudaExecutor();
    if (gpu.ok()) return std::make_unique<DispatchExecutor>(std::move(host), std::move(gpu).value());
  }
#endif
  return host;
}

}  // namespace ws
