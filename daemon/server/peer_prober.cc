#include "daemon/server/peer_prober.h"

namespace ws::server {

Result<cluster::HelloReply> GrpcPeerProber::Hello(const cluster::PeerSpec& peer, std::chrono::milliseconds timeout) {
  WeightSyncClient* client = nullptr;
  {
    MutexLock lk(&mu_);
    auto& c = clients_[peer.address];
    if (!c) c = std::make_unique<WeightSyncClient>(peer.address, opts_);
    client = c.get();  // never erased: lives as long as the prober
  }
  pb::PeerHelloRequest req;
  req.set_node_name(self_);
  req.set_daemon_version(WS_VERSION);
  auto r = client->PeerHello(req, std::chrono::duration<double>(timeout).count());
  if (!r.ok()) return r.status();
  return cluster::HelloReply{r->node_name(), r->daemon_version()};
}

}  // namespace ws::server
