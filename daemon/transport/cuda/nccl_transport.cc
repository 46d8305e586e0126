#include "daemon/transport/nccl_transport.h"

#include <nccl.h>

#include <cstring>

#include "daemon/mem/cuda/cuda_domain.h"
#include "daemon/mem/cuda/cuda_util.h"

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
  bool failed = false;  // abort instead of a collective destroy after an error

  ~Impl() {
    cuda::ScopedDevice scoped(device);
    if (comm) failed ? ncclCommAbort(comm) : ncclCommDestroy(comm);
    if (stream) cudaStreamDestroy(stream);
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
                                                             const std::string& device_uuid) {
  const std::string what = "nccl transport rank " + std::to_string(rank) + "/" + std::to_string(nranks);
  ncclUniqueId id;
  if (unique_id.size() != sizeof(id.internal)) {
    return InvalidArgument(what + ": unique id must be " + std::to_string(sizeof(id.internal)) + " bytes, got " +
                           std::to_string(unique_id.size()));
  }
  if (nranks <= 0 || rank < 0 || rank >= nranks) return InvalidArgument(what + ": bad rank/size");
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  auto dev = cuda::DeviceByUuid(device_uuid);
  if (!dev.ok()) return dev.status().WithContext(what);
  auto impl = std::make_unique<Impl>();
  impl->device = *dev;
  impl->rank = rank;
  impl->nranks = nranks;
  cuda::ScopedDevice scoped(*dev);
  WS_CUDA_RETURN(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking), what);
  WS_NCCL_RETURN(ncclCommInitRank(&impl->comm, nranks, id, rank), what);
  return std::unique_ptr<NcclTransport>(new NcclTransport(std::move(impl)));
}

Status NcclTransport::Exchange(const std::vector<P2P>& ops) {
  Impl& m = *impl_;
  cuda::ScopedDevice scoped(m.device);
  auto fail = [&](Status st) {
    m.failed = true;
    return st;
  };
  for (const P2P& p : ops) {
    if (p.peer < 0 || p.peer >= m.nranks) return InvalidArgument(p.what + ": nccl peer " + std::to_string(p.peer) + " out of range");
    if (p.bytes > 0 && cuda::PointerDevice(p.ptr) != m.device) {
      return InvalidArgument(p.what + ": nccl buffer is not memory of the communicator's device " + std::to_string(m.device));
    }
  }
  ncclResult_t r = ncclGroupStart();
  if (r != ncclSuccess) return fail(NcclError(r, "ncclGroupStart", "nccl exchange"));
  for (const P2P& p : ops) {
    r = p.send ? ncclSend(p.ptr, p.bytes, ncclUint8, p.peer, m.comm, m.stream)
               : ncclRecv(p.ptr, p.bytes, ncclUint8, p.peer, m.comm, m.stream);
    if (r != ncclSuccess) {
      ncclGroupEnd();
      return fail(NcclError(r, p.send ? "ncclSend" : "ncclRecv", p.what));
    }
  }
  r = ncclGroupEnd();
  if (r != ncclSuccess) return fail(NcclError(r, "ncclGroupEnd", ops.empty() ? "nccl exchange" : ops.front().what));
  cudaError_t e = cudaStreamSynchronize(m.stream);
  if (e != cudaSuccess) return fail(cuda::CudaError(e, "cudaStreamSynchronize", ops.empty() ? "nccl exchange" : ops.front().what));
  return Status::Ok();
}

Status NcclTransport::Send(const void* ptr, uint64_t bytes, int peer, const std::string& what) {
  return Exchange({P2P{true, peer, const_cast<void*>(ptr), bytes, what}});
}

Status NcclTransport::Recv(void* ptr, uint64_t bytes, int peer, const std::string& what) {
  return Exchange({P2P{false, peer, ptr, bytes, what}});
}

}  // namespace ws
