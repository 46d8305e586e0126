#include "daemon/server/convert.h"

#include <gtest/gtest.h>

#include <functional>

#include "tests/unit/server/fakes.h"

namespace ws::server::testing {
namespace {

TEST(Convert, StatusCodeTable) {
  const std::vector<std::pair<Code, grpc::StatusCode>> table = {
      {Code::kOk, grpc::StatusCode::OK},
      {Code::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT},
      {Code::kNotFound, grpc::StatusCode::NOT_FOUND},
      {Code::kAlreadyExists, grpc::StatusCode::ALREADY_EXISTS},
      {Code::kFailedPrecondition, grpc::StatusCode::FAILED_PRECONDITION},
      {Code::kOutOfRange, grpc::StatusCode::OUT_OF_RANGE},
      {Code::kAborted, grpc::StatusCode::ABORTED},
      {Code::kUnavailable, grpc::StatusCode::UNAVAILABLE},
      {Code::kDeadlineExceeded, grpc::StatusCode::DEADLINE_EXCEEDED},
      {Code::kCancelled, grpc::StatusCode::CANCELLED},
      {Code::kInternal, grpc::StatusCode::INTERNAL},
      {Code::kUnimplemented, grpc::StatusCode::UNIMPLEMENTED},
      {Code::kPermissionDenied, grpc::StatusCode::PERMISSION_DENIED},
      {Code::kResourceExhausted, grpc::StatusCode::RESOURCE_EXHAUSTED},
      {Code::kUnauthenticated, grpc::StatusCode::UNAUTHENTICATED},
  };
  for (const auto& [code, grpc_code] : table) {
    EXPECT_EQ(ToGrpcCode(code), grpc_code) << CodeName(code);
    grpc::Status g = ToGrpc(Status(code, code == Code::kOk ? "" : std::string("because ") + CodeName(code)));
    EXPECT_EQ(g.error_code(), grpc_code);
    if (code != Code::kOk) EXPECT_EQ(g.error_message(), std::string("because ") + CodeName(code));
  }
  EXPECT_TRUE(ToGrpc(Status::Ok()).ok());
}

pb::RegisterEngineRequest GoodRequest() {
  pb::RegisterEngineRequest r;
  r.set_model("m");
  r.set_architecture("LlamaForCausalLM");
  r.set_hf_config_json("{}");
  r.set_replica_id(3);
  r.set_tp_rank(1);
  r.set_tp_size(2);
  r.set_engine_label("host:42");
  (*r.mutable_options())["enable_expert_parallel"] = 1;
  auto* p = r.add_params();
  p->set_name("model.norm.weight");
  p->add_shape(64);
  p->set_dtype(pb::DTYPE_BF16);
  auto* shm = p->mutable_memory()->mutable_host_shm();
  shm->set_name("/ws-engine");
  shm->set_offset(128);
  shm->set_length(128);
  return r;
}

TEST(Convert, RegisterEngineRequest) {
  auto r = FromProto(GoodRequest());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->spec.model, "m");
  EXPECT_EQ(r->spec.replica_id, 3u);
  EXPECT_EQ(r->spec.tp_rank, 1u);
  EXPECT_EQ(r->spec.tp_size, 2u);
  EXPECT_EQ(r->spec.options.at("enable_expert_parallel"), 1);
  EXPECT_EQ(r->label, "host:42");
  ASSERT_EQ(r->spec.params.size(), 1u);
  EXPECT_EQ(r->spec.params[0].shape, Shape({64}));
  EXPECT_EQ(r->spec.params[0].dtype, DType::kBF16);
  ASSERT_EQ(r->memory.size(), 1u);
  EXPECT_EQ(r->memory[0].name, "/ws-engine");
  EXPECT_EQ(r->memory[0].offset, 128u);
  EXPECT_EQ(r->memory[0].length, 128u);

  auto bad = GoodRequest();
  bad.mutable_params(0)->set_dtype(pb::DTYPE_UNSPECIFIED);
  EXPECT_ERR(FromProto(bad).status(), "param model.norm.weight: dtype is unspecified");
  bad = GoodRequest();
  bad.mutable_params(0)->clear_memory();
  EXPECT_ERR(FromProto(bad).status(), "param model.norm.weight: memory reference is not set");
  bad = GoodRequest();
  bad.mutable_params(0)->mutable_memory()->mutable_cuda_ipc()->set_handle("short");
  EXPECT_ERR(FromProto(bad).status(), "cuda_ipc.handle has 5 bytes, expected 64");
  bad = GoodRequest();
  bad.mutable_params(0)->set_shape(0, -1);
  EXPECT_ERR(FromProto(bad).status(), "param model.norm.weight: shape [-1] has a negative dimension");
  bad = GoodRequest();
  bad.mutable_params(0)->mutable_memory()->mutable_host_shm()->set_name("");
  EXPECT_ERR(FromProto(bad).status(), "host_shm.name is empty");
  EXPECT_EQ(FromProto(bad).status().code(), Code::kInvalidArgument);
}

TEST(Convert, PeerEngineCarriesTheGpuItsParamsLiveOn) {
  pb::RegisterEngineRequest reg = GoodRequest();
  for (auto& p : *reg.mutable_params()) p.clear_memory();  // peers send specs without memory
  auto spec = FromProto(reg, Limits{}, /*memory=*/false);
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  RemoteEngine gpu;
  gpu.node = "b";
  gpu.engine_id = "e1";
  gpu.spec = spec->spec;
  gpu.memory = MemoryKind::kCudaIpc;
  gpu.device_uuid = "GPU-0a1b";
  pb::PeerEngine wire;
  ToProto(gpu, &wire);
  EXPECT_EQ(wire.device_uuid(), "GPU-0a1b");
  auto back = FromProto(wire);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->memory, MemoryKind::kCudaIpc);
  EXPECT_EQ(back->device_uuid, "GPU-0a1b");

  RemoteEngine host = gpu;  // host memory: no UUID on the wire, whatever the field held
  host.memory = MemoryKind::kHostShm;
  wire.Clear();
  ToProto(host, &wire);
  EXPECT_TRUE(wire.device_uuid().empty());
  back = FromProto(wire);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->memory, MemoryKind::kHostShm);
  EXPECT_TRUE(back->device_uuid.empty());

  // An oversized UUID from a peer is refused naming the engine.
  wire.set_device_uuid(std::string(5000, 'x'));
  back = FromProto(wire);
  ASSERT_FALSE(back.ok());
  EXPECT_NE(back.status().message().find("engine e1"), std::string::npos) << back.status().message();
}

TEST(Convert, CudaRef) {
  pb::MemoryRef m;
  m.mutable_cuda_ipc()->set_handle(std::string(64, '\x01'));
  m.mutable_cuda_ipc()->set_device_uuid("GPU-1234");
  m.mutable_cuda_ipc()->set_offset(8);
  m.mutable_cuda_ipc()->set_length(16);
  auto r = FromProto(m, "x");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->kind, MemoryKind::kCudaIpc);
  EXPECT_EQ(r->device_uuid, "GPU-1234");
  EXPECT_EQ(r->offset, 8u);
  EXPECT_EQ(r->length, 16u);
}

TEST(Convert, Manifest) {
  pb::BeginSyncRequest req;
  req.set_model("m");
  req.set_version(9);
  req.set_world_size(2);
  auto* t = req.add_tensors();
  t->set_name("a");
  t->add_shape(5);
  t->add_shape(3);
  t->set_dtype(pb::DTYPE_F32);
  for (uint32_t r = 0; r < 2; ++r) {
    auto* s = t->add_shards();
    s->set_rank(r);
    s->set_start(r * 3);
    s->set_length(r == 0 ? 3 : 2);
  }
  auto m = FromProto(req);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(m->version, 9u);
  EXPECT_EQ(m->world_size, 2u);
  ASSERT_EQ(m->tensors.size(), 1u);
  EXPECT_EQ(m->tensors[0].shape, Shape({5, 3}));
  ASSERT_EQ(m->tensors[0].shards.size(), 2u);
  EXPECT_EQ(m->tensors[0].shards[1].rank, 1u);
  EXPECT_EQ(m->tensors[0].shards[1].start, 3);
  EXPECT_EQ(m->tensors[0].shards[1].length, 2);

  t->set_dtype(pb::DTYPE_UNSPECIFIED);
  EXPECT_ERR(FromProto(req).status(), "tensor a: dtype is unspecified");
}

TEST(Convert, LayerData) {
  pb::LayerData l;
  l.set_layer("layers.3");
  auto* s = l.add_shards();
  s->set_tensor("w");
  auto r = FromProto(l);
  EXPECT_ERR(r.status(), "layer \"layers.3\" tensor w: memory reference is not set");
  s->mutable_memory()->mutable_host_shm()->set_name("/t");
  s->mutable_memory()->mutable_host_shm()->set_length(4);
  r = FromProto(l);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->named[0].first, "w");
  EXPECT_EQ(r->named[0].second.length, 4u);
}

TEST(Convert, LayerDataByIndex) {
  pb::LayerData l;
  l.set_layer("layers.3");
  l.add_tensor_index(7);
  l.add_tensor_index(2);
  l.add_offset(0);
  EXPECT_ERR(FromProto(l).status(), "layer \"layers.3\" has 2 tensor_index entries but 1 offsets");
  l.add_offset(128);
  EXPECT_ERR(FromProto(l).status(), "layer \"layers.3\" has tensor_index entries but no memory object");
  l.mutable_memory()->mutable_host_shm()->set_name("/t");
  auto r = FromProto(l);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->named.empty());
  EXPECT_EQ(r->index, (std::vector<uint32_t>{7, 2}));
  EXPECT_EQ(r->offset, (std::vector<uint64_t>{0, 128}));
  EXPECT_EQ(r->object.name, "/t");
}

// A manifest of `n` one-element tensors on rank 0.
pb::BeginSyncRequest ManyTensors(int n) {
  pb::BeginSyncRequest req;
  req.set_model("m");
  req.set_version(1);
  req.set_world_size(1);
  req.mutable_tensors()->Reserve(n);
  for (int i = 0; i < n; ++i) {
    auto* t = req.add_tensors();
    t->set_name("t" + std::to_string(i));
    t->add_shape(1);
    t->set_dtype(pb::DTYPE_F32);
  }
  return req;
}

TEST(ConvertLimits, ManifestCountsAreCheckedFirst) {
  // 1e6 unknown tensors: refused by the count alone, before a domain object exists.
  auto req = ManyTensors(1000000);
  auto m = FromProto(req, Limits{});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(m.status(), "the manifest has 1000000 tensors, more than 262144 (limit max_tensors_per_manifest = 262144)");

  Limits l;
  l.max_tensors_per_manifest = 4;
  l.max_shards_per_tensor = 2;
  l.max_shards_per_manifest = 5;
  req = ManyTensors(4);
  EXPECT_TRUE(FromProto(req, l).ok());
  req = ManyTensors(5);
  EXPECT_ERR(FromProto(req, l).status(), "limit max_tensors_per_manifest = 4");
  req = ManyTensors(4);
  for (int i = 0; i < 3; ++i) req.mutable_tensors(0)->add_shards()->set_length(1);
  EXPECT_ERR(FromProto(req, l).status(), "tensor t0 has 3 shards, more than 2 (limit max_shards_per_tensor = 2)");
  req = ManyTensors(4);
  for (int t = 0; t < 3; ++t)
    for (int i = 0; i < 2; ++i) req.mutable_tensors(t)->add_shards()->set_length(1);
  EXPECT_ERR(FromProto(req, l).status(), "the manifest has 6 shards, more than 5 (limit max_shards_per_manifest = 5)");
  req = ManyTensors(1);
  for (int i = 0; i < 8; ++i) req.mutable_tensors(0)->add_shape(1);
  EXPECT_ERR(FromProto(req, l).status(), "tensor t0: shape has 9 dims, more than 8 (limit max_dims = 8)");
}

TEST(ConvertLimits, LongNamesAreRefusedWithShortMessages) {
  // A 100 MB tensor name: refused by max_name_bytes, and the error quotes 64 bytes of it.
  auto req = ManyTensors(2);
  req.mutable_tensors(1)->set_name(std::string(100 << 20, 'x'));
  auto m = FromProto(req, Limits{});
  ASSERT_FALSE(m.ok());
  EXPECT_ERR(m.status(), "tensor \"xxxx");
  EXPECT_ERR(m.status(), "\" is 104857600 bytes long, more than 1024 (limit max_name_bytes = 1024)");
  EXPECT_LT(m.status().message().size(), 300u);
  req.mutable_tensors(1)->set_name(std::string(1024, 'x'));
  EXPECT_TRUE(FromProto(req, Limits{}).ok());
  req.set_model(std::string(2000, 'm'));
  EXPECT_ERR(FromProto(req, Limits{}).status(), "model \"mmm");

  pb::LayerData layer;
  layer.set_layer(std::string(5000, 'l'));
  EXPECT_ERR(FromProto(layer, Limits{}).status(), "layer \"lll");
  layer.set_layer("layers.0");
  auto* s = layer.add_shards();
  s->set_tensor(std::string(5000, 't'));
  EXPECT_ERR(FromProto(layer, Limits{}).status(), "layer \"layers.0\" tensor \"ttt");
  s->set_tensor("w");
  s->mutable_memory()->mutable_host_shm()->set_name(std::string(5000, 's'));
  EXPECT_ERR(FromProto(layer, Limits{}).status(), "host_shm.name \"sss");
  Limits l;
  l.max_tensors_per_manifest = 1;
  layer.add_shards()->set_tensor("v");
  EXPECT_ERR(FromProto(layer, l).status(), "layer \"layers.0\" has 2 shards, more than 1 (limit max_tensors_per_manifest = 1)");
}

TEST(ConvertLimits, RegistrationSizes) {
  Limits l;
  l.max_params_per_registration = 1;
  l.max_engine_options = 1;
  l.max_json_bytes = 100;
  l.max_tp_size = 8;
  EXPECT_TRUE(FromProto(GoodRequest(), l).ok());
  auto bad = GoodRequest();
  *bad.add_params() = bad.params(0);
  EXPECT_ERR(FromProto(bad, l).status(), "the registration has 2 params, more than 1 (limit max_params_per_registration = 1)");
  bad = GoodRequest();
  (*bad.mutable_options())["other"] = 2;
  EXPECT_ERR(FromProto(bad, l).status(), "the registration has 2 engine options, more than 1 (limit max_engine_options = 1)");
  bad = GoodRequest();
  bad.set_hf_config_json("{\"a\": \"" + std::string(200, 'a') + "\"}");
  EXPECT_ERR(FromProto(bad, l).status(), "hf_config_json is 209 bytes, more than 100 (limit max_json_bytes = 100)");
  bad = GoodRequest();
  bad.mutable_params(0)->set_mapping_json(std::string(101, ' '));
  EXPECT_ERR(FromProto(bad, l).status(), "param model.norm.weight: mapping_json is 101 bytes, more than 100");
  bad = GoodRequest();
  bad.set_tp_size(9);
  EXPECT_ERR(FromProto(bad, l).status(), "tp_size 9 is more than 8 (limit max_tp_size = 8)");
  bad = GoodRequest();
  for (int i = 0; i < 9; ++i) bad.mutable_params(0)->add_shape(1);
  EXPECT_ERR(FromProto(bad, l).status(), "param model.norm.weight: shape has 10 dims, more than 8 (limit max_dims = 8)");
  for (auto edit : std::vector<std::function<void(pb::RegisterEngineRequest&)>>{
           [](auto& r) { r.mutable_params(0)->set_name(std::string(2000, 'p')); },
           [](auto& r) { r.mutable_params(0)->set_tied_to(std::string(2000, 'p')); },
           [](auto& r) { r.set_architecture(std::string(2000, 'a')); },
           [](auto& r) { r.set_engine_label(std::string(2000, 'e')); },
           [](auto& r) { (*r.mutable_options())[std::string(2000, 'o')] = 1; },
       }) {
    bad = GoodRequest();
    edit(bad);
    EXPECT_ERR(FromProto(bad, Limits{}).status(), "(limit max_name_bytes = 1024)");
  }
}

TEST(Convert, EventsAndStatus) {
  EngineEvent ev{EngineEvent::Kind::kAborted, 11, 4, "why"};
  auto p = ToProto(ev);
  ASSERT_TRUE(p.has_aborted());
  EXPECT_EQ(p.aborted().sync_id(), 11u);
  EXPECT_EQ(p.aborted().version(), 4u);
  EXPECT_EQ(p.aborted().reason(), "why");
  EXPECT_TRUE(ToProto(EngineEvent{EngineEvent::Kind::kStarted, 1, 2, ""}).has_started());
  EXPECT_EQ(ToProto(EngineEvent{EngineEvent::Kind::kCommitted, 1, 2, ""}).committed().version(), 2u);

  StatusSnapshot s;
  s.uptime_seconds = 3;
  s.engines.push_back(EngineInfo{"e1", "m", "A", 0, 1, 2, 5, 100, 7, "lbl"});
  s.models.push_back(ModelInfo{"m", "A", 1, 2, 7});
  SyncStats st;
  st.sync_id = 5;
  st.state = "committed";
  st.gbps = 1.5;
  s.last_sync = st;
  s.syncs_committed = 4;
  s.syncs_aborted = 1;
  pb::StatusResponse out;
  ToProto(s, &out);
  EXPECT_EQ(out.engines(0).label(), "lbl");
  EXPECT_EQ(out.engines(0).tp_size(), 2u);
  EXPECT_EQ(out.models(0).committed_version(), 7u);
  EXPECT_EQ(out.last_sync().state(), "committed");
  EXPECT_DOUBLE_EQ(out.last_sync().gbps(), 1.5);
  EXPECT_EQ(out.syncs_committed(), 4u);
  EXPECT_EQ(out.syncs_aborted(), 1u);
}

}  // namespace
}  // namespace ws::server::testing
