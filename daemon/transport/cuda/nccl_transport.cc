#include "daemon/transport/nccl_transport.h"

#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include "daemon/platform/cuda/cuda_platform.h"
#include "daemon/platform/cuda/cuda_util.h"

namespace ws {
namespace {

Status NcclError(ncclResult_t r, const char* call, const std::string& what) {
  return Internal(what + ": " + call + " failed: " + ncclGetErrorString(r));
}

#define WS_NCCL_RETURN(expr, what)                                         \
  do {                                                                     \
    ncclResult_t _ws_r = (expr);                                           \
    if (_ws_r != ncclSuccess) return NcclError(_ws_r, #expr, (what));      \
  } while (0)

}  // namespace

struct NcclTransport::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int device = -1, rank = 0, nranks = 0;
  std::chrono::milliseconds timeout{0};
  Status failed;  // why the communicator was aborted; Ok while usable

  ~Impl() {
    cuda::ScopedDevice scoped(device);
    if (comm) ncclCommDestroy(comm);
    if (stream) cudaStreamDestroy(stream);
  }

  // Aborts the communicator (in-flight NCCL work is torn down) and keeps `st`
  // as the reason every later call is refused.
  Status Fail(Status st) {
    if (comm) ncclCommAbort(comm);
    comm = nullptr;
    if (failed.ok()) failed = st;
    return st;
  }

  // Waits while the non-blocking communicator reports ncclInProgress.
  Status WaitReady(std::chrono::steady_clock::time_point deadline, const char* call, const std::string& what) {
    auto nap = std::chrono::microseconds(20);
    for (;;) {
      ncclResult_t state = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm, &state);
      if (r != ncclSuccess) return Fail(NcclError(r, "ncclCommGetAsyncError", what));
      if (state == ncclSuccess) return Status::Ok();
      if (state != ncclInProgress) return Fail(NcclError(state, call, what));
      if (std::chrono::steady_clock::now() >= deadline) {
        return Fail(DeadlineExceeded(what + ": " + call + " did not finish within " +
                                     std::to_string(timeout.count() / 1000.0) + " s (a peer rank missing or stuck?); "
                                     "communicator aborted"));
      }
      std::this_thread::sleep_for(nap);
      nap = std::min<std::chrono::microseconds>(nap * 2, std::chrono::milliseconds(2));
    }
  }

  // Non-blocking NCCL calls may return ncclInProgress; wait for them.
  Status Check(ncclResult_t r, std::chrono::steady_clock::time_point deadline, const char* call,
               const std::string& what) {
    if (r == ncclInProgress) return WaitReady(deadline, call, what);
    if (r != ncclSuccess) return Fail(NcclError(r, call, what));
    return Status::Ok();
  }
};

NcclTransport::NcclTransport(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
NcclTransport::~NcclTransport() = default;
int NcclTransport::rank() const { return impl_->rank; }
int NcclTransport::nranks() const { return impl_->nranks; }

Result<std::string> NcclTransport::NewUniqueId() {
  ncclUniqueId id;
  WS_NCCL_RETURN(ncclGetUniqueId(&id), "nccl transport");
  return std::string(id.internal, sizeof(id.internal));
}

Result<std::unique_ptr<NcclTransport>> NcclTransport::Create(const std::string& unique_id, int nranks, int rank,
                                                             const std::string& device_uuid,
                                                             std::chrono::milliseconds timeout) {
  const std::string what = "nccl transport rank " + std::to_string(rank) + "/" + std::to_string(nranks);
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return InvalidArgument(what + ": unique id must be " + std::to_string(sizeof(id.internal)) + " bytes, got " +
                           std::to_string(unique_id.size()));
  }
  if (nranks <= 0 || rank < 0 || rank >= nranks) return InvalidArgument(what + ": bad rank/size");
  if (timeout.count() <= 0) return InvalidArgument(what + ": timeout must be positive");
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  auto dev = cuda::DeviceByUuid(device_uuid);
  if (!dev.ok()) return dev.status().WithContext(what);
  auto impl = std::make_unique<Impl>();
  impl->device = *dev;
  impl->rank = rank;
  impl->nranks = nranks;
  impl->timeout = timeout;
  cuda::ScopedDevice scoped(*dev);
  WS_CUDA_RETURN(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking), what);
  // Non-blocking, so a rank that never joins is a deadline, not a hang.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  ncclResult_t r = ncclCommInitRankConfig(&impl->comm, nranks, id, rank, &config);
  // A failure aborts whatever communicator was made (Impl::Fail).
  WS_RETURN_IF_ERROR(impl->Check(r, deadline, "ncclCommInitRankConfig", what));
  return std::unique_ptr<NcclTransport>(new NcclTransport(std::move(impl)));
}

Status NcclTransport::Exchange(const std::vector<P2P>& ops) {
  Impl& m = *impl_;
  const std::string what = ops.empty() ? "nccl exchange" : ops.front().what;
  if (!m.failed.ok()) {
    return FailedPrecondition(what + ": the nccl communicator was aborted earlier (" + m.failed.message() +
                              "); create a new transport");
  }
  cuda::ScopedDevice scoped(m.device);
  for (const P2P& p : ops) {
    if (p.peer < 0 || p.peer >= m.nranks) return InvalidArgument(p.what + ": nccl peer " + std::to_string(p.peer) + " out of range");
    if (p.bytes > 0 && cuda::PointerDevice(p.ptr) != m.device) {
      return InvalidArgument(p.what + ": nccl buffer is not memory of the communicator's device " + std::to_string(m.device));
    }
  }
  const auto deadline = std::chrono::steady_clock::now() + m.timeout;
  WS_RETURN_IF_ERROR(m.Check(ncclGroupStart(), deadline, "ncclGroupStart", what));
  for (const P2P& p : ops) {
    ncclResult_t r = p.send ? ncclSend(p.ptr, p.bytes, ncclUint8, p.peer, m.comm, m.stream)
                            : ncclRecv(p.ptr, p.bytes, ncclUint8, p.peer, m.comm, m.stream);
    if (r != ncclSuccess && r != ncclInProgress) {
      // The group must be closed on this thread, but none of it may run:
      // abort the communicator right after (a partial group would leave the
      // peers waiting for the missing half).
      Status st = NcclError(r, p.send ? "ncclSend" : "ncclRecv", p.what);
      ncclGroupEnd();
      return m.Fail(st);
    }
  }
  WS_RETURN_IF_ERROR(m.Check(ncclGroupEnd(), deadline, "ncclGroupEnd", what));
  // Wait for the stream with the deadline, watching for NCCL errors too.
  auto nap = std::chrono::microseconds(10);
  for (;;) {
    cudaError_t e = cudaStreamQuery(m.stream);
    if (e == cudaSuccess) return Status::Ok();
    if (e != cudaErrorNotReady) return m.Fail(cuda::CudaError(e, "cudaStreamQuery", what));
    ncclResult_t state = ncclSuccess;
    if (ncclCommGetAsyncError(m.comm, &state) == ncclSuccess && state != ncclSuccess && state != ncclInProgress)
      return m.Fail(NcclError(state, "ncclCommGetAsyncError", what));
    if (std::chrono::steady_clock::now() >= deadline) {
      return m.Fail(DeadlineExceeded(what + ": nccl exchange did not finish within " +
                                     std::to_string(m.timeout.count() / 1000.0) +
                                     " s (a peer rank missing or stuck?); communicator aborted"));
    }
    std::this_thread::sleep_for(nap);
    nap = std::min<std::chrono::microseconds>(nap * 2, std::chrono::milliseconds(1));
  }
}

Status NcclTransport::Send(const void* ptr, uint64_t bytes, int peer, const std::string& what) {
  return Exchange({P2P{true, peer, const_cast<void*>(ptr), bytes, what}});
}

Status NcclTransport::Recv(void* ptr, uint64_t bytes, int peer, const std::string& what) {
  return Exchange({P2P{false, peer, ptr, bytes, what}});
}

}  // namespace ws
