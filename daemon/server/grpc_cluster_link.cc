#include "daemon/server/grpc_cluster_link.h"

#include <future>

#include <spdlog/spdlog.h>

#include "daemon/cluster/pack.h"
#include "daemon/server/convert.h"

namespace ws::server {

namespace {

double Secs(std::chrono::milliseconds d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

GrpcClusterLink::GrpcClusterLink(const cluster::PeerSet* peers, ClientOptions client,
                                 std::unique_ptr<UcxTransport> ucx, ClusterLinkOptions opts,
                                 std::unique_ptr<PeerCommFactory> device)
    : peers_(peers),
      client_opts_(std::move(client)),
      ucx_(std::move(ucx)),
      opts_(opts),
      device_factory_(std::move(device)),
      comms_(device_factory_ ? std::make_unique<PeerCommCache>(device_factory_.get(), opts.transfer_timeout) : nullptr) {
  // By capability: GPU to GPU over the device transport when there is one,
  // everything else (and everything without one) host-staged over UCX.
  if (device_factory_) chunk_transports_.Add(device_factory_->name(), DeviceCaps());
  chunk_transports_.Add("ucx", HostStagedCaps());
}

GrpcClusterLink::~GrpcClusterLink() {
  std::vector<std::thread> threads;
  {
    MutexLock lk(&mu_);
    threads.swap(aborts_);
  }
  for (auto& t : threads) t.join();
}

std::vector<std::string> GrpcClusterLink::UpPeers() const {
  std::vector<std::string> out;
  for (const auto& p : peers_->Snapshot())
    if (p.health == cluster::PeerHealth::kUp) out.push_back(p.spec.name);
  return out;
}

bool GrpcClusterLink::Down(const std::string& node, std::string* why) const {
  for (const auto& p : peers_->Snapshot())
    if (p.spec.name == node && p.health == cluster::PeerHealth::kDown) {
      if (why != nullptr) *why = p.last_error;
      return true;
    }
  return false;
}

std::map<std::string, PeerBytes> GrpcClusterLink::bytes() const {
  MutexLock lk(&mu_);
  return bytes_;
}

Result<WeightSyncClient*> GrpcClusterLink::Client(const std::string& node) {
  std::string address;
  for (const auto& p : peers_->Snapshot())
    if (p.spec.name == node) address = p.spec.address;
  if (address.empty()) return NotFound("node " + node + " is not a configured peer (--peer)");
  MutexLock lk(&mu_);
  auto& c = clients_[node];
  if (!c) c = std::make_unique<WeightSyncClient>(address, client_opts_);
  return c.get();  // never erased: lives as long as the link
}

Result<std::vector<RemoteEngine>> GrpcClusterLink::Prepare(const std::string& node, const std::string& model) {
  WS_ASSIGN_OR_RETURN(WeightSyncClient * c, Client(node));
  pb::PeerPrepareSyncRequest req;
  req.set_leader(self());
  req.set_model(model);
  auto r = c->PeerPrepareSync(req, Secs(opts_.rpc_timeout));
  if (!r.ok()) return r.status().WithContext("node " + node);
  if (r->node_name() != node)
    return FailedPrecondition("the daemon at node " + node + "'s address answers as node '" + r->node_name() + "'");
  std::vector<RemoteEngine> out;
  for (const auto& e : r->engines()) {
    WS_ASSIGN_OR_RETURN(RemoteEngine re, FromProto(e, opts_.limits));
    out.push_back(std::move(re));
  }
  // Data endpoint: (re)connect when the worker is new to us or changed (also
  // for a node without engines: trainer ranks may push there).
  if (r->ucx_address().empty()) return out;
  MutexLock ulk(&ucx_mu_);
  if (Status st = EnsureEndpoint(node, r->ucx_address()); !st.ok()) return st;
  return out;
}

Status GrpcClusterLink::EnsureEndpoint(const std::string& node, const std::string& address) {
  bool connect;
  {
    MutexLock lk(&mu_);
    std::string& known = ucx_peer_address_[node];
    if (!address.empty() && known != address) {
      known = address;
      reconnect_.insert(node);
    }
    if (known.empty()) return Unavailable("no UCX address of node " + node + " (not prepared)");
    connect = reconnect_.count(node) > 0 || !ucx_->connected(node);
  }
  if (!connect) return Status::Ok();
  std::string at;
  {
    MutexLock lk(&mu_);
    at = ucx_peer_address_[node];
  }
  if (Status st = ucx_->Connect(node, at); !st.ok()) return st.WithContext("UCX endpoint to node " + node);
  MutexLock lk(&mu_);
  reconnect_.erase(node);
  return Status::Ok();
}

Status GrpcClusterLink::Start(const std::string& node, const RemoteStart& start) {
  WS_ASSIGN_OR_RETURN(WeightSyncClient * c, Client(node));
  pb::PeerStartSyncRequest req;
  ToProto(start, &req);
  // Nodes that send each other chunks (trainer ranks on several nodes) learn
  // each other's workers from here.
  if (!start.rank_nodes.empty()) {
    std::set<std::string> nodes(start.rank_nodes.begin(), start.rank_nodes.end());
    for (const auto& e : start.engines) nodes.insert(e.node);
    auto& addrs = *req.mutable_ucx_addresses();
    addrs[self()] = ucx_->address();
    MutexLock lk(&mu_);
    for (const auto& n : nodes)
      if (auto it = ucx_peer_address_.find(n); n != node && it != ucx_peer_address_.end() && !it->second.empty())
        addrs[n] = it->second;
  }
  return c->PeerStartSync(req, Secs(opts_.rpc_timeout)).status().WithContext("node " + node);
}

void GrpcClusterLink::Learn(const std::map<std::string, std::string>& addresses) {
  MutexLock lk(&mu_);
  for (const auto& [node, address] : addresses) {
    if (node == self() || address.empty()) continue;
    std::string& known = ucx_peer_address_[node];
    if (known != address) {
      known = address;
      reconnect_.insert(node);
    }
  }
}

Result<uint64_t> GrpcClusterLink::Send(const std::string& node, const std::string& leader, uint64_t sync_id,
                                       const std::vector<ChunkBuffer>& chunks) {
  WS_ASSIGN_OR_RETURN(WeightSyncClient * c, Client(node));
  MutexLock send(&send_mu_);
  pb::PeerReceiveRequest req;
  req.set_leader(leader);
  req.set_sender(self());
  req.set_sync_id(sync_id);
  std::vector<UcxTransport::Op> ops;
  uint64_t total = 0;
  for (const auto& ch : chunks) {
    req.add_chunks(ch.chunk);
    ops.push_back(UcxTransport::Op{true, node, cluster::ChunkTag(sync_id, ch.chunk), ch.data, ch.bytes,
                                   "chunk " + std::to_string(ch.chunk)});
    total += ch.bytes;
  }
  // The node posts its receives when the RPC arrives; the sends wait for them.
  auto rpc = std::async(std::launch::async, [&] { return c->PeerReceive(req, Secs(opts_.transfer_timeout)); });
  Status sent;
  {
    MutexLock ulk(&ucx_mu_);
    sent = EnsureEndpoint(node, "");
  }
  if (sent.ok()) sent = ucx_->Exchange(ops, opts_.transfer_timeout);
  auto got = rpc.get();
  {
    MutexLock lk(&mu_);
    if (sent.ok()) bytes_[node].sent += total;
    if (!got.ok() || !sent.ok()) reconnect_.insert(node);  // a fresh endpoint for the next window
  }
  // The node's reason comes first: it says what failed there.
  if (!got.ok()) return got.status().WithContext("node " + node + " receiving");
  if (!sent.ok()) return sent.WithContext("node " + node + " (UCX)");
  return got->bytes_written();
}

Status GrpcClusterLink::Commit(const std::string& node, uint64_t sync_id) {
  WS_ASSIGN_OR_RETURN(WeightSyncClient * c, Client(node));
  pb::PeerCommitSyncRequest req;
  req.set_leader(self());
  req.set_sync_id(sync_id);
  return c->PeerCommitSync(req, Secs(opts_.commit_timeout)).status().WithContext("node " + node + " committing");
}

void GrpcClusterLink::AbortAsync(std::vector<std::string> nodes, uint64_t sync_id, std::string reason) {
  MutexLock lk(&mu_);
  aborts_.emplace_back([this, nodes = std::move(nodes), sync_id, reason = std::move(reason)] {
    for (const auto& node : nodes) {
      auto c = Client(node);
      if (!c.ok()) continue;
      pb::PeerAbortSyncRequest req;
      req.set_leader(self());
      req.set_sync_id(sync_id);
      req.set_reason(reason);
      auto r = (*c)->PeerAbortSync(req, Secs(opts_.rpc_timeout));
      if (!r.ok()) spdlog::warn("sync {}: telling node {} of the abort: {}", sync_id, node, r.status().ToString());
    }
  });
  // Finished threads are joined at destruction; one per aborted sync is few.
}

Status GrpcClusterLink::Receive(const std::string& from, uint64_t sync_id, const std::vector<ChunkBuffer>& chunks) {
  std::vector<UcxTransport::Op> ops;
  uint64_t total = 0;
  for (const auto& ch : chunks) {
    ops.push_back(UcxTransport::Op{false, from, cluster::ChunkTag(sync_id, ch.chunk), ch.data, ch.bytes,
                                   "chunk " + std::to_string(ch.chunk)});
    total += ch.bytes;
  }
  Status st = ucx_->Exchange(ops, opts_.transfer_timeout);
  if (st.ok()) {
    MutexLock lk(&mu_);
    bytes_[from].received += total;
  }
  return st;
}

}  // namespace ws::server

namespace ws::server {

Result<uint64_t> GrpcClusterLink::SendDevice(const std::string& node, const std::string& leader, uint64_t sync_id,
                                             const std::vector<ChunkBuffer>& chunks, const DeviceTransfer& t) {
  if (!comms_ || t.transport != device_factory_->name())
    return FailedPrecondition("chunks to node " + node + " over " + t.transport + ": this daemon has no such transport");
  WS_ASSIGN_OR_RETURN(WeightSyncClient * c, Client(node));
  const CommKey key{node, t.sender_device, t.receiver_device};
  MutexLock send(&send_mu_);
  WS_ASSIGN_OR_RETURN(PeerCommCache::Lease lease, comms_->ForSend(key));
  if (!lease.new_unique_id.empty())
    spdlog::info("sync {}: new {} communicator with {} (generation {})", sync_id, comms_->name(), key.ToString(),
                 lease.generation);
  pb::PeerReceiveRequest req;
  req.set_leader(leader);
  req.set_sender(self());
  req.set_sync_id(sync_id);
  req.set_transport(t.transport);
  req.set_sender_device(t.sender_device);
  req.set_receiver_device(t.receiver_device);
  req.set_unique_id(lease.new_unique_id);
  req.set_comm_generation(lease.generation);
  for (const auto& ch : chunks) req.add_chunks(ch.chunk);
  uint64_t total = 0;
  const std::vector<PeerComm::P2P> ops = ChunkExchange(/*send=*/true, chunks, &total);
  // The node joins (a new communicator) and posts its receives when the RPC
  // arrives; the group of sends waits for them, bounded by the deadline. A
  // window the node refuses before receiving costs this side that deadline.
  auto rpc = std::async(std::launch::async, [&] { return c->PeerReceive(req, Secs(opts_.transfer_timeout)); });
  Status sent = comms_->Exchange(lease, ops);
  auto got = rpc.get();
  if (sent.ok()) {
    MutexLock lk(&mu_);
    bytes_[node].sent += total;
    bytes_[node].device_sent += total;
  }
  if (!got.ok()) return got.status().WithContext("node " + node + " receiving");
  if (!sent.ok()) return sent.WithContext("node " + node + " (" + t.transport + ")");
  spdlog::debug("sync {}: {} chunks, {} bytes to {} over {}", sync_id, chunks.size(), total, key.ToString(),
                t.transport);
  return got->bytes_written();
}

Status GrpcClusterLink::ReceiveDevice(const std::string& from, uint64_t sync_id, const std::vector<ChunkBuffer>& chunks,
                                      const DeviceTransfer& t) {
  if (!comms_ || t.transport != device_factory_->name())
    return FailedPrecondition("chunks from node " + from + " over " + t.transport + ": this daemon has no such transport");
  const CommKey key{from, t.receiver_device, t.sender_device};
  WS_ASSIGN_OR_RETURN(PeerCommCache::Lease lease, comms_->ForReceive(key, t.unique_id, t.generation));
  if (!t.unique_id.empty())
    spdlog::info("sync {}: joining {} communicator with {} (generation {})", sync_id, comms_->name(), key.ToString(),
                 t.generation);
  uint64_t total = 0;
  WS_RETURN_IF_ERROR(comms_->Exchange(lease, ChunkExchange(/*send=*/false, chunks, &total)));
  MutexLock lk(&mu_);
  bytes_[from].received += total;
  bytes_[from].device_received += total;
  return Status::Ok();
}

PeerCommCache::Stats GrpcClusterLink::device_stats() const { return comms_ ? comms_->stats() : PeerCommCache::Stats{}; }

}  // namespace ws::server
