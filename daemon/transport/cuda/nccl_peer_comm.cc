// PeerComm over NCCL (CUDA builds): a two-rank NcclTransport per
// communicator (non-blocking init, deadline, ncclCommAbort on failure).
#include <utility>

#include "daemon/transport/nccl_transport.h"
#include "daemon/transport/peer_comm.h"

namespace ws {
namespace {

class NcclPeerComm final : public PeerComm {
 public:
  explicit NcclPeerComm(std::unique_ptr<NcclTransport> t) : t_(std::move(t)) {}
  Status Exchange(const std::vector<P2P>& ops) override {
    std::vector<NcclTransport::P2P> p;
    p.reserve(ops.size());
    const int other = 1 - t_->rank();
    for (const P2P& op : ops) p.push_back(NcclTransport::P2P{op.send, other, op.ptr, op.bytes, op.what});
    return t_->Exchange(p);
  }

 private:
  const std::unique_ptr<NcclTransport> t_;
};

class NcclPeerCommFactory final : public PeerCommFactory {
 public:
  const char* name() const override { return "nccl"; }
  Result<std::string> NewUniqueId() override { return NcclTransport::NewUniqueId(); }
  Result<std::unique_ptr<PeerComm>> Join(const std::string& unique_id, int rank, const std::string& device_uuid,
                                         std::chrono::milliseconds timeout) override {
    WS_ASSIGN_OR_RETURN(std::unique_ptr<NcclTransport> t,
                        NcclTransport::Create(unique_id, /*nranks=*/2, rank, device_uuid, timeout));
    return std::unique_ptr<PeerComm>(new NcclPeerComm(std::move(t)));
  }
};

}  // namespace

std::unique_ptr<PeerCommFactory> MakeNcclPeerCommFactory() { return std::make_unique<NcclPeerCommFactory>(); }

}  // namespace ws
