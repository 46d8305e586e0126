// Hostile requests against the coordinator, the gRPC layer and the logs:
// deep or exploding configs, huge abort reasons and error lists, and errors
// that must reach a client with default gRPC settings intact.
#include <gtest/gtest.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <spdlog/details/log_msg.h>
#include <spdlog/pattern_formatter.h>
#include <unistd.h>

#include <cstdlib>

#include "daemon/core/text.h"
#include "daemon/server/convert.h"
#include "daemon/server/logging.h"
#include "daemon/server/server.h"
#include "tests/unit/server/fakes.h"
#include "weightsync/v1/weightsync.grpc.pb.h"

namespace ws::server::testing {
namespace {

namespace pb = ::weightsync::v1;
using namespace std::chrono_literals;

constexpr int64_t H = 4, NL = 2, PER = 8;  // toy rules at tp_size 1: vocab 6 padded to 8 rows

std::string Nested(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

class LimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto reg = LayoutRegistry::LoadTexts({{"toy.json", kToyRules}});
    ASSERT_TRUE(reg.ok()) << reg.status().ToString();
    CoordinatorOptions o;
    o.housekeeping_interval = 20ms;
    coord_ = std::make_unique<Coordinator>(*reg, domain_.get(), exec_.get(), o);
  }
  void TearDown() override {
    if (server_) server_->Stop(1s);
    coord_.reset();
    if (!dir_.empty()) {
      ::unlink(sock_.c_str());
      ::rmdir(dir_.c_str());
    }
  }

  // One tp_size-1 engine rank of model "toy" with `config`, memory in its own buffer.
  Result<std::string> Register(const std::string& config, uint32_t replica = 0) {
    EngineRankSpec spec;
    spec.model = "toy";
    spec.architecture = "ToyForCausalLM";
    spec.hf_config_json = config;
    spec.replica_id = replica;
    spec.tp_size = 1;
    std::vector<std::pair<std::string, Shape>> params = {{"embed.weight", {PER, H}}};
    for (int L = 0; L < NL; ++L) {
      params.push_back({"layers." + std::to_string(L) + ".qk.weight", {2 * H, H}});
      params.push_back({"layers." + std::to_string(L) + ".norm.weight", {H}});
    }
    const std::string buf = "/engine" + std::to_string(replica);
    std::vector<MemoryRef> mem;
    uint64_t off = 0;
    for (const auto& [name, shape] : params) {
      spec.params.push_back(EngineParamSpec{name, shape, DType::kBF16, ""});
      MemoryRef ref;
      ref.name = buf;
      ref.offset = off;
      ref.length = static_cast<uint64_t>(NumElements(shape)) * 2;
      mem.push_back(ref);
      off += ref.length;
    }
    shm_.Add(buf, off);
    return coord_->RegisterEngine(Self(), spec, mem, &sink_, "limits-test");
  }

  // A manifest of the toy model's tensors (whole, on rank 0) plus `unknown`
  // tensors no rule declares.
  SourceManifest Manifest(int unknown, const std::string& prefix = "unknown.") const {
    SourceManifest m;
    m.model = "toy";
    m.version = 1;
    m.world_size = 1;
    auto add = [&](const std::string& n, Shape s) { m.tensors.push_back({n, s, DType::kF32, {{0, 0, 0, s[0]}}}); };
    add("embed.weight", {6, H});
    for (int L = 0; L < NL; ++L) {
      add("layers." + std::to_string(L) + ".q.weight", {H, H});
      add("layers." + std::to_string(L) + ".k.weight", {H, H});
      add("layers." + std::to_string(L) + ".norm.weight", {H});
    }
    for (int i = 0; i < unknown; ++i) add(prefix + std::to_string(i), {2});
    return m;
  }

  void StartServer() {
    char tmpl[] = "/tmp/ws-limits-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    sock_ = dir_ + "/ws.sock";
    ServerOptions so;
    so.listen = {"unix:" + sock_};
    server_ = std::make_unique<Server>(coord_.get(), so);
    Status st = server_->Start();
    ASSERT_TRUE(st.ok()) << st.ToString();
    // A client with gRPC's default settings (8 KiB metadata limit).
    stub_ = pb::WeightSync::NewStub(grpc::CreateChannel("unix:" + sock_, grpc::InsecureChannelCredentials()));
  }

  static pb::BeginSyncRequest ToProto(const SourceManifest& m) {
    pb::BeginSyncRequest req;
    req.set_model(m.model);
    req.set_version(m.version);
    req.set_world_size(m.world_size);
    for (const auto& t : m.tensors) {
      auto* pt = req.add_tensors();
      pt->set_name(t.name);
      for (int64_t d : t.shape) pt->add_shape(d);
      pt->set_dtype(pb::DTYPE_F32);
      for (const auto& s : t.shards) {
        auto* ps = pt->add_shards();
        ps->set_rank(s.rank);
        ps->set_dim(s.dim);
        ps->set_start(s.start);
        ps->set_length(s.length);
      }
    }
    return req;
  }

  ws::testing::ShmDir shm_;
  std::unique_ptr<MemoryDomain> domain_ = ws::testing::WrappedHostDomain(shm_);
  std::unique_ptr<Executor> exec_ = ws::testing::WrappedHostExecutor();
  RecordingSink sink_;
  std::unique_ptr<Coordinator> coord_;
  std::string dir_, sock_;
  std::unique_ptr<Server> server_;
  std::unique_ptr<pb::WeightSync::Stub> stub_;
};

TEST_F(LimitsTest, DeepConfigIsRefusedWithoutCrashing) {
  const std::string deep = R"({"architectures": ["ToyForCausalLM"], "hidden_size": 4, "vocab_size": 6, "num_layers": 2, "x": )" +
                           Nested(100000) + "}";
  auto id = Register(deep);
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(id.status(), "hf_config_json: JSON nested more than 64 levels deep (limit max_json_depth = 64)");
  // A model that exists: the comparison with its config does not recurse either.
  ASSERT_TRUE(Register(kToyConfig).ok());
  auto second = Register(deep, /*replica=*/1);
  ASSERT_FALSE(second.ok());
  EXPECT_ERR(second.status(), "max_json_depth");
  // A configured limit applies.
  CoordinatorOptions o;
  o.limits.max_json_depth = 1;
  auto reg = LayoutRegistry::LoadTexts({{"toy.json", kToyRules}});
  ASSERT_TRUE(reg.ok());
  coord_ = std::make_unique<Coordinator>(*reg, domain_.get(), exec_.get(), o);
  EXPECT_ERR(Register(R"({"architectures": ["ToyForCausalLM"]})").status(), "limit max_json_depth = 1");
}

TEST_F(LimitsTest, HugeLayerCountIsRefusedQuickly) {
  auto id = Register(R"({"architectures": ["ToyForCausalLM"], "hidden_size": 4, "vocab_size": 6, "num_layers": 1000000})");
  ASSERT_FALSE(id.ok());
  EXPECT_EQ(id.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(id.status(), "\"layers.{L}.q.weight\"");
  EXPECT_ERR(id.status(), "loop L over [0, NL = num_layers = 1000000) expands the layout to more than 1000000 entries "
                          "(limit max_layout_entries = 1000000)");
  EXPECT_LT(id.status().message().size(), 1000u);
}

TEST_F(LimitsTest, UnknownTensorListIsCapped) {
  ASSERT_TRUE(Register(kToyConfig).ok());
  auto b = coord_->BeginSync(Self(), Manifest(60));
  ASSERT_FALSE(b.ok());
  EXPECT_ERR(b.status(), "unknown source tensor unknown.0:");
  EXPECT_ERR(b.status(), "unknown source tensor unknown.19:");
  EXPECT_FALSE(Has(b.status().message(), "unknown.20:"));
  EXPECT_ERR(b.status(), "... and 40 more");
  EXPECT_LT(b.status().message().size(), 4096u);
  // Nothing was cut on the way to the client either.
  EXPECT_EQ(ToGrpc(b.status()).error_message(), b.status().message());
}

TEST_F(LimitsTest, AbortReasonsAndPushErrorsAreBounded) {
  ASSERT_TRUE(Register(kToyConfig).ok());
  auto b = coord_->BeginSync(Self(), Manifest(0));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  // A layer naming 1000 tensors the manifest lacks.
  std::vector<std::pair<std::string, MemoryRef>> shards;
  for (int i = 0; i < 1000; ++i) shards.emplace_back("nope." + std::to_string(i), MemoryRef{});
  auto r = coord_->PushLayer(Self(), b->sync_id, 0, "l", shards);
  ASSERT_FALSE(r.ok());
  EXPECT_ERR(r.status(), "\n  tensor nope.0 is not in the manifest");
  EXPECT_ERR(r.status(), "\n  ... and 980 more");
  EXPECT_LT(r.status().message().size(), 4096u);
  EXPECT_LE(sink_.last_reason().size(), kMaxReasonBytes);

  // A trainer's 1 MB abort reason reaches engines and status cut.
  b = coord_->BeginSync(Self(), [&] {
    SourceManifest m = Manifest(0);
    m.version = 2;
    return m;
  }());
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ASSERT_TRUE(coord_->Abort(Self(), b->sync_id, std::string(1 << 20, 'r')).ok());
  ASSERT_TRUE(sink_.WaitFor(EngineEvent::Kind::kAborted, b->sync_id));
  EXPECT_LE(sink_.last_reason().size(), kMaxReasonBytes);
  EXPECT_ERR(Status(Code::kAborted, sink_.last_reason()), "more bytes)");
  ASSERT_TRUE(coord_->GetStatus().last_sync.has_value());
  EXPECT_LE(coord_->GetStatus().last_sync->error.size(), kMaxReasonBytes);
}

TEST_F(LimitsTest, RefusalsReachADefaultClientIntact) {
  ASSERT_TRUE(Register(kToyConfig).ok());
  StartServer();
  // 60 unknown tensors with realistic names: listed whole, the message would
  // pass gRPC's default 8 KiB metadata limit and reach the client as
  // "metadata size exceeds limit" instead of the reason.
  pb::BeginSyncRequest req = ToProto(Manifest(60, "model.layers.0.mlp.experts.123.down_proj.weight_scale_inv."));
  pb::BeginSyncResponse resp;
  grpc::ClientContext ctx;
  grpc::Status st = stub_->BeginSync(&ctx, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_TRUE(Has(st.error_message(), "model toy version 1: unknown source tensor model.layers.0.mlp.experts.123"))
      << st.error_message();
  EXPECT_TRUE(Has(st.error_message(), "... and 40 more")) << st.error_message();
  EXPECT_LT(st.error_message().size(), 4096u);

  // Names of 1000 bytes, non-ASCII (3 bytes each on the wire): even the 20
  // listed are past the budget; the message is cut, not lost.
  std::string name;
  for (int i = 0; i < 500; ++i) name += "\xc3\xa9";
  req = ToProto(Manifest(60, name + "."));
  grpc::ClientContext ctx2;
  st = stub_->BeginSync(&ctx2, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << st.error_message();
  EXPECT_TRUE(Has(st.error_message(), "model toy version 1: unknown source tensor \xc3\xa9\xc3\xa9"))
      << st.error_message();
  EXPECT_TRUE(Has(st.error_message(), " more bytes)")) << st.error_message();
}

TEST(ConvertLimits, StatusMessagesAreCutForTheWire) {
  const std::string small = "tensor a: bad\n  and b";
  EXPECT_EQ(ToGrpc(InvalidArgument(small)).error_message(), small);
  // ASCII: cut to the budget, counting what was left out.
  std::string big(100000, 'x');
  std::string got = ToGrpc(InvalidArgument(big)).error_message();
  EXPECT_LE(got.size(), kMaxStatusMessageBytes);
  EXPECT_GT(got.size(), kMaxStatusMessageBytes - 64);
  size_t kept = got.find("...");
  EXPECT_EQ(got.substr(kept), "... (" + std::to_string(big.size() - kept) + " more bytes)");
  // Non-ASCII bytes and newlines cost 3 bytes each on the wire; a cut never
  // splits a character.
  std::string wide;
  for (int i = 0; i < 10000; ++i) wide += "\xe2\x82\xac\n";
  got = ToGrpc(Status(Code::kAborted, wide)).error_message();
  EXPECT_EQ(ToGrpc(Status(Code::kAborted, wide)).error_code(), grpc::StatusCode::ABORTED);
  size_t wire = 0;
  for (unsigned char c : got) wire += c >= 0x20 && c <= 0x7e && c != '%' ? 1 : 3;
  EXPECT_LE(wire, kMaxStatusMessageBytes);
  kept = got.find("...");
  ASSERT_NE(kept, std::string::npos);
  EXPECT_TRUE(kept % 4 == 0 || kept % 4 == 3) << "cut inside a character at " << kept;
}

// Formats one message through the daemon's capped formatters.
std::string FormatCapped(std::unique_ptr<spdlog::formatter> inner, const std::string& payload) {
  CappedFormatter f(std::move(inner), kMaxLogMessageBytes);
  spdlog::details::log_msg msg("weightsyncd", spdlog::level::warn, spdlog::string_view_t(payload.data(), payload.size()));
  spdlog::memory_buf_t buf;
  f.clone()->format(msg, buf);
  return std::string(buf.data(), buf.size());
}

TEST(LogLimits, EveryLineIsCapped) {
  const std::string huge = "BeginSync refused: unknown source tensor " + std::string(100 << 20, 'n');
  for (bool json : {false, true}) {
    std::unique_ptr<spdlog::formatter> inner;
    if (json) inner = std::make_unique<JsonLogFormatter>();
    else inner = std::make_unique<spdlog::pattern_formatter>("%Y-%m-%dT%H:%M:%S.%e%z %l [%n] %v");
    std::string line = FormatCapped(std::move(inner), huge);
    EXPECT_LT(line.size(), kMaxLogMessageBytes + 200) << json;
    EXPECT_TRUE(Has(line, "BeginSync refused: unknown source tensor nnn")) << json;
    EXPECT_TRUE(Has(line, " more bytes)")) << json;
    EXPECT_EQ(line.back(), '\n');
    EXPECT_EQ(line.find('\n'), line.size() - 1);
  }
  // Short messages pass untouched.
  std::string line = FormatCapped(std::make_unique<JsonLogFormatter>(), "engine registered");
  EXPECT_TRUE(Has(line, "\"msg\":\"engine registered\"")) << line;
}

}  // namespace
}  // namespace ws::server::testing
