// The gRPC layer end to end over a unix socket: real channel and stubs, the
// real host shm domain and host executor behind the coordinator.
#include "daemon/server/service.h"

#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <thread>

#include "daemon/server/server.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "tests/unit/server/fakes.h"
#include "weightsync/v1/weightsync.grpc.pb.h"

namespace ws::server::testing {
namespace {

namespace pb = ::weightsync::v1;
using namespace std::chrono_literals;

constexpr int64_t H = 4, V = 6, NL = 2, PER = 8;  // tp_size 1: vocab padded to 8 rows

// One engine: RegisterEngine stream read on a thread; acks Committed events.
class EngineClient {
 public:
  EngineClient(pb::WeightSync::Stub* stub, pb::RegisterEngineRequest req, bool ack_ok = true) : stub_(stub) {
    thread_ = std::thread([this, req, ack_ok] {
      auto reader = stub_->RegisterEngine(&ctx_, req);
      pb::EngineEvent ev;
      while (reader->Read(&ev)) {
        std::lock_guard lk(mu_);
        events_.push_back(ev);
        if (ev.has_registered()) id_ = ev.registered().engine_id();
        if (ev.has_committed()) {
          pb::AckVersionRequest ack;
          ack.set_engine_id(id_);
          ack.set_version(ev.committed().version());
          ack.set_ok(ack_ok);
          if (!ack_ok) ack.set_error("engine refused");
          grpc::ClientContext actx;
          pb::AckVersionResponse aresp;
          ack_status_ = stub_->AckVersion(&actx, ack, &aresp);
        }
        cv_.notify_all();
      }
      std::lock_guard lk(mu_);
      final_ = reader->Finish();
      done_ = true;
      cv_.notify_all();
    });
  }
  ~EngineClient() {
    ctx_.TryCancel();
    thread_.join();
  }
  // Waits until `pred(events)` holds or the stream ended.
  bool Wait(std::function<bool(const std::vector<pb::EngineEvent>&)> pred, std::chrono::milliseconds t = 10s) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, t, [&] { return pred(events_); });
  }
  bool WaitRegistered() {
    return Wait([](const auto& e) { return !e.empty(); }) && events_[0].has_registered();
  }
  grpc::Status WaitEnd(std::chrono::milliseconds t = 10s) {
    std::unique_lock lk(mu_);
    EXPECT_TRUE(cv_.wait_for(lk, t, [&] { return done_; })) << "engine stream did not end";
    return final_;
  }
  std::string kinds() {
    std::lock_guard lk(mu_);
    std::string s;
    for (const auto& e : events_)
      s += e.has_registered() ? 'R' : e.has_started() ? 'S' : e.has_committed() ? 'C' : 'A';
    return s;
  }
  pb::EngineEvent last() {
    std::lock_guard lk(mu_);
    return events_.back();
  }
  std::string id() {
    std::lock_guard lk(mu_);
    return id_;
  }
  void Cancel() { ctx_.TryCancel(); }

 private:
  pb::WeightSync::Stub* stub_;
  grpc::ClientContext ctx_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<pb::EngineEvent> events_;
  std::string id_;
  grpc::Status ack_status_;
  grpc::Status final_;
  bool done_ = false;
};

bool HasKind(const std::vector<pb::EngineEvent>& ev, char k) {
  for (const auto& e : ev)
    if ((k == 'C' && e.has_committed()) || (k == 'A' && e.has_aborted()) || (k == 'S' && e.has_started())) return true;
  return false;
}

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ws-service-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    sock_ = dir_ + "/ws.sock";
    auto reg = LayoutRegistry::LoadTexts({{"toy.json", kToyRules}});
    ASSERT_TRUE(reg.ok()) << reg.status().ToString();
    CoordinatorOptions co;
    co.ack_timeout = 5s;
    coord_ = std::make_unique<Coordinator>(*reg, domain_.get(), exec_.get(), co);
    ServerOptions so;
    so.listen = {"unix:" + sock_};
    server_ = std::make_unique<Server>(coord_.get(), so);
    Status st = server_->Start();
    ASSERT_TRUE(st.ok()) << st.ToString();
    channel_ = grpc::CreateChannel("unix:" + sock_, grpc::InsecureChannelCredentials());
    stub_ = pb::WeightSync::NewStub(channel_);
    MakeData();
  }
  void TearDown() override {
    engines_.clear();
    if (server_) server_->Stop(1s);
    ::unlink(sock_.c_str());
    ::rmdir(dir_.c_str());
  }

  void MakeData() {
    auto add = [&](const std::string& n, Shape s) {
      std::vector<float> d;
      for (int64_t i = 0; i < NumElements(s); ++i) d.push_back(static_cast<float>((names_.size() * 31 + i) % 200 - 100));
      names_.push_back(n);
      shapes_[n] = s;
      data_[n] = d;
    };
    add("embed.weight", {V, H});
    for (int L = 0; L < NL; ++L) {
      std::string p = "layers." + std::to_string(L);
      add(p + ".q.weight", {H, H});
      add(p + ".k.weight", {H, H});
      add(p + ".norm.weight", {H});
    }
    // Two trainer ranks: rank r holds rows [r*c, min((r+1)*c, rows)) of each tensor.
    for (uint32_t r = 0; r < 2; ++r) {
      std::vector<uint8_t> bytes;
      for (const auto& n : names_) {
        int64_t rows = shapes_[n][0], row = NumElements(shapes_[n]) / rows, c = (rows + 1) / 2;
        int64_t a = std::min(r * c, rows), b = std::min((r + 1) * c, rows);
        offsets_[r][n] = {bytes.size(), static_cast<uint64_t>((b - a) * row * 4)};
        auto* p = reinterpret_cast<const uint8_t*>(data_[n].data() + a * row);
        bytes.insert(bytes.end(), p, p + (b - a) * row * 4);
      }
      shm_.Add("/trainer" + std::to_string(r), bytes);
    }
  }

  pb::RegisterEngineRequest EngineRequest(uint32_t replica) {
    pb::RegisterEngineRequest req;
    req.set_model("toy");
    req.set_architecture("ToyForCausalLM");
    req.set_hf_config_json(kToyConfig);
    req.set_replica_id(replica);
    req.set_tp_size(1);
    req.set_engine_label("test-engine-" + std::to_string(replica));
    std::vector<std::pair<std::string, Shape>> params = {{"embed.weight", {PER, H}}};
    for (int L = 0; L < NL; ++L) {
      params.push_back({"layers." + std::to_string(L) + ".qk.weight", {2 * H, H}});
      params.push_back({"layers." + std::to_string(L) + ".norm.weight", {H}});
    }
    std::string buf = "/engine" + std::to_string(replica);
    uint64_t off = 0;
    for (const auto& [name, shape] : params) {
      auto* p = req.add_params();
      p->set_name(name);
      for (int64_t d : shape) p->add_shape(d);
      p->set_dtype(pb::DTYPE_BF16);
      auto* m = p->mutable_memory()->mutable_host_shm();
      m->set_name(buf);
      m->set_offset(off);
      m->set_length(NumElements(shape) * 2);
      off += NumElements(shape) * 2;
    }
    std::fill_n(shm_.Add(buf, off), off, 0xAB);
    return req;
  }

  std::vector<uint8_t> Expected() {
    std::vector<uint8_t> out;
    auto put = [&](float f) {
      uint16_t b = kernels::F32ToBF16(f);
      out.push_back(b & 0xff);
      out.push_back(b >> 8);
    };
    for (int64_t i = 0; i < PER * H; ++i) put(i < V * H ? data_["embed.weight"][i] : 0.0f);
    for (int L = 0; L < NL; ++L) {
      std::string p = "layers." + std::to_string(L);
      for (const char* part : {".q.weight", ".k.weight", ".norm.weight"})
        for (float f : data_[p + part]) put(f);
    }
    return out;
  }

  pb::BeginSyncRequest Manifest(uint64_t version) {
    pb::BeginSyncRequest req;
    req.set_model("toy");
    req.set_version(version);
    req.set_world_size(2);
    for (const auto& n : names_) {
      auto* t = req.add_tensors();
      t->set_name(n);
      for (int64_t d : shapes_[n]) t->add_shape(d);
      t->set_dtype(pb::DTYPE_F32);
      int64_t rows = shapes_[n][0], c = (rows + 1) / 2;
      for (uint32_t r = 0; r < 2; ++r) {
        auto* s = t->add_shards();
        s->set_rank(r);
        s->set_start(std::min(r * c, rows));
        s->set_length(std::min((r + 1) * c, rows) - std::min(r * c, rows));
      }
    }
    return req;
  }

  // One LayerData per tensor (a "layer" of one) for trainer rank r.
  std::vector<pb::LayerData> Layers(uint64_t sync_id, uint32_t r) {
    std::vector<pb::LayerData> v;
    for (const auto& n : names_) {
      auto [off, len] = offsets_[r][n];
      if (len == 0) continue;
      pb::LayerData l;
      if (v.empty()) {
        l.set_sync_id(sync_id);
        l.set_rank(r);
      }
      l.set_layer(n);
      auto* s = l.add_shards();
      s->set_tensor(n);
      auto* m = s->mutable_memory()->mutable_host_shm();
      m->set_name("/trainer" + std::to_string(r));
      m->set_offset(off);
      m->set_length(len);
      v.push_back(l);
    }
    return v;
  }

  grpc::Status PushRank(uint64_t sync_id, uint32_t r, int* acks) {
    grpc::ClientContext ctx;
    auto stream = stub_->Push(&ctx);
    pb::LayerAck ack;
    *acks = 0;
    for (const auto& l : Layers(sync_id, r)) {
      if (!stream->Write(l)) break;
      if (!stream->Read(&ack)) break;
      EXPECT_EQ(ack.layer(), l.layer());
      ++*acks;
    }
    stream->WritesDone();
    return stream->Finish();
  }

  std::string dir_, sock_;
  ws::testing::ShmDir shm_;
  std::unique_ptr<MemoryDomain> domain_ = ws::testing::WrappedHostDomain(shm_);
  std::unique_ptr<Executor> exec_ = ws::testing::WrappedHostExecutor();
  std::unique_ptr<Coordinator> coord_;
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pb::WeightSync::Stub> stub_;
  std::vector<std::unique_ptr<EngineClient>> engines_;
  std::vector<std::string> names_;
  std::map<std::string, Shape> shapes_;
  std::map<std::string, std::vector<float>> data_;
  std::map<std::string, std::pair<uint64_t, uint64_t>> offsets_[2];
};

TEST_F(ServiceTest, SyncOverGrpc) {
  for (uint32_t rep = 0; rep < 2; ++rep) {
    engines_.push_back(std::make_unique<EngineClient>(stub_.get(), EngineRequest(rep)));
    ASSERT_TRUE(engines_.back()->WaitRegistered());
  }
  grpc::ClientContext bctx;
  pb::BeginSyncResponse begun;
  grpc::Status s = stub_->BeginSync(&bctx, Manifest(3), &begun);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(begun.engines(), 2u);

  int acks0 = 0, acks1 = 0;
  grpc::Status p0, p1;
  std::thread t0([&] { p0 = PushRank(begun.sync_id(), 0, &acks0); });
  std::thread t1([&] { p1 = PushRank(begun.sync_id(), 1, &acks1); });
  t0.join();
  t1.join();
  ASSERT_TRUE(p0.ok()) << p0.error_message();
  ASSERT_TRUE(p1.ok()) << p1.error_message();
  EXPECT_EQ(acks0, 7);
  EXPECT_EQ(acks1, 7);

  grpc::ClientContext cctx;
  pb::CommitRequest creq;
  creq.set_sync_id(begun.sync_id());
  pb::CommitResponse cresp;
  s = stub_->Commit(&cctx, creq, &cresp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(cresp.stats().state(), "committed");
  EXPECT_EQ(cresp.stats().version(), 3u);
  EXPECT_EQ(cresp.stats().bytes_written(), begun.bytes_planned());
  for (uint32_t rep = 0; rep < 2; ++rep) {
    EXPECT_EQ(shm_.Bytes("/engine" + std::to_string(rep)), Expected());
    EXPECT_EQ(engines_[rep]->kinds(), "RSC");
  }

  grpc::ClientContext gctx;
  pb::StatusResponse st;
  ASSERT_TRUE(stub_->GetStatus(&gctx, pb::StatusRequest(), &st).ok());
  EXPECT_EQ(st.engines_size(), 2);
  EXPECT_EQ(st.models(0).committed_version(), 3u);
  EXPECT_EQ(st.syncs_committed(), 1u);
  EXPECT_FALSE(st.daemon_version().empty());

  // An engine that closes its stream is unregistered.
  engines_[1]->Cancel();
  engines_[1]->WaitEnd();
  for (int i = 0; i < 100; ++i) {
    grpc::ClientContext c;
    ASSERT_TRUE(stub_->GetStatus(&c, pb::StatusRequest(), &st).ok());
    if (st.engines_size() == 1) break;
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(st.engines_size(), 1);
}

TEST_F(ServiceTest, BeginSyncReturnsNegotiatedDtypesInRequestOrder) {
  engines_.push_back(std::make_unique<EngineClient>(stub_.get(), EngineRequest(0)));
  ASSERT_TRUE(engines_[0]->WaitRegistered());
  pb::BeginSyncRequest req = Manifest(1);
  auto* skipped = req.add_tensors();  // the toy layout skips *.inv_freq: no destination, keeps its dtype
  skipped->set_name("rotary.inv_freq");
  skipped->add_shape(2);
  skipped->set_dtype(pb::DTYPE_F32);
  skipped->add_shards()->set_length(2);
  req.set_negotiate_dtypes(true);
  grpc::ClientContext bctx;
  pb::BeginSyncResponse begun;
  grpc::Status s = stub_->BeginSync(&bctx, req, &begun);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_EQ(begun.dtypes_size(), req.tensors_size());
  for (int i = 0; i + 1 < begun.dtypes_size(); ++i) {
    EXPECT_EQ(begun.dtypes(i).wire(), pb::DTYPE_BF16) << req.tensors(i).name();
    ASSERT_EQ(begun.dtypes(i).destinations_size(), 1);
    EXPECT_EQ(begun.dtypes(i).destinations(0), pb::DTYPE_BF16);
  }
  EXPECT_EQ(begun.dtypes(req.tensors_size() - 1).wire(), pb::DTYPE_F32);
  EXPECT_EQ(begun.dtypes(req.tensors_size() - 1).destinations_size(), 0);
  grpc::ClientContext actx;
  pb::AbortRequest areq;
  areq.set_sync_id(begun.sync_id());
  pb::AbortResponse aresp;
  ASSERT_TRUE(stub_->Abort(&actx, areq, &aresp).ok());
  // Without the flag: no dtypes.
  grpc::ClientContext b2;
  ASSERT_TRUE(stub_->BeginSync(&b2, Manifest(2), &begun).ok());
  EXPECT_EQ(begun.dtypes_size(), 0);
}

TEST_F(ServiceTest, ErrorsCarryCodesAndNames) {
  grpc::ClientContext c1;
  pb::BeginSyncResponse begun;
  grpc::Status s = stub_->BeginSync(&c1, Manifest(1), &begun);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_TRUE(Has(s.error_message(), "no engines registered for model toy")) << s.error_message();

  auto req = EngineRequest(0);
  req.mutable_params(2)->set_dtype(pb::DTYPE_UNSPECIFIED);
  EngineClient bad(stub_.get(), req);
  grpc::Status end = bad.WaitEnd();
  EXPECT_EQ(end.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(Has(end.error_message(), "param layers.0.norm.weight: dtype is unspecified")) << end.error_message();

  grpc::ClientContext c2;
  pb::AckVersionRequest ack;
  ack.set_engine_id("nope");
  pb::AckVersionResponse aresp;
  EXPECT_EQ(stub_->AckVersion(&c2, ack, &aresp).error_code(), grpc::StatusCode::NOT_FOUND);

  // The first LayerData must name the sync.
  grpc::ClientContext c3;
  auto stream = stub_->Push(&c3);
  pb::LayerData l;
  l.set_layer("x");
  stream->Write(l);
  stream->WritesDone();
  s = stream->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(Has(s.error_message(), "must carry sync_id")) << s.error_message();
}

TEST_F(ServiceTest, TrainerDisconnectAbortsAndEnginesHear) {
  engines_.push_back(std::make_unique<EngineClient>(stub_.get(), EngineRequest(0)));
  ASSERT_TRUE(engines_[0]->WaitRegistered());
  grpc::ClientContext bctx;
  pb::BeginSyncResponse begun;
  ASSERT_TRUE(stub_->BeginSync(&bctx, Manifest(2), &begun).ok());
  {
    grpc::ClientContext ctx;
    auto stream = stub_->Push(&ctx);
    auto layers = Layers(begun.sync_id(), 1);
    ASSERT_TRUE(stream->Write(layers[0]));
    pb::LayerAck ack;
    ASSERT_TRUE(stream->Read(&ack));
    ctx.TryCancel();  // the trainer rank dies mid-sync
    stream->Finish();
  }
  ASSERT_TRUE(engines_[0]->Wait([](const auto& e) { return HasKind(e, 'A'); }));
  EXPECT_EQ(engines_[0]->kinds(), "RSA");
  EXPECT_EQ(engines_[0]->last().aborted().reason(), "trainer rank 1 disconnected");
  EXPECT_EQ(engines_[0]->last().aborted().version(), 2u);
}

TEST_F(ServiceTest, HealthAndShutdown) {
  auto health = grpc::health::v1::Health::NewStub(channel_);
  for (const char* svc : {"", "weightsync.v1.WeightSync"}) {
    grpc::ClientContext c;
    grpc::health::v1::HealthCheckRequest hreq;
    hreq.set_service(svc);
    grpc::health::v1::HealthCheckResponse hresp;
    grpc::Status s = health->Check(&c, hreq, &hresp);
    ASSERT_TRUE(s.ok()) << svc << ": " << s.error_message();
    EXPECT_EQ(hresp.status(), grpc::health::v1::HealthCheckResponse::SERVING) << svc;
  }

  engines_.push_back(std::make_unique<EngineClient>(stub_.get(), EngineRequest(0)));
  ASSERT_TRUE(engines_[0]->WaitRegistered());
  grpc::ClientContext bctx;
  pb::BeginSyncResponse begun;
  ASSERT_TRUE(stub_->BeginSync(&bctx, Manifest(9), &begun).ok());
  ASSERT_TRUE(engines_[0]->Wait([](const auto& e) { return HasKind(e, 'S'); }));

  // A trainer rank holds its Push stream open across the shutdown.
  grpc::ClientContext pctx;
  auto stream = stub_->Push(&pctx);
  ASSERT_TRUE(stream->Write(Layers(begun.sync_id(), 0)[0]));
  pb::LayerAck ack;
  ASSERT_TRUE(stream->Read(&ack));

  auto t0 = std::chrono::steady_clock::now();
  server_->Stop(500ms);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
  grpc::Status end = engines_[0]->WaitEnd();
  EXPECT_EQ(engines_[0]->kinds(), "RSA");  // told before the stream ended
  EXPECT_TRUE(Has(engines_[0]->last().aborted().reason(), "shutting down"));
  EXPECT_EQ(end.error_code(), grpc::StatusCode::UNAVAILABLE) << end.error_message();
  struct stat stt;
  EXPECT_NE(::lstat(sock_.c_str(), &stt), 0) << "socket file must be removed";
  stream->Finish();
  server_.reset();
}

TEST(UnixSocket, StaleSocketReplacedLiveOrRegularFileRefused) {
  char tmpl[] = "/tmp/ws-sock-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string dir = tmpl, path = dir + "/s.sock";
  EXPECT_EQ(UnixSocketPath("unix:" + path), path);
  EXPECT_EQ(UnixSocketPath("unix://" + path), path);
  EXPECT_EQ(UnixSocketPath("127.0.0.1:5000"), "");

  EXPECT_TRUE(PrepareUnixSocket(path).ok());  // nothing there
  int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, path.c_str());
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  Status s = PrepareUnixSocket(path);
  EXPECT_ERR(s, "another process is listening");
  ::close(fd);  // the socket file stays behind: stale
  EXPECT_TRUE(PrepareUnixSocket(path).ok());
  struct stat st;
  EXPECT_NE(::lstat(path.c_str(), &st), 0);

  std::ofstream(path) << "not a socket";
  s = PrepareUnixSocket(path);
  EXPECT_ERR(s, "is not a socket");
  ::unlink(path.c_str());
  ::rmdir(dir.c_str());
}

}  // namespace
}  // namespace ws::server::testing
