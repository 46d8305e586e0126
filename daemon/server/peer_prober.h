// PeerHello over gRPC: how this daemon probes the peer daemons it is
// configured with (cluster::PeerSet). Each peer gets one client (one channel,
// reconnecting on its own) with the credentials peers present to each other:
// TLS CA / client certificate and the bearer token (ClientOptions).
#pragma once

#include <map>
#include <memory>
#include <string>

#include "client/cpp/client.h"
#include "daemon/cluster/peers.h"
#include "daemon/core/thread_annotations.h"

namespace ws::server {

class GrpcPeerProber final : public cluster::PeerProber {
 public:
  GrpcPeerProber(std::string self, ClientOptions opts) : self_(std::move(self)), opts_(std::move(opts)) {}
  Result<cluster::HelloReply> Hello(const cluster::PeerSpec& peer, std::chrono::milliseconds timeout) override;

 private:
  const std::string self_;
  const ClientOptions opts_;
  Mutex mu_;
  std::map<std::string, std::unique_ptr<WeightSyncClient>> clients_ WS_GUARDED_BY(mu_);  // by address
};

}  // namespace ws::server
