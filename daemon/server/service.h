// The gRPC face of the daemon: weightsync.v1.WeightSync on the synchronous
// gRPC API, a thin layer over Coordinator (conversion in convert.h).
//
// Thread-safety: gRPC calls the handlers concurrently; the service's own
// state (the open engine streams) is guarded by mu_. Never calls into the
// Coordinator while holding mu_ or a stream's queue lock.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>

#include "daemon/cluster/peers.h"
#include "daemon/core/thread_annotations.h"
#include "daemon/server/auth.h"
#include "daemon/server/coordinator.h"
#include "weightsync/v1/weightsync.grpc.pb.h"

namespace ws::server {

class GrpcClusterLink;  // daemon/server/grpc_cluster_link.h

class WeightSyncService final : public ::weightsync::v1::WeightSync::Service {
 public:
  // `auth` identifies the caller of every RPC; `peers` (may be null: no node
  // name, no peers) is this node's view of the deployment. All must outlive
  // the service.
  // `cluster` (may be null) serves syncs across nodes.
  WeightSyncService(Coordinator* coordinator, const Authenticator* auth, const cluster::PeerSet* peers = nullptr,
                    GrpcClusterLink* cluster = nullptr);
  ~WeightSyncService() override;

  // Ends every engine event stream once its queued events (e.g. the Aborted
  // from Coordinator::AbortAll) are written. Call before Server::Shutdown.
  void BeginShutdown();

  grpc::Status RegisterEngine(grpc::ServerContext* ctx, const ::weightsync::v1::RegisterEngineRequest* req,
                              grpc::ServerWriter<::weightsync::v1::EngineEvent>* writer) override;
  grpc::Status AckVersion(grpc::ServerContext* ctx, const ::weightsync::v1::AckVersionRequest* req,
                          ::weightsync::v1::AckVersionResponse* resp) override;
  grpc::Status AckPaused(grpc::ServerContext* ctx, const ::weightsync::v1::AckPausedRequest* req,
                         ::weightsync::v1::AckPausedResponse* resp) override;
  grpc::Status UnregisterEngine(grpc::ServerContext* ctx, const ::weightsync::v1::UnregisterEngineRequest* req,
                                ::weightsync::v1::UnregisterEngineResponse* resp) override;
  grpc::Status BeginSync(grpc::ServerContext* ctx, const ::weightsync::v1::BeginSyncRequest* req,
                         ::weightsync::v1::BeginSyncResponse* resp) override;
  grpc::Status Push(grpc::ServerContext* ctx,
                    grpc::ServerReaderWriter<::weightsync::v1::LayerAck, ::weightsync::v1::LayerData>* stream) override;
  grpc::Status Commit(grpc::ServerContext* ctx, const ::weightsync::v1::CommitRequest* req,
                      ::weightsync::v1::CommitResponse* resp) override;
  grpc::Status Abort(grpc::ServerContext* ctx, const ::weightsync::v1::AbortRequest* req,
                     ::weightsync::v1::AbortResponse* resp) override;
  grpc::Status GetStatus(grpc::ServerContext* ctx, const ::weightsync::v1::StatusRequest* req,
                         ::weightsync::v1::StatusResponse* resp) override;
  grpc::Status PeerHello(grpc::ServerContext* ctx, const ::weightsync::v1::PeerHelloRequest* req,
                         ::weightsync::v1::PeerHelloResponse* resp) override;
  grpc::Status PeerPrepareSync(grpc::ServerContext* ctx, const ::weightsync::v1::PeerPrepareSyncRequest* req,
                               ::weightsync::v1::PeerPrepareSyncResponse* resp) override;
  grpc::Status PeerStartSync(grpc::ServerContext* ctx, const ::weightsync::v1::PeerStartSyncRequest* req,
                             ::weightsync::v1::PeerStartSyncResponse* resp) override;
  grpc::Status PeerReceive(grpc::ServerContext* ctx, const ::weightsync::v1::PeerReceiveRequest* req,
                           ::weightsync::v1::PeerReceiveResponse* resp) override;
  grpc::Status PeerCommitSync(grpc::ServerContext* ctx, const ::weightsync::v1::PeerCommitSyncRequest* req,
                              ::weightsync::v1::PeerCommitSyncResponse* resp) override;
  grpc::Status PeerAbortSync(grpc::ServerContext* ctx, const ::weightsync::v1::PeerAbortSyncRequest* req,
                             ::weightsync::v1::PeerAbortSyncResponse* resp) override;

 private:
  class EventQueue;

  Coordinator* const coord_;
  const Authenticator* const auth_;
  const cluster::PeerSet* const peers_;
  GrpcClusterLink* const cluster_;
  // Peer RPCs: the caller is authenticated and names a configured peer.
  Status CheckPeerCall(grpc::ServerContext* ctx, const std::string& leader, const char* rpc) const;
  std::atomic<bool> stopping_{false};
  Mutex mu_;
  std::map<std::string, std::shared_ptr<EventQueue>> streams_ WS_GUARDED_BY(mu_);  // engine id -> its open stream
};

}  // namespace ws::server
