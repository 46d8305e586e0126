// Builds without CUDA have no NCCL: chunks across nodes travel by the
// host-staged transport only.
#include "daemon/transport/peer_comm.h"

namespace ws {

std::unique_ptr<PeerCommFactory> MakeNcclPeerCommFactory() { return nullptr; }

}  // namespace ws
