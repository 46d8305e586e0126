// ClusterLink over the peer daemons' gRPC (control: PeerPrepareSync,
// PeerStartSync, PeerReceive, PeerCommitSync, PeerAbortSync) and UCX (data:
// the packed chunks, tag cluster::ChunkTag). Peers are those of the PeerSet
// (names, addresses, health); RPCs carry the peer credentials (ClientOptions:
// TLS client certificate, bearer token). UCX endpoints are made from the
// worker address each peer returns to PeerPrepareSync, again whenever it
// changed (a restarted daemon) or after an exchange failed. Nodes that are
// not the leader learn the other participants' addresses from PeerStartSync
// (Learn), so trainer ranks' nodes can send each other chunks.
//
// Thread-safety: every method may be called from any thread. ucx_mu_
// serialises making endpoints; exchanges run concurrently (UcxTransport
// serialises its worker), so a node may receive from one peer while it sends
// to another. Send holds send_mu_ for its whole round (RPC and exchange), so
// a node receives from this one one window at a time, in the order it is
// sent (a receiver posts only the chunks of its current PeerReceive).
//
// Chunks staged in GPU memory at both ends (SendDevice / ReceiveDevice) go
// over the device transport (NCCL): one two-rank communicator per (peer,
// local GPU, remote GPU, direction), kept in a PeerCommCache and reused across windows
// and syncs; the sender makes its unique id and sends it in the window's
// PeerReceive (so only authenticated peers join); a failed or timed-out
// exchange aborts and drops it at both ends and the next window rebuilds it.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "client/cpp/client.h"
#include "daemon/cluster/peers.h"
#include "daemon/core/limits.h"
#include "daemon/core/thread_annotations.h"
#include "daemon/sync/cluster_link.h"
#include "daemon/transport/peer_comm.h"
#include "daemon/transport/ucx/ucx_transport.h"

namespace ws::server {

struct ClusterLinkOptions {
  uint64_t staging_bytes = 64ull << 20;                 // per peer, packed bytes held at once
  std::chrono::milliseconds rpc_timeout{10000};         // prepare, start, abort
  std::chrono::milliseconds transfer_timeout{30000};    // one window: RPC and UCX exchange
  std::chrono::milliseconds commit_timeout{90000};      // a node's commit (its engines' acks)
  Limits limits;                                        // of what peers answer
};

class GrpcClusterLink final : public ClusterLink {
 public:
  // `peers` must outlive the link.
  // `device`: the GPU-to-GPU transport (MakeNcclPeerCommFactory(); null:
  // every chunk goes over UCX with host staging).
  GrpcClusterLink(const cluster::PeerSet* peers, ClientOptions client, std::unique_ptr<UcxTransport> ucx,
                  ClusterLinkOptions opts, std::unique_ptr<PeerCommFactory> device = nullptr);
  ~GrpcClusterLink() override;  // waits for background aborts
  GrpcClusterLink(const GrpcClusterLink&) = delete;
  GrpcClusterLink& operator=(const GrpcClusterLink&) = delete;

  const std::string& self() const override { return peers_->self(); }
  std::vector<std::string> UpPeers() const override;
  bool Down(const std::string& node, std::string* why) const override;
  uint64_t staging_bytes() const override { return opts_.staging_bytes; }

  Result<std::vector<RemoteEngine>> Prepare(const std::string& node, const std::string& model) override;
  Status Start(const std::string& node, const RemoteStart& start) override;
  Result<uint64_t> Send(const std::string& node, const std::string& leader, uint64_t sync_id,
                        const std::vector<ChunkBuffer>& chunks) override;
  Status Commit(const std::string& node, uint64_t sync_id) override;
  void AbortAsync(std::vector<std::string> nodes, uint64_t sync_id, std::string reason) override;
  Status Receive(const std::string& from, uint64_t sync_id, const std::vector<ChunkBuffer>& chunks) override;
  Result<std::string> ChunkTransport(const Route& route) const override { return chunk_transports_.Pick(route); }
  Result<uint64_t> SendDevice(const std::string& node, const std::string& leader, uint64_t sync_id,
                              const std::vector<ChunkBuffer>& chunks, const DeviceTransfer& t) override;
  Status ReceiveDevice(const std::string& from, uint64_t sync_id, const std::vector<ChunkBuffer>& chunks,
                       const DeviceTransfer& t) override;
  // "nccl {cuda_ipc -> cuda_ipc across nodes}; ucx {...}"
  std::string chunk_transports() const { return chunk_transports_.ToString(); }
  // The GPU-to-GPU communicators (zeros without a device transport).
  PeerCommCache::Stats device_stats() const;
  // The UCX worker addresses of a sync's nodes, as its leader knows them
  // (PeerStartSyncRequest.ucx_addresses); this node's own is ignored.
  void Learn(const std::map<std::string, std::string>& addresses);

  // This worker's address (PeerPrepareSync's answer).
  const std::string& ucx_address() const { return ucx_->address(); }
  // Sync bytes sent to / received from each peer since start.
  std::map<std::string, PeerBytes> bytes() const;

 private:
  Result<WeightSyncClient*> Client(const std::string& node);
  // Connects to `node` when its worker `address` is new ("" = the one known),
  // the endpoint was closed, or an exchange with it failed. ucx_mu_ held.
  Status EnsureEndpoint(const std::string& node, const std::string& address) WS_REQUIRES(ucx_mu_);

  const cluster::PeerSet* const peers_;
  const ClientOptions client_opts_;
  const std::unique_ptr<UcxTransport> ucx_;
  const ClusterLinkOptions opts_;
  const std::unique_ptr<PeerCommFactory> device_factory_;
  const std::unique_ptr<PeerCommCache> comms_;  // null without a device transport
  ChunkTransports chunk_transports_;            // set by the constructor

  mutable Mutex mu_;
  std::map<std::string, std::unique_ptr<WeightSyncClient>> clients_ WS_GUARDED_BY(mu_);  // by node
  std::map<std::string, std::string> ucx_peer_address_ WS_GUARDED_BY(mu_);             // by node, as prepared
  std::set<std::string> reconnect_ WS_GUARDED_BY(mu_);                                  // endpoints to remake
  std::map<std::string, PeerBytes> bytes_ WS_GUARDED_BY(mu_);
  std::vector<std::thread> aborts_ WS_GUARDED_BY(mu_);
  Mutex ucx_mu_;   // the UCX worker
  Mutex send_mu_;  // one Send round at a time
};

}  // namespace ws::server
