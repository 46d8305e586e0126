// WeightSyncClient against an in-process fake daemon on a unix socket.
#include "client/cpp/client.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

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

class FakeDaemon final : public pb::WeightSync::Service {
 public:
  std::atomic<int> acks{0};
  std::atomic<uint64_t> last_ack_version{0};

  grpc::Status GetStatus(grpc::ServerContext*, const pb::StatusRequest*, pb::StatusResponse* resp) override {
    resp->set_daemon_version("fake");
    return grpc::Status::OK;
  }
  grpc::Status BeginSync(grpc::ServerContext*, const pb::BeginSyncRequest* req, pb::BeginSyncResponse* resp) override {
    if (req->model() == "bad")
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "tensor \"x\": shape [2] differs from [3]");
    resp->set_sync_id(7);
    resp->set_engines(2);
    return grpc::Status::OK;
  }
  grpc::Status Push(grpc::ServerContext*, grpc::ServerReaderWriter<pb::LayerAck, pb::LayerData>* rw) override {
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
  grpc::Status Commit(grpc::ServerContext*, const pb::CommitRequest* req, pb::CommitResponse* resp) override {
    resp->mutable_stats()->set_sync_id(req->sync_id());
    resp->mutable_stats()->set_state("committed");
    return grpc::Status::OK;
  }
  grpc::Status RegisterEngine(grpc::ServerContext* ctx, const pb::RegisterEngineRequest* req,
                              grpc::ServerWriter<pb::EngineEvent>* w) override {
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
  grpc::Status AckVersion(grpc::ServerContext*, const pb::AckVersionRequest* req, pb::AckVersionResponse*) override {
    if (req->engine_id().empty()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "no engine \"\"");
    ++acks;
    last_ack_version = req->version();
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
  for (DType d : {DType::kF32, DType::kBF16, DType::kF16}) EXPECT_EQ(FromProto(ToProto(d)), d);
  EXPECT_FALSE(FromProto(pb::DTYPE_UNSPECIFIED).has_value());
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "x")).code(), Code::kResourceExhausted);
  EXPECT_EQ(FromGrpc(grpc::Status(grpc::StatusCode::DATA_LOSS, "x")).code(), Code::kInternal);
  EXPECT_TRUE(FromGrpc(grpc::Status::OK).ok());
}

}  // namespace
}  // namespace ws
