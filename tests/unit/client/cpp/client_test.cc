// WeightSyncClient against an in-process fake daemon on a unix socket.
#include "client/cpp/client.h"

#include <unistd.h>

#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <mutex>
#include <set>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "tests/unit/tls_certs.h"

namespace ws {
namespace {

class FakeHealth final : public grpc::health::v1::Health::Service {
  grpc::Status Check(grpc::ServerContext*, const grpc::health::v1::HealthCheckRequest* req,
                     grpc::health::v1::HealthCheckResponse* resp) override {
    if (req->service() == "down") {
      resp->set_status(grpc::health::v1::HealthCheckResponse::NOT_SERVING);
      return grpc::Status::OK;
    }
    if (!req->service().empty()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service");
    resp->set_status(grpc::health::v1::HealthCheckResponse::SERVING);
    return grpc::Status::OK;
  }
};

// The "authorization" metadata of every call, as "Method: value" ("-" when absent).
class AuthLog {
 public:
  void Record(const char* method, const grpc::ServerContext* ctx) {
    auto it = ctx->client_metadata().find("authorization");
    std::string v = it == ctx->client_metadata().end() ? "-" : std::string(it->second.data(), it->second.size());
    std::lock_guard lk(mu_);
    seen_.insert(std::string(method) + ": " + v);
  }
  std::set<std::string> seen() {
    std::lock_guard lk(mu_);
    return seen_;
  }

 private:
  std::mutex mu_;
  std::set<std::string> seen_;
};

class FakeDaemon final : public pb::WeightSync::Service {
 public:
  std::atomic<int> acks{0};
  std::atomic<uint64_t> last_ack_version{0};
  AuthLog auth;

  grpc::Status GetStatus(grpc::ServerContext* ctx, const pb::StatusRequest*, pb::StatusResponse* resp) override {
    auth.Record("GetStatus", ctx);
    resp->set_daemon_version("fake");
    return grpc::Status::OK;
  }
  grpc::Status BeginSync(grpc::ServerContext* ctx, const pb::BeginSyncRequest* req, pb::BeginSyncResponse* resp) override {
    auth.Record("BeginSync", ctx);
    if (req->model() == "bad")
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "tensor \"x\": shape [2] differs from [3]");
    resp->set_sync_id(7);
    resp->set_engines(2);
    return grpc::Status::OK;
  }
  grpc::Status Push(grpc::ServerContext* ctx, grpc::ServerReaderWriter<pb::LayerAck, pb::LayerData>* rw) override {
    auth.Record("Push", ctx);
    pb::LayerData msg;
    while (rw->Read(&msg)) {
      if (msg.layer() == "fail")
        return grpc::Status(grpc::StatusCode::OUT_OF_RANGE, "memory ref of \"" + msg.shards(0).tensor() + "\" is past the end");
      pb::LayerAck ack;
      ack.set_layer(msg.layer());
      ack.set_bytes_written(static_cast<uint64_t>(msg.shards_size()));
      rw->Write(ack);
    }
    return grpc::Status::OK;
  }
  grpc::Status Commit(grpc::ServerContext* ctx, const pb::CommitRequest* req, pb::CommitResponse* resp) override {
    auth.Record("Commit", ctx);
    resp->mutable_stats()->set_sync_id(req->sync_id());
    resp->mutable_stats()->set_state("committed");
    return grpc::Status::OK;
  }
  grpc::Status RegisterEngine(grpc::ServerContext* ctx, const pb::RegisterEngineRequest* req,
                              grpc::ServerWriter<pb::EngineEvent>* w) override {
    auth.Record("RegisterEngine", ctx);
    if (req->model() == "refuse")
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "num_attention_heads (4) must be divisible by tp_size (3)");
    pb::EngineEvent ev;
    ev.mutable_registered()->set_engine_id("e-" + std::to_string(req->tp_rank()));
    w->Write(ev);
    ev.mutable_started()->set_version(3);
    w->Write(ev);
    ev.mutable_committed()->set_version(3);
    w->Write(ev);
    if (req->model() == "close") return grpc::Status::OK;
    while (!ctx->IsCancelled()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    return grpc::Status::CANCELLED;
  }
  grpc::Status AckVersion(grpc::ServerContext* ctx, const pb::AckVersionRequest* req, pb::AckVersionResponse*) override {
    auth.Record("AckVersion", ctx);
    if (req->engine_id().empty()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "no engine \"\"");
    ++acks;
    last_ack_version = req->version();
    return grpc::Status::OK;
  }
  grpc::Status Abort(grpc::ServerContext* ctx, const pb::AbortRequest*, pb::AbortResponse*) override {
    auth.Record("Abort", ctx);
    return grpc::Status::OK;
  }
  grpc::Status UnregisterEngine(grpc::ServerContext* ctx, const pb::UnregisterEngineRequest*,
                                pb::UnregisterEngineResponse*) override {
    auth.Record("UnregisterEngine", ctx);
    return grpc::Status::OK;
  }
};

class ClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    target_ = "unix:/tmp/ws-client-test-" + std::to_string(::getpid()) + ".sock";
    grpc::ServerBuilder b;
    b.AddListeningPort(target_, grpc::InsecureServerCredentials());
    b.RegisterService(&daemon_);
    b.RegisterService(&health_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override {
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    ::unlink(target_.substr(5).c_str());
  }
  std::string target_;
  FakeDaemon daemon_;
  FakeHealth health_;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(ClientTest, HealthAndStatus) {
  WeightSyncClient c(target_);
  EXPECT_TRUE(c.Connect(5).ok());
  auto h = c.Health();
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(*h, HealthState::kServing);
  EXPECT_EQ(*c.Health("down"), HealthState::kNotServing);
  EXPECT_EQ(*c.Health("other"), HealthState::kServiceUnknown);
  auto s = c.GetStatus();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->daemon_version(), "fake");
}

TEST_F(ClientTest, ServerErrorsKeepCodeAndMessage) {
  WeightSyncClient c(target_);
  pb::BeginSyncRequest req;
  req.set_model("bad");
  auto r = c.BeginSync(req);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "tensor \"x\": shape [2] differs from [3]");
  Status a = c.AckVersion("", 1, true);
  EXPECT_EQ(a.code(), Code::kNotFound);
}

TEST_F(ClientTest, PushStream) {
  WeightSyncClient c(target_);
  pb::BeginSyncRequest req;
  auto begun = c.BeginSync(req);
  ASSERT_TRUE(begun.ok());
  EXPECT_EQ(begun->sync_id(), 7u);
  auto p = c.OpenPush();
  ASSERT_TRUE(p.ok());
  for (int i = 0; i < 3; ++i) {
    pb::LayerData msg;
    msg.set_sync_id(7);
    msg.set_layer("model.layers." + std::to_string(i));
    msg.add_shards()->set_tensor("t");
    msg.add_shards()->set_tensor("u");
    ASSERT_TRUE((*p)->Send(msg).ok());
    auto ack = (*p)->Read();
    ASSERT_TRUE(ack.ok()) << ack.status().ToString();
    EXPECT_EQ(ack->layer(), msg.layer());
    EXPECT_EQ(ack->bytes_written(), 2u);
  }
  EXPECT_TRUE((*p)->Finish().ok());
  auto committed = c.Commit(7);
  ASSERT_TRUE(committed.ok());
  EXPECT_EQ(committed->stats().state(), "committed");

  auto q = c.OpenPush();
  ASSERT_TRUE(q.ok());
  pb::LayerData bad;
  bad.set_layer("fail");
  bad.add_shards()->set_tensor("model.embed_tokens.weight");
  ASSERT_TRUE((*q)->Send(bad).ok());
  auto ack = (*q)->Read();
  ASSERT_FALSE(ack.ok());
  EXPECT_EQ(ack.status().code(), Code::kOutOfRange);
  EXPECT_NE(ack.status().message().find("model.embed_tokens.weight"), std::string::npos);
  // Later calls keep returning the stream's final status.
  EXPECT_EQ((*q)->Send(bad).code(), Code::kOutOfRange);
}

TEST_F(ClientTest, RegisterEngineEventsAndCancel) {
  WeightSyncClient c(target_);
  pb::RegisterEngineRequest req;
  req.set_model("refuse");
  auto refused = c.RegisterEngine(req);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
  EXPECT_EQ(refused.status().message(), "num_attention_heads (4) must be divisible by tp_size (3)");

  req.set_model("m");
  req.set_tp_rank(1);
  auto s = c.RegisterEngine(req);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ((*s)->engine_id(), "e-1");
  auto ev = (*s)->Next();
  ASSERT_TRUE(ev.ok());
  EXPECT_TRUE(ev->has_started());
  ev = (*s)->Next();
  ASSERT_TRUE(ev.ok());
  ASSERT_TRUE(ev->has_committed());
  EXPECT_TRUE(c.AckVersion((*s)->engine_id(), ev->committed().version(), true).ok());
  EXPECT_EQ(daemon_.last_ack_version.load(), 3u);
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    (*s)->Cancel();
  });
  ev = (*s)->Next();  // blocks until cancelled
  canceller.join();
  ASSERT_FALSE(ev.ok());
  EXPECT_EQ(ev.status().code(), Code::kCancelled);

  req.set_model("close");
  auto closed = c.RegisterEngine(req);
  ASSERT_TRUE(closed.ok());
  ASSERT_TRUE((*closed)->Next().ok());
  ASSERT_TRUE((*closed)->Next().ok());
  auto end = (*closed)->Next();
  ASSERT_FALSE(end.ok());
  EXPECT_EQ(end.status().code(), Code::kUnavailable);
}

// Every call the client makes carries the token.
void CallEverything(WeightSyncClient& c) {
  EXPECT_TRUE(c.GetStatus().ok());
  EXPECT_TRUE(c.BeginSync(pb::BeginSyncRequest()).ok());
  auto p = c.OpenPush();
  ASSERT_TRUE(p.ok());
  EXPECT_TRUE((*p)->Finish().ok());
  EXPECT_TRUE(c.Commit(7).ok());
  EXPECT_TRUE(c.Abort(7, "x").ok());
  pb::RegisterEngineRequest req;
  req.set_model("close");
  auto e = c.RegisterEngine(req);
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  EXPECT_TRUE(c.AckVersion("e-0", 3, true).ok());
  EXPECT_TRUE(c.UnregisterEngine("e-0").ok());
}

TEST_F(ClientTest, TokenOnEveryCall) {
  ClientOptions o;
  o.token = "t0ken";
  WeightSyncClient c(target_, o);
  CallEverything(c);
  const std::set<std::string> want = {"GetStatus: Bearer t0ken", "BeginSync: Bearer t0ken", "Push: Bearer t0ken",
                                      "Commit: Bearer t0ken",    "Abort: Bearer t0ken",     "RegisterEngine: Bearer t0ken",
                                      "AckVersion: Bearer t0ken", "UnregisterEngine: Bearer t0ken"};
  EXPECT_EQ(daemon_.auth.seen(), want);

  WeightSyncClient none(target_);
  EXPECT_TRUE(none.GetStatus().ok());
  EXPECT_EQ(daemon_.auth.seen().count("GetStatus: -"), 1u);
}

TEST_F(ClientTest, TokenFile) {
  char dir[] = "/tmp/ws-client-token-XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/token";
  std::ofstream(path) << "from-file\n";
  ClientOptions o;
  o.token_file = path;
  WeightSyncClient c(target_, o);
  EXPECT_TRUE(c.GetStatus().ok());
  EXPECT_EQ(daemon_.auth.seen().count("GetStatus: Bearer from-file"), 1u);

  // An unreadable token file fails every call, naming the file.
  o.token_file = std::string(dir) + "/missing";
  WeightSyncClient bad(target_, o);
  auto s = bad.GetStatus();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find(o.token_file), std::string::npos) << s.status().ToString();
  EXPECT_FALSE(bad.Connect(1).ok());
  EXPECT_FALSE(bad.Health().ok());
  EXPECT_FALSE(bad.OpenPush().ok());
  std::system(("rm -rf '" + std::string(dir) + "'").c_str());
}

TEST(ClientTls, TcpTargetsUseTlsWhenAsked) {
  WS_REQUIRE_TEST_CERTS(certs);
  FakeDaemon daemon;
  FakeHealth health;
  grpc::SslServerCredentialsOptions so(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  so.pem_root_certs = certs->Pem("ca.pem");
  so.pem_key_cert_pairs.push_back({certs->Pem("server.key"), certs->Pem("server.pem")});
  grpc::ServerBuilder b;
  int port = 0;
  b.AddListeningPort("127.0.0.1:0", grpc::SslServerCredentials(so), &port);
  b.RegisterService(&daemon);
  b.RegisterService(&health);
  auto server = b.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);
  const std::string target = "127.0.0.1:" + std::to_string(port);

  ClientOptions o;
  o.tls_ca_file = certs->Path("ca.pem");
  o.tls_cert_file = certs->Path("client.pem");
  o.tls_key_file = certs->Path("client.key");
  {
    WeightSyncClient c(target, o);
    auto h = c.Health("", 5);
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_EQ(*h, HealthState::kServing);
    EXPECT_TRUE(c.GetStatus().ok());
  }
  {
    WeightSyncClient plaintext(target);
    EXPECT_FALSE(plaintext.Health("", 2).ok());
  }
  {
    ClientOptions no_cert = o;
    no_cert.tls_cert_file.clear();
    no_cert.tls_key_file.clear();
    WeightSyncClient c(target, no_cert);
    EXPECT_FALSE(c.Health("", 2).ok());  // the server requires a client certificate
  }
  {
    ClientOptions half = o;
    half.tls_key_file.clear();
    WeightSyncClient c(target, half);
    auto s = c.GetStatus();
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.status().code(), Code::kInvalidArgument) << s.status().ToString();
  }
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

TEST_F(ClientTest, TlsOptionsDoNotApplyToUnixSockets) {
  ClientOptions o;
  o.tls_ca_file = "/nonexistent-ca.pem";  // never read: unix sockets are plaintext
  WeightSyncClient c(target_, o);
  EXPECT_TRUE(c.GetStatus().ok());
}

TEST(ClientNoServer, UnreachableIsUnavailable) {
  WeightSyncClient c("/tmp/ws-client-test-no-such.sock");
  EXPECT_EQ(c.target(), "unix:/tmp/ws-client-test-no-such.sock");
  EXPECT_EQ(c.Connect(0.3).code(), Code::kUnavailable);
  auto h = c.Health("", 2.0);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), Code::kUnavailable);
  auto s = c.GetStatus();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), Code::kUnavailable);
}

TEST(ClientConvert, DTypes) {
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) EXPECT_EQ(*protocol::FromProto(ToProto(d), "x"), d);
  EXPECT_FALSE(protocol::FromProto(pb::DTYPE_UNSPECIFIED, "x").ok());
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "x")).code(), Code::kResourceExhausted);
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "x")).code(), Code::kPermissionDenied);
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "x")).code(), Code::kUnauthenticated);
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::DATA_LOSS, "x")).code(), Code::kInternal);
  EXPECT_TRUE(FromGrpc(grpc::Status::OK).ok());
}

}  // namespace
}  // namespace ws
