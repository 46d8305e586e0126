// CUDA executor: per destination device one stream; all kernel-path ops of a
// Run() go out as ONE launch per device (the kernel walks a prefix sum of op
// sizes and runs kernels::RunElement, the same arithmetic as the host);
// large same-dtype pieces go to the copy engines (cudaMemcpy2DAsync), large
// zero fills to cudaMemset2DAsync. Completion by event.
#include <algorithm>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "daemon/kernels/copy_math.h"
#include "daemon/mem/cuda/cuda_domain.h"
#include "daemon/mem/cuda/cuda_util.h"

namespace ws::cuda {
namespace {

using kernels::CopyOp;

__global__ void BatchedCopyKernel(const CopyOp* __restrict__ ops, const int64_t* __restrict__ starts, int n,
                                  int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total; k += stride) {
    int lo = 0, hi = n - 1;  // last op with starts[op] <= k
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (starts[mid] <= k) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    kernels::RunElement(ops[lo], k - starts[lo]);
  }
}

size_t ElemSize(uint8_t dt) { return dt == kernels::kF32 ? 4 : 2; }

std::string LabelsOf(const std::vector<std::string>& labels) {
  std::string s;
  for (size_t i = 0; i < labels.size() && i < 3; ++i) s += (i ? ", " : "") + labels[i];
  if (labels.size() > 3) s += ", ... (" + std::to_string(labels.size()) + " ops)";
  return s;
}

// Per-device stream, completion event and op-upload buffers. `mu` is held by
// a Run() from enqueue to completion, so concurrent Runs on one device
// serialize (the device is saturated by one batch anyway).
struct DeviceState {
  int device = -1;
  int sms = 1;
  std::mutex mu;
  cudaStream_t stream = nullptr;
  cudaEvent_t done = nullptr;
  void* dev_buf = nullptr;
  void* host_buf = nullptr;  // pinned staging for the op array
  size_t cap = 0;

  ~DeviceState() {
    ScopedDevice scoped(device);
    if (dev_buf) cudaFree(dev_buf);
    if (host_buf) cudaFreeHost(host_buf);
    if (done) cudaEventDestroy(done);
    if (stream) cudaStreamDestroy(stream);
  }

  Status Init(int d) {
    device = d;
    const std::string what = "CUDA executor on device " + std::to_string(d);
    ScopedDevice scoped(d);
    WS_CUDA_RETURN(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d), what);
    WS_CUDA_RETURN(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), what);
    WS_CUDA_RETURN(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), what);
    return Status::Ok();
  }

  Status Reserve(size_t bytes, const std::string& what) {
    if (bytes <= cap) return Status::Ok();
    size_t want = std::max(bytes, cap * 2);
    if (dev_buf) cudaFree(dev_buf);
    if (host_buf) cudaFreeHost(host_buf);
    dev_buf = host_buf = nullptr;
    cap = 0;
    WS_CUDA_RETURN(cudaMalloc(&dev_buf, want), what);
    WS_CUDA_RETURN(cudaMallocHost(&host_buf, want), what);
    cap = want;
    return Status::Ok();
  }
};

struct DeviceWork {
  std::vector<CopyOp> kernel_ops;
  std::vector<std::string> kernel_labels;
  std::vector<std::pair<CopyOp, std::string>> engine_ops;  // memcpy / memset pieces
};

class CudaExecutor final : public Executor {
 public:
  explicit CudaExecutor(const CudaExecutorOptions& opts) : opts_(opts) {}

  Status Init(int n) {
    for (int d = 0; d < n; ++d) {
      devs_.push_back(std::make_unique<DeviceState>());
      WS_RETURN_IF_ERROR(devs_.back()->Init(d));
    }
    // Kernels read peer memory directly where the topology allows it; ops
    // that would need a pair without peer access are refused per op.
    peer_.assign(n, std::vector<bool>(n, false));
    for (int a = 0; a < n; ++a) {
      peer_[a][a] = true;
      for (int b = 0; b < n; ++b) {
        int can = 0;
        if (a == b || cudaDeviceCanAccessPeer(&can, a, b) != cudaSuccess || !can) continue;
        ScopedDevice scoped(a);
        cudaError_t e = cudaDeviceEnablePeerAccess(b, 0);
        peer_[a][b] = e == cudaSuccess || e == cudaErrorPeerAccessAlreadyEnabled;
        cudaGetLastError();
      }
    }
    return Status::Ok();
  }

  Result<uint64_t> Run(const std::vector<CopyOp>& ops) override { return RunLabeled(ops, {}); }

  Result<uint64_t> RunLabeled(const std::vector<CopyOp>& ops, const std::vector<std::string>& labels) override {
    std::vector<DeviceWork> work(devs_.size());
    uint64_t bytes = 0;
    for (size_t i = 0; i < ops.size(); ++i) {
      std::string label = i < labels.size() && !labels[i].empty() ? labels[i] : "copy op " + std::to_string(i);
      CopyOp op = ops[i];
      if (op.rows <= 0 || op.cols <= 0) continue;
      const uint64_t op_bytes = static_cast<uint64_t>(op.rows * op.cols) * ElemSize(op.dst_dtype);
      const int dd = PointerDevice(op.dst);
      const int sd = op.zero_fill ? -1 : PointerDevice(op.src);
      const int dev = dd >= 0 ? dd : sd;
      if (dev < 0 || dev >= static_cast<int>(devs_.size())) {
        return InvalidArgument(label + ": neither source nor destination is memory of a visible CUDA device");
      }
      const bool contiguous_src = op.rows == 1 || op.src_ld >= op.cols;
      const bool engine = op_bytes >= opts_.memcpy_min_bytes && !op.transpose &&
                          ((op.zero_fill && dd >= 0) || (!op.zero_fill && op.src_dtype == op.dst_dtype && contiguous_src));
      if (engine) {
        work[dev].engine_ops.emplace_back(op, std::move(label));
      } else {
        WS_RETURN_IF_ERROR(ResolveForKernel(&op, dev, dd, sd, label));
        work[dev].kernel_ops.push_back(op);
        work[dev].kernel_labels.push_back(std::move(label));
      }
      bytes += op_bytes;
    }

    std::vector<std::unique_lock<std::mutex>> locks;
    std::vector<int> used;
    for (size_t d = 0; d < devs_.size(); ++d) {  // ascending: no lock-order inversions
      if (work[d].kernel_ops.empty() && work[d].engine_ops.empty()) continue;
      locks.emplace_back(devs_[d]->mu);
      used.push_back(static_cast<int>(d));
    }
    Status first_error;
    std::vector<int> enqueued;
    for (int d : used) {
      Status st = Enqueue(*devs_[d], work[d]);
      if (!st.ok() && first_error.ok()) (void)(first_error = st);
      enqueued.push_back(d);  // wait even after a failure: earlier pieces may be in flight
    }
    for (int d : enqueued) {
      ScopedDevice scoped(d);
      cudaError_t e = cudaEventSynchronize(devs_[d]->done);
      if (e != cudaSuccess && first_error.ok()) {
        std::vector<std::string> all = work[d].kernel_labels;
        for (auto& [op, l] : work[d].engine_ops) all.push_back(l);
        (void)(first_error = CudaError(e, "cudaEventSynchronize",
                                       "copies into device " + std::to_string(d) + " for " + LabelsOf(all)));
      }
    }
    if (!first_error.ok()) return first_error;
    return bytes;
  }

  int threads() const override { return static_cast<int>(devs_.size()); }

 private:
  // Kernel-path pointers must be device-addressable: peer memory needs peer
  // access, host memory must be registered (PinHostRange) and is replaced by
  // its device alias.
  Status ResolveForKernel(CopyOp* op, int dev, int dd, int sd, const std::string& label) {
    auto host_alias = [&](const void* p, const char* side) -> Result<void*> {
      cudaPointerAttributes attr;
      cudaError_t e = cudaPointerGetAttributes(&attr, p);
      if (e != cudaSuccess || attr.type != cudaMemoryTypeHost || attr.devicePointer == nullptr) {
        cudaGetLastError();
        std::string why = PinFailureFor(p);
        return FailedPrecondition(label + ": " + side +
                                  " is host memory not registered with CUDA, so the copy kernel cannot read it" +
                                  (why.empty() ? std::string(" (map it through the CUDA-enabled memory domain)")
                                               : "; " + why));
      }
      return attr.devicePointer;
    };
    auto peer_ok = [&](int other, const char* side) -> Status {
      if (!peer_[dev][other]) {
        return FailedPrecondition(label + ": " + side + " is on device " + std::to_string(other) + " and device " +
                                  std::to_string(dev) + " has no peer access to it");
      }
      return Status::Ok();
    };
    if (dd < 0) {
      WS_ASSIGN_OR_RETURN(op->dst, host_alias(op->dst, "destination"));
    }
    if (!op->zero_fill) {
      if (sd < 0) {
        WS_ASSIGN_OR_RETURN(void* s, host_alias(op->src, "source"));
        op->src = s;
      } else {
        WS_RETURN_IF_ERROR(peer_ok(sd, "source"));
      }
    }
    return Status::Ok();
  }

  // Records the completion event even after a failed enqueue, so the caller
  // waits for whatever did get queued.
  Status Enqueue(DeviceState& ds, const DeviceWork& w) {
    ScopedDevice scoped(ds.device);
    Status st = EnqueueBody(ds, w);
    cudaError_t e = cudaEventRecord(ds.done, ds.stream);
    if (e != cudaSuccess && st.ok()) return CudaError(e, "cudaEventRecord", "device " + std::to_string(ds.device));
    return st;
  }

  Status EnqueueBody(DeviceState& ds, const DeviceWork& w) {
    for (const auto& [op, label] : w.engine_ops) {
      const size_t es = ElemSize(op.dst_dtype);
      char* dst = static_cast<char*>(op.dst) + op.dst_offset * es;
      const size_t width = static_cast<size_t>(op.cols) * es;
      const size_t dpitch = static_cast<size_t>(op.rows > 1 ? op.dst_ld : op.cols) * es;
      if (op.zero_fill) {
        WS_CUDA_RETURN(cudaMemset2DAsync(dst, dpitch, 0, width, op.rows, ds.stream), label);
        continue;
      }
      const char* src = static_cast<const char*>(op.src) + op.src_offset * es;
      const size_t spitch = static_cast<size_t>(op.rows > 1 ? op.src_ld : op.cols) * es;
      if (dpitch == width && spitch == width) {
        WS_CUDA_RETURN(cudaMemcpyAsync(dst, src, width * op.rows, cudaMemcpyDefault, ds.stream), label);
      } else {
        WS_CUDA_RETURN(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, op.rows, cudaMemcpyDefault, ds.stream), label);
      }
    }
    if (!w.kernel_ops.empty()) {
      const std::string what = "copy kernel on device " + std::to_string(ds.device) + " for " + LabelsOf(w.kernel_labels);
      const int n = static_cast<int>(w.kernel_ops.size());
      const size_t ops_bytes = n * sizeof(CopyOp);
      WS_RETURN_IF_ERROR(ds.Reserve(ops_bytes + n * sizeof(int64_t), what));
      auto* hops = static_cast<CopyOp*>(ds.host_buf);
      auto* hstarts = reinterpret_cast<int64_t*>(static_cast<char*>(ds.host_buf) + ops_bytes);
      int64_t total = 0;
      for (int i = 0; i < n; ++i) {
        hops[i] = w.kernel_ops[i];
        hstarts[i] = total;
        total += w.kernel_ops[i].rows * w.kernel_ops[i].cols;
      }
      WS_CUDA_RETURN(cudaMemcpyAsync(ds.dev_buf, ds.host_buf, ops_bytes + n * sizeof(int64_t), cudaMemcpyHostToDevice,
                                     ds.stream),
                     what);
      const int threads = 256;
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, int64_t{ds.sms} * 16));
      BatchedCopyKernel<<<static_cast<unsigned>(blocks), threads, 0, ds.stream>>>(
          static_cast<const CopyOp*>(ds.dev_buf),
          reinterpret_cast<const int64_t*>(static_cast<const char*>(ds.dev_buf) + ops_bytes), n, total);
      WS_CUDA_RETURN(cudaGetLastError(), what + " (launch of BatchedCopyKernel)");
    }
    return Status::Ok();
  }

  CudaExecutorOptions opts_;
  std::vector<std::unique_ptr<DeviceState>> devs_;
  std::vector<std::vector<bool>> peer_;  // peer_[a][b]: kernels on a may read b's memory
};

}  // namespace

Result<std::unique_ptr<Executor>> MakeCudaExecutor(const CudaExecutorOptions& opts) {
  WS_ASSIGN_OR_RETURN(int n, DeviceCount());
  auto ex = std::make_unique<CudaExecutor>(opts);
  WS_RETURN_IF_ERROR(ex->Init(n));
  return std::unique_ptr<Executor>(std::move(ex));
}

}  // namespace ws::cuda
