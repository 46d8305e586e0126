#include "client/cpp/client.h"

#include <algorithm>

#include <chrono>
#include <fstream>
#include <sstream>

#include "daemon/core/token.h"

namespace ws {
namespace {

std::chrono::system_clock::time_point DeadlineAfter(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(std::chrono::duration<double>(seconds));
}

// Channel credentials for `target`: TLS for host:port when any TLS option is set.
Result<std::shared_ptr<grpc::ChannelCredentials>> Credentials(const std::string& target, const ClientOptions& o) {
  const bool tls = !o.tls_ca_file.empty() || !o.tls_cert_file.empty() || !o.tls_key_file.empty();
  if (!tls || target.rfind("unix:", 0) == 0) return grpc::InsecureChannelCredentials();
  if (o.tls_cert_file.empty() != o.tls_key_file.empty())
    return InvalidArgument("a TLS client certificate needs its key and vice versa (tls cert and key options)");
  grpc::SslCredentialsOptions so;
  if (!o.tls_ca_file.empty()) {
    WS_ASSIGN_OR_RETURN(so.pem_root_certs, ReadPemFile(o.tls_ca_file, "TLS CA file"));
  }
  if (!o.tls_cert_file.empty()) {
    WS_ASSIGN_OR_RETURN(so.pem_cert_chain, ReadPemFile(o.tls_cert_file, "TLS client certificate"));
    WS_ASSIGN_OR_RETURN(so.pem_private_key, ReadPemFile(o.tls_key_file, "TLS client key"));
  }
  return grpc::SslCredentials(so);
}

}  // namespace

std::string NormalizeTarget(const std::string& target) {
  if (!target.empty() && target[0] == '/') return "unix:" + target;
  return target;
}

const char* HealthStateName(HealthState s) {
  switch (s) {
    case HealthState::kServing: return "SERVING";
    case HealthState::kNotServing: return "NOT_SERVING";
    case HealthState::kServiceUnknown: return "SERVICE_UNKNOWN";
    case HealthState::kUnknown: break;
  }
  return "UNKNOWN";
}

// ---- PushStream ---------------------------------------------------------------

Status PushStream::Send(const pb::LayerData& layer) {
  if (done_) return final_.ok() ? FailedPrecondition("push stream already finished") : final_;
  if (rw_->Write(layer)) return Status::Ok();
  Status s = Close();  // the stream broke: the daemon's status says why
  return s.ok() ? Unavailable("push stream closed by the daemon while sending layer " + layer.layer()) : s;
}

Result<pb::LayerAck> PushStream::Read() {
  if (done_) return final_.ok() ? FailedPrecondition("push stream already finished") : final_;
  pb::LayerAck ack;
  if (rw_->Read(&ack)) return ack;
  Status s = Close();
  return s.ok() ? Unavailable("push stream closed by the daemon before acknowledging the layer") : s;
}

Status PushStream::Finish() {
  if (done_) return final_;
  rw_->WritesDone();
  return Close();
}

Status PushStream::Close() {
  if (done_) return final_;
  pb::LayerAck ignored;
  while (rw_->Read(&ignored)) {
  }
  final_ = FromGrpc(rw_->Finish());
  done_ = true;
  return final_;
}

PushStream::~PushStream() {
  if (!done_ && rw_) {
    ctx_.TryCancel();
    (void)Close();
  }
}

// ---- EngineSession ------------------------------------------------------------

Result<pb::EngineEvent> EngineSession::Next() {
  if (done_) return final_;
  pb::EngineEvent ev;
  if (reader_->Read(&ev)) return ev;
  Status s = Close();
  if (s.ok()) final_ = Unavailable("daemon closed the event stream");
  return final_;
}

Status EngineSession::Close() {
  if (done_) return final_;
  pb::EngineEvent ignored;
  while (reader_->Read(&ignored)) {
  }
  final_ = FromGrpc(reader_->Finish());
  done_ = true;
  return final_;
}

EngineSession::~EngineSession() {
  if (!done_ && reader_) {
    ctx_.TryCancel();
    (void)Close();
  }
}

// ---- WeightSyncClient ---------------------------------------------------------

WeightSyncClient::WeightSyncClient(const std::string& target, ClientOptions opts)
    : target_(NormalizeTarget(target)), opts_(std::move(opts)) {
  if (opts_.token.empty() && !opts_.token_file.empty()) {
    auto t = ReadTokenFile(opts_.token_file, /*refuse_other_access=*/false);
    if (t.ok()) opts_.token = std::move(t).value();
    else setup_ = t.status();
  } else if (!opts_.token.empty()) {
    setup_ = ValidateToken(opts_.token, "the token");
  }
  auto creds = Credentials(target_, opts_);
  if (!creds.ok()) setup_ = creds.status();
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of our own
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // The daemon keeps its error messages under 4 KiB; gRPC's default 8 KiB
  // metadata limit would turn a longer one into "metadata size exceeds limit".
  args.SetInt(GRPC_ARG_MAX_METADATA_SIZE, 64 * 1024);
  if (opts_.max_reconnect_backoff_s > 0) {
    const int max_ms = std::max(1, static_cast<int>(opts_.max_reconnect_backoff_s * 1000));
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, std::min(max_ms, 100));
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, std::min(max_ms, 100));
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, max_ms);
  }
  // A channel even when setup failed (calls then return setup_), so stubs are never null.
  channel_ = grpc::CreateCustomChannel(target_, creds.ok() ? *creds : grpc::InsecureChannelCredentials(), args);
  stub_ = pb::WeightSync::NewStub(channel_);
  health_ = grpc::health::v1::Health::NewStub(channel_);
}

Status WeightSyncClient::Connect(double timeout_s) {
  if (!setup_.ok()) return setup_;
  if (channel_->WaitForConnected(DeadlineAfter(timeout_s))) return Status::Ok();
  return Unavailable("cannot connect to " + target_ + " within " + std::to_string(timeout_s) + " s");
}

void WeightSyncClient::Prepare(grpc::ClientContext* ctx) const {
  if (opts_.rpc_timeout_s > 0) ctx->set_deadline(DeadlineAfter(opts_.rpc_timeout_s));
  ctx->set_wait_for_ready(opts_.wait_for_ready);
  AddToken(ctx);
}

void WeightSyncClient::AddToken(grpc::ClientContext* ctx) const {
  if (!opts_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + opts_.token);
}

Result<HealthState> WeightSyncClient::Health(const std::string& service, double timeout_s) {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  if (timeout_s > 0) ctx.set_deadline(DeadlineAfter(timeout_s));
  AddToken(&ctx);
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status s = health_->Check(&ctx, req, &resp);
  if (s.error_code() == grpc::StatusCode::NOT_FOUND) return HealthState::kServiceUnknown;
  if (!s.ok()) return FromGrpc(s);
  switch (resp.status()) {
    case grpc::health::v1::HealthCheckResponse::SERVING: return HealthState::kServing;
    case grpc::health::v1::HealthCheckResponse::NOT_SERVING: return HealthState::kNotServing;
    case grpc::health::v1::HealthCheckResponse::SERVICE_UNKNOWN: return HealthState::kServiceUnknown;
    default: return HealthState::kUnknown;
  }
}

Result<pb::StatusResponse> WeightSyncClient::GetStatus() {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  pb::StatusResponse resp;
  grpc::Status s = stub_->GetStatus(&ctx, pb::StatusRequest(), &resp);
  if (!s.ok()) return FromGrpc(s);
  return resp;
}

Result<pb::PeerHelloResponse> WeightSyncClient::PeerHello(const pb::PeerHelloRequest& req, double timeout_s) {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineAfter(timeout_s));
  AddToken(&ctx);
  pb::PeerHelloResponse resp;
  grpc::Status s = stub_->PeerHello(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s);
  return resp;
}

template <typename Resp, typename Req, typename Method>
Result<Resp> WeightSyncClient::PeerCall(Method method, const Req& req, double timeout_s) {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  ctx.set_deadline(DeadlineAfter(timeout_s));
  AddToken(&ctx);
  Resp resp;
  grpc::Status s = (stub_.get()->*method)(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s);
  return resp;
}

Result<pb::PeerPrepareSyncResponse> WeightSyncClient::PeerPrepareSync(const pb::PeerPrepareSyncRequest& req,
                                                                      double timeout_s) {
  return PeerCall<pb::PeerPrepareSyncResponse>(&pb::WeightSync::Stub::PeerPrepareSync, req, timeout_s);
}
Result<pb::PeerStartSyncResponse> WeightSyncClient::PeerStartSync(const pb::PeerStartSyncRequest& req,
                                                                  double timeout_s) {
  return PeerCall<pb::PeerStartSyncResponse>(&pb::WeightSync::Stub::PeerStartSync, req, timeout_s);
}
Result<pb::PeerReceiveResponse> WeightSyncClient::PeerReceive(const pb::PeerReceiveRequest& req, double timeout_s) {
  return PeerCall<pb::PeerReceiveResponse>(&pb::WeightSync::Stub::PeerReceive, req, timeout_s);
}
Result<pb::PeerCommitSyncResponse> WeightSyncClient::PeerCommitSync(const pb::PeerCommitSyncRequest& req,
                                                                    double timeout_s) {
  return PeerCall<pb::PeerCommitSyncResponse>(&pb::WeightSync::Stub::PeerCommitSync, req, timeout_s);
}
Result<pb::PeerAbortSyncResponse> WeightSyncClient::PeerAbortSync(const pb::PeerAbortSyncRequest& req,
                                                                  double timeout_s) {
  return PeerCall<pb::PeerAbortSyncResponse>(&pb::WeightSync::Stub::PeerAbortSync, req, timeout_s);
}

Result<pb::BeginSyncResponse> WeightSyncClient::BeginSync(const pb::BeginSyncRequest& req) {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  pb::BeginSyncResponse resp;
  grpc::Status s = stub_->BeginSync(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s);
  return resp;
}

Result<std::unique_ptr<PushStream>> WeightSyncClient::OpenPush() {
  if (!setup_.ok()) return setup_;
  std::unique_ptr<PushStream> p(new PushStream());
  AddToken(&p->ctx_);
  p->rw_ = stub_->Push(&p->ctx_);
  if (!p->rw_) return Internal("cannot open a push stream to " + target_);
  return p;
}

Result<pb::CommitResponse> WeightSyncClient::Commit(uint64_t sync_id) {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  pb::CommitRequest req;
  req.set_sync_id(sync_id);
  pb::CommitResponse resp;
  grpc::Status s = stub_->Commit(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s);
  return resp;
}

Status WeightSyncClient::Abort(uint64_t sync_id, const std::string& reason) {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  pb::AbortRequest req;
  req.set_sync_id(sync_id);
  req.set_reason(reason);
  pb::AbortResponse resp;
  return FromGrpc(stub_->Abort(&ctx, req, &resp));
}

Result<std::unique_ptr<EngineSession>> WeightSyncClient::RegisterEngine(const pb::RegisterEngineRequest& req) {
  if (!setup_.ok()) return setup_;
  std::unique_ptr<EngineSession> e(new EngineSession());
  e->ctx_.set_wait_for_ready(opts_.wait_for_ready);
  AddToken(&e->ctx_);
  e->reader_ = stub_->RegisterEngine(&e->ctx_, req);
  if (!e->reader_) return Internal("cannot open the event stream to " + target_);
  pb::EngineEvent ev;
  if (!e->reader_->Read(&ev)) {
    Status s = e->Close();
    return s.ok() ? Unavailable("daemon closed the event stream before confirming the registration") : s;
  }
  if (ev.event_case() != pb::EngineEvent::kRegistered) {
    e->Cancel();
    return Internal("daemon's first event is not \"registered\"");
  }
  e->engine_id_ = ev.registered().engine_id();
  return e;
}

Status WeightSyncClient::AckVersion(const std::string& engine_id, uint64_t version, bool ok,
                                    const std::string& error) {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  pb::AckVersionRequest req;
  req.set_engine_id(engine_id);
  req.set_version(version);
  req.set_ok(ok);
  req.set_error(error);
  pb::AckVersionResponse resp;
  return FromGrpc(stub_->AckVersion(&ctx, req, &resp));
}

Status WeightSyncClient::AckPaused(const std::string& engine_id, uint64_t sync_id) {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  pb::AckPausedRequest req;
  req.set_engine_id(engine_id);
  req.set_sync_id(sync_id);
  pb::AckPausedResponse resp;
  return FromGrpc(stub_->AckPaused(&ctx, req, &resp));
}

Status WeightSyncClient::UnregisterEngine(const std::string& engine_id) {
  if (!setup_.ok()) return setup_;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  pb::UnregisterEngineRequest req;
  req.set_engine_id(engine_id);
  pb::UnregisterEngineResponse resp;
  return FromGrpc(stub_->UnregisterEngine(&ctx, req, &resp));
}

}  // namespace ws
