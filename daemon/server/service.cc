#include "daemon/server/service.h"

#include <chrono>
#include <condition_variable>
#include <deque>

#include <spdlog/spdlog.h>

#include "daemon/server/convert.h"
#include "daemon/server/grpc_cluster_link.h"

#ifndef WS_VERSION
#define WS_VERSION "dev"
#endif

namespace ws::server {

namespace {

grpc::Status Failed(const char* rpc, const Status& st) {
  spdlog::debug("{} failed: {}", rpc, st.ToString());
  return ToGrpc(st);
}

}  // namespace

// One open RegisterEngine stream: the coordinator enqueues, the handler thread
// writes. Deliver() never blocks on the network.
class WeightSyncService::EventQueue final : public EventSink {
 public:
  void Deliver(const EngineEvent& ev) override {
    MutexLock lk(&mu_);
    q_.push_back(ev);
    cv_.notify_all();
  }
  void Close(grpc::Status why) {
    MutexLock lk(&mu_);
    if (!closed_) why_ = std::move(why);
    closed_ = true;
    cv_.notify_all();
  }
  // Waits up to `timeout` for events or Close(); moves queued events to `out`.
  // Returns true once closed (after which `out` holds the last events).
  bool Take(std::chrono::milliseconds timeout, std::deque<EngineEvent>* out) {
    MutexLock lk(&mu_);
    lk.WaitFor(cv_, timeout, [&] {
      mu_.AssertHeld();
      return closed_ || !q_.empty();
    });
    out->swap(q_);
    q_.clear();
    return closed_;
  }
  grpc::Status why() {
    MutexLock lk(&mu_);
    return why_;
  }

 private:
  Mutex mu_;
  std::condition_variable cv_;
  std::deque<EngineEvent> q_ WS_GUARDED_BY(mu_);
  bool closed_ WS_GUARDED_BY(mu_) = false;
  grpc::Status why_ WS_GUARDED_BY(mu_);
};

WeightSyncService::WeightSyncService(Coordinator* coordinator, const Authenticator* auth,
                                     const cluster::PeerSet* peers, GrpcClusterLink* cluster)
    : coord_(coordinator), auth_(auth), peers_(peers), cluster_(cluster) {}
WeightSyncService::~WeightSyncService() = default;

void WeightSyncService::BeginShutdown() {
  stopping_ = true;
  MutexLock lk(&mu_);
  for (auto& [id, q] : streams_) q->Close(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the daemon is shutting down"));
}

grpc::Status WeightSyncService::RegisterEngine(grpc::ServerContext* ctx, const pb::RegisterEngineRequest* req,
                                               grpc::ServerWriter<pb::EngineEvent>* writer) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("RegisterEngine", peer.status());
  if (stopping_) return Failed("RegisterEngine", Unavailable("the daemon is shutting down"));
  auto reg = FromProto(*req, coord_->limits());
  if (!reg.ok()) return Failed("RegisterEngine", reg.status());
  auto q = std::make_shared<EventQueue>();
  auto id = coord_->RegisterEngine(*peer, std::move(reg->spec), std::move(reg->memory), q.get(), reg->label);
  if (!id.ok()) {
    spdlog::warn("engine registration refused ({}): {}", ctx->peer(), id.status().ToString());
    return ToGrpc(id.status());
  }
  {
    MutexLock lk(&mu_);
    streams_[*id] = q;
  }
  if (stopping_) q->Close(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the daemon is shutting down"));

  pb::EngineEvent first;
  first.mutable_registered()->set_engine_id(*id);
  bool alive = writer->Write(first);
  bool closed = false;
  while (alive && !closed) {
    std::deque<EngineEvent> events;
    closed = q->Take(std::chrono::milliseconds(100), &events);
    for (const auto& ev : events)
      if (!(alive = writer->Write(ToProto(ev)))) break;
    if (ctx->IsCancelled()) alive = false;
  }
  {
    MutexLock lk(&mu_);
    streams_.erase(*id);
  }
  Status st = coord_->UnregisterEngine(*peer, *id);  // NotFound after an explicit UnregisterEngine
  if (!st.ok() && st.code() != Code::kNotFound) spdlog::warn("unregistering {}: {}", *id, st.ToString());
  if (!alive) return grpc::Status(grpc::StatusCode::CANCELLED, "engine stream closed");
  return q->why();
}

grpc::Status WeightSyncService::AckVersion(grpc::ServerContext* ctx, const pb::AckVersionRequest* req,
                                           pb::AckVersionResponse*) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("AckVersion", peer.status());
  Status st = coord_->AckVersion(*peer, req->engine_id(), req->version(), req->ok(), req->error());
  return st.ok() ? grpc::Status::OK : Failed("AckVersion", st);
}

grpc::Status WeightSyncService::AckPaused(grpc::ServerContext* ctx, const pb::AckPausedRequest* req,
                                          pb::AckPausedResponse*) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("AckPaused", peer.status());
  Status st = coord_->AckPaused(*peer, req->engine_id(), req->sync_id());
  return st.ok() ? grpc::Status::OK : Failed("AckPaused", st);
}

grpc::Status WeightSyncService::UnregisterEngine(grpc::ServerContext* ctx, const pb::UnregisterEngineRequest* req,
                                                 pb::UnregisterEngineResponse*) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("UnregisterEngine", peer.status());
  Status st = coord_->UnregisterEngine(*peer, req->engine_id());
  if (!st.ok()) return Failed("UnregisterEngine", st);
  MutexLock lk(&mu_);
  if (auto it = streams_.find(req->engine_id()); it != streams_.end()) it->second->Close(grpc::Status::OK);
  return grpc::Status::OK;
}

grpc::Status WeightSyncService::BeginSync(grpc::ServerContext* ctx, const pb::BeginSyncRequest* req,
                                          pb::BeginSyncResponse* resp) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("BeginSync", peer.status());
  auto manifest = FromProto(*req, coord_->limits());
  if (!manifest.ok()) return Failed("BeginSync", manifest.status());
  auto r = coord_->BeginSync(*peer, std::move(manifest).value());
  if (!r.ok()) return Failed("BeginSync", r.status());
  resp->set_sync_id(r->sync_id);
  resp->set_engines(r->engines);
  resp->set_copy_ops(r->copy_ops);
  resp->set_bytes_planned(r->bytes_planned);
  resp->set_plan_reused(r->plan_reused);
  resp->set_manifest_reused(r->manifest_reused);
  for (const TensorDtypes& d : r->dtypes) {
    pb::TensorDtypes* out = resp->add_dtypes();
    out->set_wire(server::ToProto(d.wire));
    for (DType dst : d.destinations) out->add_destinations(server::ToProto(dst));
  }
  return grpc::Status::OK;
}

grpc::Status WeightSyncService::Push(grpc::ServerContext* ctx,
                                     grpc::ServerReaderWriter<pb::LayerAck, pb::LayerData>* stream) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("Push", peer.status());
  pb::LayerData msg;
  uint64_t sync_id = 0;
  uint32_t rank = 0;
  while (stream->Read(&msg)) {
    if (sync_id == 0) {
      if (msg.sync_id() == 0)
        return Failed("Push", InvalidArgument("the first LayerData of a Push stream must carry sync_id and rank"));
      sync_id = msg.sync_id();
      rank = msg.rank();
    } else if (msg.sync_id() != 0 && (msg.sync_id() != sync_id || msg.rank() != rank)) {
      Status st = InvalidArgument("Push stream of sync " + std::to_string(sync_id) + " rank " + std::to_string(rank) +
                                  " received layer \"" + msg.layer() + "\" for sync " +
                                  std::to_string(msg.sync_id()) + " rank " + std::to_string(msg.rank()));
      (void)coord_->Abort(*peer, sync_id, st.message());
      return Failed("Push", st);
    }
    auto shards = FromProto(msg, coord_->limits());
    if (!shards.ok()) {
      Status st = shards.status().WithContext("sync " + std::to_string(sync_id) + " rank " + std::to_string(rank));
      (void)coord_->Abort(*peer, sync_id, st.message());
      return Failed("Push", st);
    }
    auto r = coord_->PushLayer(*peer, sync_id, rank, msg.layer(), *shards);
    if (!r.ok()) return Failed("Push", r.status());
    pb::LayerAck ack;
    ack.set_layer(r->layer);
    ack.set_bytes_written(r->bytes_written);
    ack.set_seconds(r->seconds);
    if (!stream->Write(ack)) {
      coord_->TrainerStreamClosed(*peer, sync_id, rank, /*clean=*/false);
      return grpc::Status(grpc::StatusCode::CANCELLED, "trainer stream closed");
    }
  }
  bool clean = !ctx->IsCancelled();
  if (sync_id != 0) coord_->TrainerStreamClosed(*peer, sync_id, rank, clean);
  return clean ? grpc::Status::OK : grpc::Status(grpc::StatusCode::CANCELLED, "trainer stream cancelled");
}

grpc::Status WeightSyncService::Commit(grpc::ServerContext* ctx, const pb::CommitRequest* req, pb::CommitResponse* resp) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("Commit", peer.status());
  auto r = coord_->Commit(*peer, req->sync_id());
  if (!r.ok()) return Failed("Commit", r.status());
  ToProto(*r, resp->mutable_stats());
  return grpc::Status::OK;
}

grpc::Status WeightSyncService::Abort(grpc::ServerContext* ctx, const pb::AbortRequest* req, pb::AbortResponse*) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("Abort", peer.status());
  std::string reason = "aborted by the trainer: " + (req->reason().empty() ? std::string("no reason given") : req->reason());
  Status st = coord_->Abort(*peer, req->sync_id(), reason);
  return st.ok() ? grpc::Status::OK : Failed("Abort", st);
}

grpc::Status WeightSyncService::GetStatus(grpc::ServerContext* ctx, const pb::StatusRequest*, pb::StatusResponse* resp) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("GetStatus", peer.status());
  ToProto(coord_->GetStatus(), resp);
  resp->set_daemon_version(WS_VERSION);
  if (peers_ != nullptr) {
    resp->set_node_name(peers_->self());
    ToProto(peers_->Snapshot(), std::chrono::steady_clock::now(), resp->mutable_peers());
  }
  if (cluster_ != nullptr) {
    resp->set_peer_staging_bytes(cluster_->staging_bytes());
    const auto bytes = cluster_->bytes();
    for (auto& p : *resp->mutable_peers())
      if (auto it = bytes.find(p.name()); it != bytes.end()) {
        p.set_bytes_sent(it->second.sent);
        p.set_bytes_received(it->second.received);
      }
  }
  return grpc::Status::OK;
}

grpc::Status WeightSyncService::PeerHello(grpc::ServerContext* ctx, const pb::PeerHelloRequest* req,
                                          pb::PeerHelloResponse* resp) {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return Failed("PeerHello", peer.status());
  const std::string self = peers_ != nullptr ? peers_->self() : "";
  if (!self.empty() && req->node_name() == self)
    return Failed("PeerHello", InvalidArgument("caller " + peer->principal + " says it is node '" + self +
                                               "', which is this daemon's own --node-name: two nodes share a name"));
  resp->set_node_name(self);
  resp->set_daemon_version(WS_VERSION);
  return grpc::Status::OK;
}

// ---------------------------------------------------------------- syncs across nodes

Status WeightSyncService::CheckPeerCall(grpc::ServerContext* ctx, const std::string& leader, const char* rpc) const {
  auto peer = auth_->Identify(ctx);
  if (!peer.ok()) return peer.status();
  if (cluster_ == nullptr || peers_ == nullptr)
    return FailedPrecondition(std::string(rpc) + ": this daemon has no peers (--peer); it joins no sync across nodes");
  for (const auto& p : peers_->Snapshot())
    if (p.spec.name == leader) return Status::Ok();
  return PermissionDenied(std::string(rpc) + " from " + peer->Describe() + " for node '" + leader +
                          "', which is not one of this daemon's peers (--peer)");
}

grpc::Status WeightSyncService::PeerPrepareSync(grpc::ServerContext* ctx, const pb::PeerPrepareSyncRequest* req,
                                                pb::PeerPrepareSyncResponse* resp) {
  if (Status st = CheckPeerCall(ctx, req->leader(), "PeerPrepareSync"); !st.ok()) return Failed("PeerPrepareSync", st);
  auto engines = coord_->PeerPrepare(req->model());
  if (!engines.ok()) return Failed("PeerPrepareSync", engines.status());
  resp->set_node_name(peers_->self());
  for (const auto& e : *engines) ToProto(e, resp->add_engines());
  resp->set_ucx_address(cluster_->ucx_address());
  return grpc::Status::OK;
}

grpc::Status WeightSyncService::PeerStartSync(grpc::ServerContext* ctx, const pb::PeerStartSyncRequest* req,
                                              pb::PeerStartSyncResponse*) {
  if (Status st = CheckPeerCall(ctx, req->leader(), "PeerStartSync"); !st.ok()) return Failed("PeerStartSync", st);
  auto start = FromProto(*req, coord_->limits());
  if (!start.ok()) return Failed("PeerStartSync", start.status());
  std::map<std::string, std::string> addresses;
  // Used only for nodes that are peers here (the link refuses any other).
  for (const auto& [node, address] : req->ucx_addresses()) addresses[node] = address;
  cluster_->Learn(addresses);
  Status st = coord_->PeerStart(std::move(start).value());
  return st.ok() ? grpc::Status::OK : Failed("PeerStartSync", st);
}

grpc::Status WeightSyncService::PeerReceive(grpc::ServerContext* ctx, const pb::PeerReceiveRequest* req,
                                            pb::PeerReceiveResponse* resp) {
  const std::string& from = req->sender().empty() ? req->leader() : req->sender();
  if (Status st = CheckPeerCall(ctx, from, "PeerReceive"); !st.ok()) return Failed("PeerReceive", st);
  std::vector<uint32_t> chunks(req->chunks().begin(), req->chunks().end());
  DeviceTransfer device;
  if (!req->transport().empty()) {
    device.transport = req->transport();
    device.sender_device = req->sender_device();
    device.receiver_device = req->receiver_device();
    device.unique_id = req->unique_id();
    device.generation = req->comm_generation();
    if (device.sender_device.empty() || device.receiver_device.empty() ||
        device.sender_device.size() > coord_->limits().max_name_bytes ||
        device.receiver_device.size() > coord_->limits().max_name_bytes)
      return Failed("PeerReceive", InvalidArgument("PeerReceive from node " + from + ": transport " + device.transport +
                                                   " needs sender_device and receiver_device (GPU UUIDs)"));
  }
  auto r = coord_->PeerReceive(req->leader(), from, req->sync_id(), chunks,
                               device.transport.empty() ? nullptr : &device);
  if (!r.ok()) return Failed("PeerReceive", r.status());
  resp->set_bytes_written(*r);
  return grpc::Status::OK;
}

grpc::Status WeightSyncService::PeerCommitSync(grpc::ServerContext* ctx, const pb::PeerCommitSyncRequest* req,
                                               pb::PeerCommitSyncResponse* resp) {
  if (Status st = CheckPeerCall(ctx, req->leader(), "PeerCommitSync"); !st.ok()) return Failed("PeerCommitSync", st);
  auto r = coord_->PeerCommit(req->leader(), req->sync_id());
  if (!r.ok()) return Failed("PeerCommitSync", r.status());
  resp->set_bytes_written(*r);
  return grpc::Status::OK;
}

grpc::Status WeightSyncService::PeerAbortSync(grpc::ServerContext* ctx, const pb::PeerAbortSyncRequest* req,
                                              pb::PeerAbortSyncResponse*) {
  if (Status st = CheckPeerCall(ctx, req->leader(), "PeerAbortSync"); !st.ok()) return Failed("PeerAbortSync", st);
  Status st = coord_->PeerAbort(req->leader(), req->sync_id(), req->reason());
  return st.ok() ? grpc::Status::OK : Failed("PeerAbortSync", st);
}

}  // namespace ws::server
