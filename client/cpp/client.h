// A gRPC client for one weightsync daemon. Each WeightSyncClient owns its own
// channel with a private subchannel pool, so every instance (one per trainer
// or engine rank) gets its own connection.
//
// Errors come back as ws::Status carrying the daemon's message; gRPC codes map
// onto ws::Code one to one (UNKNOWN/DATA_LOSS -> kInternal).
//
// Thread-safety: WeightSyncClient's methods may be called from any thread.
// A PushStream is used by one thread at a time; an EngineSession's Next() by
// one thread, while Cancel() may be called from any thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "daemon/core/dtype.h"
#include "daemon/core/status.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "proto/cpp/protocol.h"
#include "weightsync/v1/weightsync.grpc.pb.h"

namespace ws {

namespace pb = ::weightsync::v1;

// Status codes and dtypes: the protocol library the daemon shares.
using protocol::FromGrpc;
using protocol::ToProto;

// "/path" -> "unix:/path"; everything else unchanged ("unix:/p", "host:port").
std::string NormalizeTarget(const std::string& target);

enum class HealthState { kUnknown, kServing, kNotServing, kServiceUnknown };
const char* HealthStateName(HealthState s);  // "SERVING", ...

struct ClientOptions {
  double rpc_timeout_s = 0;     // deadline of unary calls (not Health); 0 = none
  bool wait_for_ready = false;  // unary calls wait for the channel instead of failing fast
  // Longest wait between reconnect attempts after the target was unreachable
  // (0 = gRPC's default, which grows to 120 s). Daemons talking to peers keep
  // it short, so a peer that restarts is usable again within about this long.
  double max_reconnect_backoff_s = 0;
  // TLS, for host:port targets (unix sockets are never TLS; these are then
  // unused): any of the three set => the channel is TLS.
  std::string tls_ca_file;    // PEM CAs that signed the daemon's certificate ("" = the system's roots)
  std::string tls_cert_file;  // PEM client certificate, for daemons that require one (with tls_key_file)
  std::string tls_key_file;
  // Sent as "authorization: Bearer <token>" on every call, for daemons with --token-file.
  std::string token;
  std::string token_file;  // read at construction when token is empty
};

// One Push stream: Send(LayerData), then Read() its LayerAck.
class PushStream {
 public:
  ~PushStream();
  Status Send(const pb::LayerData& layer);
  // The next ack; an error carries the daemon's final status.
  Result<pb::LayerAck> Read();
  // Half-closes, drains and returns the daemon's final status.
  Status Finish();
  void Cancel() { ctx_.TryCancel(); }

 private:
  friend class WeightSyncClient;
  PushStream() = default;
  Status Close();
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<pb::LayerData, pb::LayerAck>> rw_;
  bool done_ = false;
  Status final_;
};

// A registered engine rank's event stream.
class EngineSession {
 public:
  ~EngineSession();
  const std::string& engine_id() const { return engine_id_; }
  // Blocks for the next event. After the stream ends: the daemon's error, or
  // kUnavailable "daemon closed the event stream", or kCancelled after Cancel().
  Result<pb::EngineEvent> Next();
  // Ends the stream (the daemon drops the registration). Thread-safe.
  void Cancel() { ctx_.TryCancel(); }

 private:
  friend class WeightSyncClient;
  EngineSession() = default;
  Status Close();
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<pb::EngineEvent>> reader_;
  std::string engine_id_;
  bool done_ = false;
  Status final_;
};

class WeightSyncClient {
 public:
  // An unreadable TLS or token file makes every call fail with the reason.
  explicit WeightSyncClient(const std::string& target, ClientOptions opts = {});
  const std::string& target() const { return target_; }
  // Establishes the connection now (it is otherwise made by the first call).
  Status Connect(double timeout_s = 10.0);

  // grpc.health.v1 Check of `service` ("" = the whole server).
  Result<HealthState> Health(const std::string& service = "", double timeout_s = 5.0);
  Result<pb::StatusResponse> GetStatus();
  // Peer daemons: one PeerHello round trip, failing after `timeout_s`.
  Result<pb::PeerHelloResponse> PeerHello(const pb::PeerHelloRequest& req, double timeout_s);
  // Syncs across nodes (the leader daemon calls these on its peers), each
  // failing after `timeout_s`.
  Result<pb::PeerPrepareSyncResponse> PeerPrepareSync(const pb::PeerPrepareSyncRequest& req, double timeout_s);
  Result<pb::PeerStartSyncResponse> PeerStartSync(const pb::PeerStartSyncRequest& req, double timeout_s);
  Result<pb::PeerReceiveResponse> PeerReceive(const pb::PeerReceiveRequest& req, double timeout_s);
  Result<pb::PeerCommitSyncResponse> PeerCommitSync(const pb::PeerCommitSyncRequest& req, double timeout_s);
  Result<pb::PeerAbortSyncResponse> PeerAbortSync(const pb::PeerAbortSyncRequest& req, double timeout_s);

  // Trainer.
  Result<pb::BeginSyncResponse> BeginSync(const pb::BeginSyncRequest& req);
  Result<std::unique_ptr<PushStream>> OpenPush();
  Result<pb::CommitResponse> Commit(uint64_t sync_id);
  Status Abort(uint64_t sync_id, const std::string& reason);

  // Engine. Returns once the daemon has sent `registered`; a refused
  // registration is the daemon's error.
  Result<std::unique_ptr<EngineSession>> RegisterEngine(const pb::RegisterEngineRequest& req);
  Status AckVersion(const std::string& engine_id, uint64_t version, bool ok, const std::string& error = "");
  // After `started` (engines registered with acks_pause): this engine paused.
  Status AckPaused(const std::string& engine_id, uint64_t sync_id);
  Status UnregisterEngine(const std::string& engine_id);

 private:
  void Prepare(grpc::ClientContext* ctx) const;
  template <typename Resp, typename Req, typename Method>
  Result<Resp> PeerCall(Method method, const Req& req, double timeout_s);
  void AddToken(grpc::ClientContext* ctx) const;
  std::string target_;
  ClientOptions opts_;
  Status setup_;  // why the channel could not be set up (a TLS or token file)
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::WeightSync::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

}  // namespace ws
