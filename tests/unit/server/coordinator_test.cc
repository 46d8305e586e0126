#include "daemon/server/coordinator.h"

#include <gtest/gtest.h>

#include <cstring>
#include <future>
#include <mutex>
#include <tuple>
#include <thread>

#include "daemon/sync/host_buffer.h"
#include "daemon/transport/peer_comm.h"
#include "tests/unit/server/fakes.h"
#include "tests/unit/testing/fake_peer_comm.h"

namespace ws::server::testing {

using ws::testing::FakeClock;
using ws::testing::FaultInjectingExecutor;
using ws::testing::FaultInjectingMemoryDomain;
using ws::testing::ShmDir;
using ws::testing::WrappedHostDomain;
using ws::testing::WrappedHostExecutor;

namespace {

using Kind = EngineEvent::Kind;

constexpr int64_t H = 4, V = 6, NL = 2;
constexpr uint8_t kGarbage = 0xAB;

struct Source {
  std::string name;
  Shape shape;
  std::vector<float> data;  // full tensor
  int64_t rows() const { return shape[0]; }
  int64_t row_elems() const { return shape.size() > 1 ? shape[1] : 1; }
};

struct EngineHandle {
  std::string id;
  std::string buffer;
  std::shared_ptr<RecordingSink> sink = std::make_shared<RecordingSink>();
  std::vector<std::pair<std::string, Shape>> params;  // in buffer order
  uint32_t replica = 0, tp_rank = 0;
};

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override { Init(/*T=*/2, /*W=*/2); }

  void Init(uint32_t T, uint32_t W, std::chrono::milliseconds ack_timeout = std::chrono::seconds(10),
            std::chrono::milliseconds progress_timeout = std::chrono::minutes(5)) {
    coord_.reset();  // its housekeeping thread uses the domain replaced below
    T_ = T;
    W_ = W;
    auto reg = LayoutRegistry::LoadTexts({{"toy.json", kToyRules}});
    ASSERT_TRUE(reg.ok()) << reg.status().ToString();
    domain_ = WrappedHostDomain(shm_);
    exec_ = WrappedHostExecutor();
    CoordinatorOptions o;
    o.ack_timeout = ack_timeout;
    o.progress_timeout = progress_timeout;
    o.clock = &clock_;
    o.housekeeping_interval = std::chrono::milliseconds(20);
    o.max_engines_per_peer = max_engines_per_peer_;
    o.cluster = cluster_;
    o.device_staging = device_staging_;
    coord_ = std::make_unique<Coordinator>(*reg, domain_.get(), exec_.get(), o);
    sources_.clear();
    auto add = [&](const std::string& n, Shape s) {
      Source src{n, s, {}};
      int64_t id = static_cast<int64_t>(sources_.size());
      for (int64_t i = 0; i < NumElements(s); ++i) src.data.push_back(static_cast<float>((id * 37 + i) % 251 - 125));
      sources_.push_back(std::move(src));
    };
    add("embed.weight", {V, H});
    for (int L = 0; L < NL; ++L) {
      add("layers." + std::to_string(L) + ".q.weight", {H, H});
      add("layers." + std::to_string(L) + ".k.weight", {H, H});
      add("layers." + std::to_string(L) + ".norm.weight", {H});
    }
    // One trainer buffer per rank: its torch.chunk shard of every tensor, back to back.
    shard_offsets_.assign(W, {});
    for (uint32_t r = 0; r < W; ++r) {
      std::vector<uint8_t> bytes;
      for (const auto& s : sources_) {
        auto [a, b] = Chunk(s.rows(), r);
        shard_offsets_[r][s.name] = {bytes.size(), static_cast<uint64_t>((b - a) * s.row_elems() * 4)};
        const uint8_t* p = reinterpret_cast<const uint8_t*>(s.data.data() + a * s.row_elems());
        bytes.insert(bytes.end(), p, p + (b - a) * s.row_elems() * 4);
      }
      shm_.Add(TrainerBuffer(r), bytes);
    }
  }

  // torch.chunk(rows, W)[r] as [a, b).
  std::pair<int64_t, int64_t> Chunk(int64_t rows, uint32_t r) const {
    int64_t c = (rows + W_ - 1) / W_;
    return {std::min<int64_t>(r * c, rows), std::min<int64_t>((r + 1) * c, rows)};
  }
  static std::string TrainerBuffer(uint32_t r) { return "/trainer" + std::to_string(r); }
  const Source& Src(const std::string& n) const {
    for (const auto& s : sources_)
      if (s.name == n) return s;
    throw std::runtime_error("no source " + n);
  }

  SourceManifest Manifest(uint64_t version = 1) const {
    SourceManifest m;
    m.model = "toy";
    m.version = version;
    m.world_size = W_;
    for (const auto& s : sources_) {
      SourceTensor t;
      t.name = s.name;
      t.shape = s.shape;
      t.dtype = DType::kF32;
      for (uint32_t r = 0; r < W_; ++r) {
        auto [a, b] = Chunk(s.rows(), r);
        t.shards.push_back(ShardSpec{r, 0, a, b - a});
      }
      m.tensors.push_back(std::move(t));
    }
    return m;
  }

  // Per-rank engine params (bf16), laid out back to back in one buffer.
  EngineRankSpec Spec(uint32_t replica, uint32_t tp, std::vector<MemoryRef>* mem, EngineHandle* h,
                      uint32_t tp_size = 0) {
    if (tp_size == 0) tp_size = T_;
    EngineRankSpec spec;
    spec.model = "toy";
    spec.architecture = "ToyForCausalLM";
    spec.hf_config_json = kToyConfig;
    spec.replica_id = replica;
    spec.tp_rank = tp;
    spec.tp_size = tp_size;
    int64_t per = ((V + 3) / 4 * 4) / tp_size;
    h->params = {{"embed.weight", {per, H}}};
    for (int L = 0; L < NL; ++L) {
      h->params.push_back({"layers." + std::to_string(L) + ".qk.weight", {2 * H / tp_size, H}});
      h->params.push_back({"layers." + std::to_string(L) + ".norm.weight", {H}});
    }
    h->buffer = "/engine" + std::to_string(replica) + "-" + std::to_string(tp);
    h->replica = replica;
    h->tp_rank = tp;
    uint64_t off = 0;
    for (const auto& [name, shape] : h->params) {
      spec.params.push_back(EngineParamSpec{name, shape, DType::kBF16, ""});
      MemoryRef ref;
      ref.name = h->buffer;
      ref.offset = off;
      ref.length = NumElements(shape) * 2;
      mem->push_back(ref);
      off += ref.length;
    }
    std::fill_n(shm_.Add(h->buffer, off), off, kGarbage);
    return spec;
  }

  // acks_pause: the engine answers `started` with AckPaused; staged: every param is a staging buffer.
  EngineHandle Register(uint32_t replica, uint32_t tp, bool acks_pause = false, bool staged = false) {
    EngineHandle h;
    std::vector<MemoryRef> mem;
    EngineRankSpec spec = Spec(replica, tp, &mem, &h);
    spec.acks_pause = acks_pause;
    for (auto& p : spec.params) p.staged = staged;
    auto id = coord_->RegisterEngine(Self(), spec, mem, h.sink.get(), "test:" + std::to_string(tp));
    EXPECT_TRUE(id.ok()) << id.status().ToString();
    if (id.ok()) h.id = *id;
    sinks_.push_back(h.sink);  // a sink must outlive its registration
    return h;
  }

  std::vector<EngineHandle> RegisterAll(uint32_t replicas = 1) {
    std::vector<EngineHandle> v;
    for (uint32_t rep = 0; rep < replicas; ++rep)
      for (uint32_t tp = 0; tp < T_; ++tp) v.push_back(Register(rep, tp));
    return v;
  }

  MemoryRef ShardRef(uint32_t rank, const std::string& tensor) {
    auto [off, len] = shard_offsets_[rank].at(tensor);
    MemoryRef ref;
    ref.name = TrainerBuffer(rank);
    ref.offset = off;
    ref.length = len;
    return ref;
  }

  // The tensors of one "layer" that rank holds a non-empty shard of.
  std::vector<std::pair<std::string, MemoryRef>> Layer(uint32_t rank, const std::string& layer) {
    std::vector<std::pair<std::string, MemoryRef>> v;
    for (const auto& s : sources_) {
      bool in = layer == "embed" ? s.name == "embed.weight" : s.name.rfind(layer + ".", 0) == 0;
      auto [a, b] = Chunk(s.rows(), rank);
      if (in && b > a) v.emplace_back(s.name, ShardRef(rank, s.name));
    }
    return v;
  }
  std::vector<std::string> Layers() const {
    std::vector<std::string> v{"embed"};
    for (int L = 0; L < NL; ++L) v.push_back("layers." + std::to_string(L));
    return v;
  }

  void PushAll(uint64_t sync_id) {
    for (uint32_t r = 0; r < W_; ++r)
      for (const auto& l : Layers()) {
        auto res = coord_->PushLayer(Self(), sync_id, r, l, Layer(r, l));
        ASSERT_TRUE(res.ok()) << res.status().ToString();
        EXPECT_EQ(res->layer, l);
      }
  }

  // Commit on another thread; ack from every engine once it hears Committed.
  Result<SyncStats> CommitAcked(uint64_t sync_id, std::vector<EngineHandle>& engines, const std::string& fail_id = "") {
    auto fut = std::async(std::launch::async, [&] { return coord_->Commit(Self(), sync_id); });
    for (auto& e : engines) {
      if (!e.sink->WaitFor(Kind::kCommitted, sync_id, std::chrono::seconds(5))) break;
      Status st = coord_->AckVersion(Self(), e.id, e.sink->events().back().version, e.id != fail_id,
                                     e.id == fail_id ? "out of memory applying weights" : "");
      EXPECT_TRUE(st.ok()) << st.ToString();
    }
    return fut.get();
  }

  // The engine bytes vLLM's layout implies, computed straight from the full tensors.
  std::vector<uint8_t> Expected(const EngineHandle& h) const {
    std::vector<uint8_t> out;
    auto put = [&](float f) {
      uint16_t b = kernels::F32ToBF16(f);
      out.push_back(b & 0xff);
      out.push_back(b >> 8);
    };
    int64_t per = ((V + 3) / 4 * 4) / T_;
    const Source& emb = Src("embed.weight");
    for (int64_t i = h.tp_rank * per; i < (h.tp_rank + 1) * per; ++i)
      for (int64_t j = 0; j < H; ++j) put(i < V ? emb.data[i * H + j] : 0.0f);
    for (int L = 0; L < NL; ++L) {
      std::string p = "layers." + std::to_string(L);
      for (const char* part : {".q.weight", ".k.weight"}) {
        const Source& s = Src(p + part);
        int64_t rows = H / T_;
        for (int64_t i = h.tp_rank * rows; i < (h.tp_rank + 1) * rows; ++i)
          for (int64_t j = 0; j < H; ++j) put(s.data[i * H + j]);
      }
      for (float f : Src(p + ".norm.weight").data) put(f);
    }
    return out;
  }

  bool Untouched(const EngineHandle& h) {
    for (uint8_t b : shm_.Bytes(h.buffer))
      if (b != kGarbage) return false;
    return true;
  }

  uint32_t T_ = 2, W_ = 2;
  uint32_t max_engines_per_peer_ = 4096;
  ClusterLink* cluster_ = nullptr;  // coord_'s peers (CoordinatorOptions::cluster)
  DeviceStaging* device_staging_ = nullptr;  // coord_'s (CoordinatorOptions::device_staging)
  std::vector<Source> sources_;
  std::vector<std::map<std::string, std::pair<uint64_t, uint64_t>>> shard_offsets_;
  std::vector<std::shared_ptr<RecordingSink>> sinks_;
  ShmDir shm_;      // real shm files the domain maps
  FakeClock clock_;  // the progress timeout's
  std::unique_ptr<FaultInjectingMemoryDomain> domain_;  // the real host shm domain, wrapped
  std::unique_ptr<FaultInjectingExecutor> exec_;        // the real host executor, wrapped
  std::unique_ptr<Coordinator> coord_;  // destroyed first
};

TEST_F(CoordinatorTest, FullSyncWritesVllmLayout) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(7));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->engines, 2u);
  EXPECT_GT(b->copy_ops, 0u);
  for (auto& e : engines) EXPECT_EQ(e.sink->kinds(), "S");
  PushAll(b->sync_id);
  auto st = CommitAcked(b->sync_id, engines);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->state, "committed");
  EXPECT_EQ(st->version, 7u);
  EXPECT_EQ(st->engines, 2u);
  EXPECT_EQ(st->world_size, 2u);
  EXPECT_EQ(st->bytes_written, b->bytes_planned);
  uint64_t engine_bytes = 0;
  for (auto& e : engines) {
    EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
    EXPECT_EQ(e.sink->kinds(), "SC");
    for (const auto& ev : e.sink->events()) EXPECT_EQ(ev.version, 7u);
    engine_bytes += shm_.Bytes(e.buffer).size();
  }
  EXPECT_EQ(st->bytes_written, engine_bytes);  // every engine byte exactly once, padding included

  StatusSnapshot s = coord_->GetStatus();
  EXPECT_EQ(s.syncs_committed, 1u);
  EXPECT_EQ(s.syncs_aborted, 0u);
  ASSERT_EQ(s.models.size(), 1u);
  EXPECT_EQ(s.models[0].committed_version, 7u);
  EXPECT_EQ(s.models[0].engine_ranks, 2u);
  EXPECT_EQ(s.models[0].replicas, 1u);
  ASSERT_EQ(s.engines.size(), 2u);
  for (const auto& e : s.engines) EXPECT_EQ(e.applied_version, 7u);
  ASSERT_TRUE(s.last_sync.has_value());
  EXPECT_EQ(s.last_sync->state, "committed");
  EXPECT_TRUE(s.current_syncs.empty());

  // The next version reuses the registrations.
  auto b2 = coord_->BeginSync(Self(), Manifest(8));
  ASSERT_TRUE(b2.ok()) << b2.status().ToString();
  PushAll(b2->sync_id);
  ASSERT_TRUE(CommitAcked(b2->sync_id, engines).ok());
  EXPECT_EQ(coord_->GetStatus().models[0].committed_version, 8u);
}

// The layer's shards by manifest index (the lean LayerData form): every
// shard of a rank is in its one trainer buffer.
LayerShards ByIndex(const std::vector<std::pair<std::string, MemoryRef>>& named,
                    const std::vector<std::string>& order) {
  LayerShards l;
  for (const auto& [name, ref] : named) {
    l.index.push_back(static_cast<uint32_t>(std::find(order.begin(), order.end(), name) - order.begin()));
    l.offset.push_back(ref.offset);
    l.object = ref;
  }
  l.object.offset = l.object.length = 0;
  return l;
}

TEST_F(CoordinatorTest, PlanReuseAndWhatForcesARePlan) {
  auto engines = RegisterAll();
  std::vector<std::string> order;
  for (const auto& s : sources_) order.push_back(s.name);
  // One sync: engine buffers scrambled first, then every byte checked.
  auto sync = [&](SourceManifest mf, std::vector<EngineHandle>& engs, bool by_index) -> BeginSyncResult {
    auto b = coord_->BeginSync(Self(), std::move(mf));
    EXPECT_TRUE(b.ok()) << b.status().ToString();
    if (!b.ok()) return {};
    for (auto& e : engs) std::fill_n(shm_.Data(e.buffer), shm_.Bytes(e.buffer).size(), kGarbage);
    for (uint32_t r = 0; r < W_; ++r)
      for (const auto& l : Layers()) {
        auto res = by_index ? coord_->PushLayer(Self(), b->sync_id, r, l, ByIndex(Layer(r, l), order))
                            : coord_->PushLayer(Self(), b->sync_id, r, l, Layer(r, l));
        EXPECT_TRUE(res.ok()) << res.status().ToString();
      }
    auto st = CommitAcked(b->sync_id, engs);
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    for (auto& e : engs) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
    return *b;
  };
  auto lean = [&](uint64_t version, const std::string& fp) {
    SourceManifest m;
    m.model = "toy";
    m.version = version;
    m.world_size = W_;
    m.fingerprint = fp;
    m.reuse_manifest = true;
    return m;
  };
  auto with_fp = [&](uint64_t version, const std::string& fp) {
    SourceManifest m = Manifest(version);
    m.fingerprint = fp;
    return m;
  };

  BeginSyncResult b = sync(with_fp(1, "fp1"), engines, false);
  EXPECT_FALSE(b.plan_reused);
  // The same manifest in full: the plan is reused; the bytes are identical (checked in sync()).
  b = sync(with_fp(2, "fp1"), engines, true);
  EXPECT_TRUE(b.plan_reused);
  EXPECT_FALSE(b.manifest_reused);
  // By fingerprint only.
  b = sync(lean(3, "fp1"), engines, true);
  EXPECT_TRUE(b.plan_reused);
  EXPECT_TRUE(b.manifest_reused);
  // A fingerprint the daemon keeps nothing under: NotFound, and the model is not left busy.
  auto nf = coord_->BeginSync(Self(), lean(4, "fp-other"));
  EXPECT_EQ(nf.status().code(), Code::kNotFound) << nf.status().ToString();
  EXPECT_ERR(nf.status(), "no manifest is kept under fingerprint fp-other");
  SourceManifest bad = lean(4, "fp1");
  bad.world_size = W_ + 1;
  EXPECT_EQ(coord_->BeginSync(Self(), bad).status().code(), Code::kNotFound);
  // A changed manifest (a shard moved to another rank) re-plans.
  SourceManifest changed = with_fp(4, "fp2");
  std::swap(changed.tensors[1].shards[0].rank, changed.tensors[1].shards[1].rank);
  auto refused = coord_->BeginSync(Self(), changed);  // validated afresh: rank 0's layer would not match
  ASSERT_TRUE(refused.ok()) << refused.status().ToString();
  EXPECT_FALSE(refused->plan_reused);
  ASSERT_TRUE(coord_->Abort(Self(), refused->sync_id, "test").ok());
  // The same content under another fingerprint is another manifest: planned afresh.
  b = sync(with_fp(5, "fp3"), engines, false);
  EXPECT_FALSE(b.plan_reused);
  b = sync(lean(6, "fp3"), engines, true);
  EXPECT_TRUE(b.plan_reused);
  // A re-registered engine (new memory) re-plans, even with the manifest reused.
  ASSERT_TRUE(coord_->UnregisterEngine(Self(), engines[1].id).ok());
  engines[1] = Register(0, 1);
  b = sync(lean(7, "fp3"), engines, true);
  EXPECT_TRUE(b.manifest_reused);
  EXPECT_FALSE(b.plan_reused);
  b = sync(lean(8, "fp3"), engines, true);
  EXPECT_TRUE(b.plan_reused);
  // A new engine (a second replica) re-plans and is written too.
  engines.push_back(Register(1, 0));
  engines.push_back(Register(1, 1));
  b = sync(lean(9, "fp3"), engines, false);
  EXPECT_FALSE(b.plan_reused);
  EXPECT_EQ(b.engines, 4u);
  b = sync(lean(10, "fp3"), engines, true);
  EXPECT_TRUE(b.plan_reused);
}

TEST_F(CoordinatorTest, LayerByIndexErrorsNameTheTensor) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(1));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  LayerShards l;
  l.object = ShardRef(0, "embed.weight");
  l.index = {999};
  l.offset = {0};
  auto r = coord_->PushLayer(Self(), b->sync_id, 0, "embed", l);
  EXPECT_ERR(r.status(), "tensor index 999 is not below the manifest's");
  auto b2 = coord_->BeginSync(Self(), Manifest(2));
  ASSERT_TRUE(b2.ok()) << b2.status().ToString();
  l.index = {0};
  l.offset = {1u << 30};  // past the buffer
  r = coord_->PushLayer(Self(), b2->sync_id, 0, "embed", l);
  EXPECT_ERR(r.status(), "tensor embed.weight (rank 0)");
  for (auto& e : engines) EXPECT_TRUE(Untouched(e));
}

TEST_F(CoordinatorTest, NegotiatedDtypesArePlannedAndReturned) {
  auto engines = RegisterAll();  // bf16 params; the manifest's sources are f32
  {
    auto b = coord_->BeginSync(Self(), Manifest(1));  // without the flag: no dtypes, f32 planned
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    EXPECT_TRUE(b->dtypes.empty());
    ASSERT_TRUE(coord_->Abort(Self(), b->sync_id, "test").ok());
  }
  SourceManifest m = Manifest(2);
  m.negotiate_dtypes = true;
  auto b = coord_->BeginSync(Self(), m);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  ASSERT_EQ(b->dtypes.size(), m.tensors.size());
  for (const TensorDtypes& d : b->dtypes) {
    EXPECT_EQ(d.wire, DType::kBF16);
    EXPECT_EQ(d.destinations, std::vector<DType>{DType::kBF16});
  }
  // Shards must now come in bf16: f32 bytes are refused, naming the tensor.
  auto bad = coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed"));
  EXPECT_ERR(bad.status(), "tensor embed.weight (rank 0): memory length 48 bytes does not match the shard (24 bytes of bf16)");

  // bf16 copies of the trainer buffers (the values are small integers: exact in bf16).
  for (uint32_t r = 0; r < W_; ++r) {
    const std::vector<uint8_t> f32 = shm_.Bytes(TrainerBuffer(r));
    std::vector<uint8_t> half(f32.size() / 2);
    for (size_t i = 0; i < f32.size() / 4; ++i) {
      float f;
      std::memcpy(&f, f32.data() + 4 * i, 4);
      uint16_t h = kernels::F32ToBF16(f);
      std::memcpy(half.data() + 2 * i, &h, 2);
    }
    shm_.Add(TrainerBuffer(r) + "-bf16", half);
  }
  m.version = 3;
  b = coord_->BeginSync(Self(), m);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  for (uint32_t r = 0; r < W_; ++r)
    for (const auto& l : Layers()) {
      auto shards = Layer(r, l);
      for (auto& [name, ref] : shards) {
        ref.name += "-bf16";
        ref.offset /= 2;
        ref.length /= 2;
      }
      auto res = coord_->PushLayer(Self(), b->sync_id, r, l, shards);
      ASSERT_TRUE(res.ok()) << res.status().ToString();
    }
  auto st = CommitAcked(b->sync_id, engines);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->bytes_read, st->bytes_written - 2 * (((V + 3) / 4 * 4) - V) * H);  // bf16 read; padding is not
  for (auto& e : engines) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
}

TEST_F(CoordinatorTest, TrainerCudaHandlesAreClosedAfterEveryCommitAndAbort) {
  auto engines = RegisterAll();
  EXPECT_EQ(domain_->cuda_trims(), 0);
  auto b = coord_->BeginSync(Self(), Manifest(7));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  PushAll(b->sync_id);
  EXPECT_EQ(domain_->cuda_trims(), 0);  // nothing closed while the sync runs
  ASSERT_TRUE(CommitAcked(b->sync_id, engines).ok());
  EXPECT_EQ(domain_->cuda_trims(), 1);  // closed after the commit, not only on abort
  const int host_trims = domain_->trims();

  auto b2 = coord_->BeginSync(Self(), Manifest(8));
  ASSERT_TRUE(b2.ok()) << b2.status().ToString();
  ASSERT_TRUE(coord_->Abort(Self(), b2->sync_id, "test").ok());
  EXPECT_EQ(domain_->cuda_trims(), 2);
  EXPECT_GT(domain_->trims(), host_trims);  // an abort still trims host objects too
}

TEST_F(CoordinatorTest, TwoReplicasAndTp1) {
  Init(/*T=*/1, /*W=*/3);
  auto engines = RegisterAll(/*replicas=*/2);
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->engines, 2u);
  PushAll(b->sync_id);
  ASSERT_TRUE(CommitAcked(b->sync_id, engines).ok());
  for (auto& e : engines) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
  EXPECT_EQ(coord_->GetStatus().models[0].replicas, 2u);
}

TEST_F(CoordinatorTest, BadManifestNamesTensorAndWritesNothing) {
  auto engines = RegisterAll();
  int maps_before = domain_->map_calls();
  SourceManifest m = Manifest();
  m.tensors[1].shape = {H + 1, H};  // layers.0.q.weight
  SourceTensor extra = m.tensors[0];
  extra.name = "bogus.weight";
  m.tensors.push_back(extra);
  auto b = coord_->BeginSync(Self(), m);
  ASSERT_FALSE(b.ok());
  EXPECT_ERR(b.status(), "bogus.weight");
  EXPECT_ERR(b.status(), "layers.0.q.weight");
  for (auto& e : engines) {
    EXPECT_TRUE(Untouched(e));
    EXPECT_EQ(e.sink->kinds(), "");
  }
  EXPECT_EQ(domain_->map_calls(), maps_before);  // no trainer memory was even mapped
  // The model is free again: a good manifest begins.
  auto ok = coord_->BeginSync(Self(), Manifest());
  EXPECT_TRUE(ok.ok()) << ok.status().ToString();
}

TEST_F(CoordinatorTest, BadMemoryRefInFirstLayerAbortsBeforeAnyByteMoves) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(3));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  auto layer = Layer(0, "layers.0");
  ASSERT_GE(layer.size(), 2u);
  layer.back().second.name = "/no-such-object";  // the last shard of the layer is bad
  auto r = coord_->PushLayer(Self(), b->sync_id, 0, "layers.0", layer);
  ASSERT_FALSE(r.ok());
  EXPECT_ERR(r.status(), layer.back().first);
  EXPECT_ERR(r.status(), "/no-such-object");
  EXPECT_EQ(exec_->runs(), 0);
  for (auto& e : engines) {
    EXPECT_TRUE(Untouched(e)) << e.buffer;
    EXPECT_EQ(e.sink->kinds(), "SA");
    EXPECT_EQ(e.sink->events().back().version, 3u);
    EXPECT_TRUE(Has(e.sink->last_reason(), layer.back().first)) << e.sink->last_reason();
  }
  // Later pushes and Commit hear that the sync was aborted.
  auto again = coord_->PushLayer(Self(), b->sync_id, 1, "embed", Layer(1, "embed"));
  EXPECT_EQ(again.status().code(), Code::kAborted);
  EXPECT_ERR(again.status(), "was aborted");
  EXPECT_EQ(coord_->Commit(Self(), b->sync_id).status().code(), Code::kAborted);
  StatusSnapshot s = coord_->GetStatus();
  EXPECT_EQ(s.syncs_aborted, 1u);
  ASSERT_TRUE(s.last_sync.has_value());
  EXPECT_EQ(s.last_sync->state, "aborted");
  EXPECT_GE(domain_->trims(), 1);  // an aborted sync lets the domain drop cached objects
}

TEST_F(CoordinatorTest, OutOfRangeAndWrongLengthRefsAbort) {
  RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  auto layer = Layer(0, "embed");
  layer[0].second.offset = 1u << 20;  // past the end of the trainer buffer
  auto r = coord_->PushLayer(Self(), b->sync_id, 0, "embed", layer);
  EXPECT_EQ(r.status().code(), Code::kOutOfRange) << r.status().ToString();
  EXPECT_ERR(r.status(), "embed.weight (rank 0)");

  auto b2 = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b2.ok()) << b2.status().ToString();
  layer = Layer(1, "layers.1");
  layer[0].second.length -= 4;
  r = coord_->PushLayer(Self(), b2->sync_id, 1, "layers.1", layer);
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(r.status(), layer[0].first + " (rank 1): memory length");
}

TEST_F(CoordinatorTest, PushErrorsNameTheTensor) {
  RegisterAll();
  struct Case {
    std::function<std::vector<std::pair<std::string, MemoryRef>>()> layer;
    uint32_t rank;
    std::string needle;
  };
  std::vector<Case> cases = {
      {[&] { return std::vector<std::pair<std::string, MemoryRef>>{{"nope.weight", ShardRef(0, "embed.weight")}}; },
       0, "tensor nope.weight is not in the manifest"},
      {[&] {
         auto l = Layer(0, "embed");
         l.push_back(l[0]);
         return l;
       },
       0, "tensor embed.weight (rank 0) was already received"},
      {[&] { return Layer(0, "embed"); }, 5, "rank is not below world_size 2"},
  };
  for (const auto& c : cases) {
    auto b = coord_->BeginSync(Self(), Manifest());
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    auto r = coord_->PushLayer(Self(), b->sync_id, c.rank, "L", c.layer());
    ASSERT_FALSE(r.ok());
    EXPECT_ERR(r.status(), c.needle);
    EXPECT_EQ(coord_->GetStatus().current_syncs.size(), 0u) << "the sync must be aborted";
  }
  // A shard pushed twice in separate layers.
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed")).ok());
  auto r = coord_->PushLayer(Self(), b->sync_id, 0, "embed-again", Layer(0, "embed"));
  EXPECT_ERR(r.status(), "embed.weight (rank 0) was already received");
}

TEST_F(CoordinatorTest, NoShardForRank) {
  Init(/*T=*/2, /*W=*/4);  // norm weights have 4 rows: every rank has one; embed (6 rows) leaves rank 3 empty
  RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  auto r = coord_->PushLayer(Self(), b->sync_id, 3, "embed", {{"embed.weight", ShardRef(2, "embed.weight")}});
  EXPECT_ERR(r.status(), "tensor embed.weight has no shard for rank 3");
}

TEST_F(CoordinatorTest, CommitListsMissingShards) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  for (const auto& l : Layers()) ASSERT_TRUE(coord_->PushLayer(Self(), b->sync_id, 0, l, Layer(0, l)).ok());
  ASSERT_TRUE(coord_->PushLayer(Self(), b->sync_id, 1, "embed", Layer(1, "embed")).ok());
  auto c = coord_->Commit(Self(), b->sync_id);
  EXPECT_EQ(c.status().code(), Code::kFailedPrecondition);
  EXPECT_ERR(c.status(), "layers.0.q.weight (rank 1)");
  EXPECT_ERR(c.status(), "layers.1.norm.weight (rank 1)");
  EXPECT_ERR(c.status(), "6 missing");
  for (auto& e : engines) EXPECT_EQ(e.sink->kinds(), "SA");
}

TEST_F(CoordinatorTest, TrainerDisconnectAborts) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed")).ok());
  coord_->TrainerStreamClosed(Self(), b->sync_id, 0, /*clean=*/true);  // a finished rank: fine
  EXPECT_EQ(coord_->GetStatus().current_syncs.size(), 1u);
  coord_->TrainerStreamClosed(Self(), b->sync_id, 1, /*clean=*/false);
  for (auto& e : engines) {
    EXPECT_EQ(e.sink->kinds(), "SA");
    EXPECT_EQ(e.sink->last_reason(), "trainer rank 1 disconnected");
  }
  EXPECT_EQ(coord_->Commit(Self(), b->sync_id).status().code(), Code::kAborted);
}

TEST_F(CoordinatorTest, AckTimeoutAborts) {
  Init(2, 2, std::chrono::milliseconds(200));
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(4));
  ASSERT_TRUE(b.ok());
  PushAll(b->sync_id);
  auto fut = std::async(std::launch::async, [&] { return coord_->Commit(Self(), b->sync_id); });
  ASSERT_TRUE(engines[0].sink->WaitFor(Kind::kCommitted));
  ASSERT_TRUE(coord_->AckVersion(Self(), engines[0].id, 4, true, "").ok());  // only engine 0 acks
  auto c = fut.get();
  EXPECT_EQ(c.status().code(), Code::kDeadlineExceeded);
  EXPECT_ERR(c.status(), engines[1].id);
  EXPECT_FALSE(Has(c.status().message(), engines[0].id + " ")) << c.status().ToString();
  for (auto& e : engines) EXPECT_EQ(e.sink->kinds(), "SCA");
  // A late ack is refused, harmlessly.
  EXPECT_EQ(coord_->AckVersion(Self(), engines[1].id, 4, true, "").code(), Code::kFailedPrecondition);
  EXPECT_EQ(coord_->GetStatus().models[0].committed_version, 0u);
}

TEST_F(CoordinatorTest, EngineLeavingAfterItsAckDoesNotAbortTheCommit) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(6));
  ASSERT_TRUE(b.ok());
  PushAll(b->sync_id);
  auto fut = std::async(std::launch::async, [&] { return coord_->Commit(Self(), b->sync_id); });
  ASSERT_TRUE(engines[0].sink->WaitFor(Kind::kCommitted));
  ASSERT_TRUE(coord_->AckVersion(Self(), engines[0].id, 6, true, "").ok());
  ASSERT_TRUE(coord_->UnregisterEngine(Self(), engines[0].id).ok());  // applied, then left
  ASSERT_TRUE(engines[1].sink->WaitFor(Kind::kCommitted));
  ASSERT_TRUE(coord_->AckVersion(Self(), engines[1].id, 6, true, "").ok());
  auto c = fut.get();
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(engines[1].sink->kinds(), "SC");
}

TEST_F(CoordinatorTest, EngineLeavingBeforeItsAckAbortsTheCommit) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(7));
  ASSERT_TRUE(b.ok());
  PushAll(b->sync_id);
  auto fut = std::async(std::launch::async, [&] { return coord_->Commit(Self(), b->sync_id); });
  ASSERT_TRUE(engines[0].sink->WaitFor(Kind::kCommitted));
  ASSERT_TRUE(coord_->UnregisterEngine(Self(), engines[0].id).ok());  // left without applying
  auto c = fut.get();
  EXPECT_EQ(c.status().code(), Code::kAborted);
  EXPECT_ERR(c.status(), "unregistered");
}

TEST_F(CoordinatorTest, InPlaceWritesWaitForThePauseAckStagedOnesDoNot) {
  std::vector<EngineHandle> engines{Register(0, 0, /*acks_pause=*/true), Register(0, 1, true, /*staged=*/true)};
  auto b = coord_->BeginSync(Self(), Manifest(3));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  // A layer with bytes for the in-place engine waits for its ack; the staged engine never acks.
  auto push = std::async(std::launch::async,
                         [&] { return coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed")); });
  EXPECT_EQ(push.wait_for(std::chrono::milliseconds(300)), std::future_status::timeout);
  EXPECT_TRUE(Untouched(engines[0]));
  EXPECT_TRUE(Untouched(engines[1]));
  ASSERT_TRUE(coord_->AckPaused(Self(), engines[0].id, b->sync_id).ok());
  auto r = push.get();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_FALSE(Untouched(engines[0]));
  for (uint32_t rank = 0; rank < W_; ++rank)  // the rest goes without waiting
    for (const auto& l : Layers())
      if (rank != 0 || l != "embed") ASSERT_TRUE(coord_->PushLayer(Self(), b->sync_id, rank, l, Layer(rank, l)).ok());
  auto st = CommitAcked(b->sync_id, engines);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  for (auto& e : engines) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e));
  auto status = coord_->GetStatus();
  ASSERT_EQ(status.engines.size(), 2u);
  for (const auto& e : status.engines) {
    EXPECT_TRUE(e.acks_pause);
    EXPECT_EQ(e.staged_params, e.engine_id == engines[1].id ? e.params : 0u);
    EXPECT_EQ(e.staged_bytes, e.engine_id == engines[1].id ? e.bytes : 0u);
  }
  // No sync in flight: nothing waits for a pause.
  EXPECT_EQ(coord_->AckPaused(Self(), engines[0].id, b->sync_id).code(), Code::kFailedPrecondition);
}

TEST_F(CoordinatorTest, EnginesWithoutPauseAcksAreWrittenAtOnce) {
  auto engines = RegisterAll();  // acks_pause unset: clients from before the barrier
  auto b = coord_->BeginSync(Self(), Manifest(2));
  ASSERT_TRUE(b.ok());
  PushAll(b->sync_id);
  ASSERT_TRUE(CommitAcked(b->sync_id, engines).ok());
}

TEST_F(CoordinatorTest, MissingPauseAckAbortsNamingTheEngine) {
  Init(2, 2, std::chrono::seconds(10), /*progress_timeout=*/std::chrono::milliseconds(300));
  std::vector<EngineHandle> engines{Register(0, 0, /*acks_pause=*/true), Register(0, 1, /*acks_pause=*/true)};
  auto b = coord_->BeginSync(Self(), Manifest(5));
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(coord_->AckPaused(Self(), engines[1].id, b->sync_id).ok());  // only tp 1 pauses
  auto r = coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed"));
  EXPECT_EQ(r.status().code(), Code::kDeadlineExceeded) << r.status().ToString();
  EXPECT_ERR(r.status(), "no AckPaused");
  EXPECT_ERR(r.status(), engines[0].id);
  EXPECT_FALSE(Has(r.status().message(), engines[1].id + " ")) << r.status().ToString();
  for (auto& e : engines) {
    EXPECT_TRUE(Untouched(e));
    EXPECT_EQ(e.sink->kinds(), "SA");
  }
  EXPECT_EQ(coord_->Commit(Self(), b->sync_id).status().code(), Code::kAborted);
  EXPECT_TRUE(coord_->GetStatus().current_syncs.empty());
}

TEST_F(CoordinatorTest, IdleSyncIsAbortedAndFreesTheModel) {
  Init(2, 2, std::chrono::seconds(10), std::chrono::minutes(5));
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(8));  // the trainer then dies before its first layer
  ASSERT_TRUE(b.ok());
  clock_.Advance(std::chrono::minutes(4));  // not idle long enough: housekeeping passes leave it
  EXPECT_FALSE(engines[0].sink->WaitFor(Kind::kAborted, b->sync_id, std::chrono::milliseconds(100)));
  clock_.Advance(std::chrono::minutes(2));
  for (auto& e : engines) ASSERT_TRUE(e.sink->WaitFor(Kind::kAborted, b->sync_id, std::chrono::seconds(5)));
  EXPECT_ERR(coord_->Commit(Self(), b->sync_id).status(), "no trainer activity");
  auto again = coord_->BeginSync(Self(), Manifest(9));  // the model is free again
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  PushAll(again->sync_id);
  auto c = CommitAcked(again->sync_id, engines);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
}

TEST_F(CoordinatorTest, FailedAckAbortsWithEngineError) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(5));
  ASSERT_TRUE(b.ok());
  PushAll(b->sync_id);
  auto c = CommitAcked(b->sync_id, engines, /*fail_id=*/engines[1].id);
  EXPECT_EQ(c.status().code(), Code::kAborted);
  EXPECT_ERR(c.status(), "out of memory applying weights");
  EXPECT_ERR(c.status(), engines[1].id);
  EXPECT_EQ(engines[0].sink->kinds(), "SCA");
}

TEST_F(CoordinatorTest, OneSyncPerModel) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(1));
  ASSERT_TRUE(b.ok());
  auto b2 = coord_->BeginSync(Self(), Manifest(2));
  EXPECT_EQ(b2.status().code(), Code::kFailedPrecondition);
  EXPECT_ERR(b2.status(), "one sync per model");
  // A new engine rank of the model cannot join mid-sync.
  EngineHandle h;
  std::vector<MemoryRef> mem;
  auto spec = Spec(1, 0, &mem, &h);
  auto r = coord_->RegisterEngine(Self(), spec, mem, h.sink.get());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_ERR(r.status(), "in flight");
  ASSERT_TRUE(coord_->Abort(Self(), b->sync_id, "trainer restarts").ok());
  for (auto& e : engines) EXPECT_EQ(e.sink->last_reason(), "trainer restarts");
  EXPECT_EQ(coord_->Abort(Self(), b->sync_id, "again").code(), Code::kAborted);
  EXPECT_EQ(coord_->Abort(Self(), 12345, "x").code(), Code::kNotFound);
  EXPECT_TRUE(coord_->BeginSync(Self(), Manifest(2)).ok());
}

TEST_F(CoordinatorTest, BeginSyncNeedsEveryTpRank) {
  EXPECT_ERR(coord_->BeginSync(Self(), Manifest()).status(), "no engines registered for model toy");
  Register(0, 0);
  Register(1, 1);
  auto b = coord_->BeginSync(Self(), Manifest());
  EXPECT_EQ(b.status().code(), Code::kFailedPrecondition);
  EXPECT_ERR(b.status(), "replica 0 is missing tp ranks 1 (tp_size 2)");
  EXPECT_ERR(b.status(), "replica 1 is missing tp ranks 0 (tp_size 2)");
}

TEST_F(CoordinatorTest, RegistrationErrors) {
  Register(0, 0);
  auto try_reg = [&](std::function<void(EngineRankSpec&, std::vector<MemoryRef>&)> edit, uint32_t replica = 0,
                     uint32_t tp = 1) {
    EngineHandle h;
    std::vector<MemoryRef> mem;
    EngineRankSpec spec = Spec(replica, tp, &mem, &h);
    edit(spec, mem);
    return coord_->RegisterEngine(Self(), spec, mem, h.sink.get()).status();
  };
  auto nop = [](EngineRankSpec&, std::vector<MemoryRef>&) {};
  Status s = try_reg(nop, 0, 0);
  EXPECT_EQ(s.code(), Code::kAlreadyExists);
  EXPECT_ERR(s, "replica 0 tp_rank 0 is already registered");
  EXPECT_EQ(domain_->trims(), 1);  // its memory was mapped, then refused: trimmed

  s = try_reg([](EngineRankSpec& sp, std::vector<MemoryRef>& m) { m[1].length -= 2; });
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_ERR(s, "param layers.0.qk.weight: memory length");

  s = try_reg([](EngineRankSpec& sp, std::vector<MemoryRef>& m) { sp.params[2].shape = {H + 4}; });
  EXPECT_ERR(s, "layers.0.norm.weight");

  s = try_reg([](EngineRankSpec& sp, std::vector<MemoryRef>& m) {
    sp.params.pop_back();
    m.pop_back();
  });
  EXPECT_ERR(s, "layers.1.norm.weight");

  s = try_reg([](EngineRankSpec& sp, std::vector<MemoryRef>& m) { sp.architecture = "NopeForCausalLM"; });
  EXPECT_ERR(s, "NopeForCausalLM");

  s = try_reg([](EngineRankSpec& sp, std::vector<MemoryRef>& m) { m[0].name = "/missing"; });
  EXPECT_ERR(s, "param embed.weight");
  EXPECT_ERR(s, "/missing");

  // Inconsistent with the model's first engine.
  s = try_reg([](EngineRankSpec& sp, std::vector<MemoryRef>& m) {
    sp.hf_config_json = R"({"hidden_size": 4, "vocab_size": 6, "num_layers": 2, "extra": 1})";
  });
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_ERR(s, "hf_config_json");

  {
    EngineHandle h;
    std::vector<MemoryRef> mem;
    EngineRankSpec spec = Spec(1, 0, &mem, &h, /*tp_size=*/1);
    s = coord_->RegisterEngine(Self(), spec, mem, h.sink.get()).status();
    EXPECT_ERR(s, "tp_size 1 but the model's other engines use tp_size 2");
  }
  {
    EngineHandle h;
    std::vector<MemoryRef> mem;
    EngineRankSpec spec = Spec(0, 1, &mem, &h);
    shm_.Add(h.buffer, shm_.Bytes(h.buffer).size(), /*writable=*/false);
    s = coord_->RegisterEngine(Self(), spec, mem, h.sink.get()).status();
    EXPECT_ERR(s, "param embed.weight: memory");
    EXPECT_ERR(s, "is read-only for in-process caller");
  }
  s = try_reg([](EngineRankSpec& sp, std::vector<MemoryRef>& m) { sp.tp_rank = 2; });
  EXPECT_ERR(s, "tp_rank 2 is not below tp_size 2");

  EXPECT_EQ(coord_->GetStatus().engines.size(), 1u);
}

TEST_F(CoordinatorTest, ExplicitMappingCoversUnknownArchitecture) {
  EngineHandle h;
  std::vector<MemoryRef> mem;
  EngineRankSpec spec;
  spec.model = "custom";
  spec.architecture = "CustomForCausalLM";
  spec.hf_config_json = R"({"d": 4})";
  spec.tp_size = 1;
  spec.params.push_back(EngineParamSpec{
      "w", {4, 4}, DType::kF32,
      R"({"name": "w", "parts": [{"src": "w_src", "transpose": true}], "sources": [{"name": "w_src", "shape": ["d", "d"]}]})"});
  h.buffer = "/custom";
  shm_.Add(h.buffer, 64);
  MemoryRef ref;
  ref.name = h.buffer;
  ref.length = 64;
  auto id = coord_->RegisterEngine(Self(), spec, {ref}, h.sink.get());
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  h.id = *id;

  std::vector<float> src(16);
  for (int i = 0; i < 16; ++i) src[i] = static_cast<float>(i);
  std::memcpy(shm_.Add("/custom-trainer", 64), src.data(), 64);
  SourceManifest m;
  m.model = "custom";
  m.version = 1;
  m.world_size = 1;
  m.tensors.push_back(SourceTensor{"w_src", {4, 4}, DType::kF32, {ShardSpec{0, 0, 0, 4}}});
  auto b = coord_->BeginSync(Self(), m);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  MemoryRef sref;
  sref.name = "/custom-trainer";
  sref.length = 64;
  ASSERT_TRUE(coord_->PushLayer(Self(), b->sync_id, 0, "all", {{"w_src", sref}}).ok());
  std::vector<EngineHandle> engines{h};
  ASSERT_TRUE(CommitAcked(b->sync_id, engines).ok());
  const std::vector<uint8_t> bytes = shm_.Bytes(h.buffer);
  const float* out = reinterpret_cast<const float*>(bytes.data());
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) EXPECT_EQ(out[i * 4 + j], src[j * 4 + i]);
}

TEST_F(CoordinatorTest, UnregisterAbortsInFlightSync) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(coord_->UnregisterEngine(Self(), engines[1].id).ok());
  EXPECT_EQ(engines[0].sink->kinds(), "SA");
  EXPECT_ERR(Status(Code::kAborted, engines[0].sink->last_reason()), engines[1].id + " (toy replica 0 tp_rank 1");
  EXPECT_ERR(Status(Code::kAborted, engines[0].sink->last_reason()), "unregistered");
  EXPECT_EQ(engines[1].sink->kinds(), "S");  // a departed engine hears nothing more
  EXPECT_EQ(coord_->UnregisterEngine(Self(), engines[1].id).code(), Code::kNotFound);
  EXPECT_GE(domain_->trims(), 1);
  // It can come back; the model then syncs again.
  engines[1] = Register(0, 1);
  auto b2 = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b2.ok()) << b2.status().ToString();
  PushAll(b2->sync_id);
  ASSERT_TRUE(CommitAcked(b2->sync_id, engines).ok());
  // The last engine leaving forgets the model (a re-registration may change TP).
  for (auto& e : engines) ASSERT_TRUE(coord_->UnregisterEngine(Self(), e.id).ok());
  EXPECT_TRUE(coord_->GetStatus().models.empty());
}

TEST_F(CoordinatorTest, AbortWaitsForRunningCopyBeforeTellingEngines) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  exec_->Hold();
  auto push = std::async(std::launch::async,
                         [&] { return coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed")); });
  ASSERT_TRUE(exec_->WaitInRun());
  ASSERT_TRUE(coord_->Abort(Self(), b->sync_id, "operator said so").ok());
  // The copy is still running: engines must not hear Aborted yet, and the
  // model stays busy.
  EXPECT_FALSE(engines[0].sink->WaitFor(Kind::kAborted, b->sync_id, std::chrono::milliseconds(50)));
  for (auto& e : engines) EXPECT_EQ(e.sink->kinds(), "S");
  EXPECT_ERR(coord_->BeginSync(Self(), Manifest()).status(), "still finishing its copies");
  exec_->Release();
  auto r = push.get();
  EXPECT_EQ(r.status().code(), Code::kAborted);
  for (auto& e : engines) EXPECT_EQ(e.sink->kinds(), "SA");
  EXPECT_TRUE(coord_->BeginSync(Self(), Manifest()).ok());
}

TEST_F(CoordinatorTest, ExecutorFailureAborts) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  exec_->FailWith(Internal("device lost"));
  auto r = coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed"));
  EXPECT_ERR(r.status(), "device lost");
  for (auto& e : engines) EXPECT_EQ(e.sink->kinds(), "SA");
}

TEST_F(CoordinatorTest, ExecutorFailureOnALaterLayerAbortsAfterEarlierLayersLanded) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  const auto layers = Layers();
  ASSERT_GE(layers.size(), 2u);
  exec_->FailRun(exec_->runs() + 2, Internal("device lost on the second layer"));
  EXPECT_TRUE(coord_->PushLayer(Self(), b->sync_id, 0, layers[0], Layer(0, layers[0])).ok());
  auto r = coord_->PushLayer(Self(), b->sync_id, 0, layers[1], Layer(0, layers[1]));
  EXPECT_ERR(r.status(), "device lost on the second layer");
  for (auto& e : engines) EXPECT_EQ(e.sink->kinds(), "SA");
  EXPECT_EQ(coord_->Commit(Self(), b->sync_id).status().code(), Code::kAborted);
}

TEST_F(CoordinatorTest, ExecutorFailureOnMatchingOpsNamesTheSync) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  exec_->FailOpsMatching([](const std::string& label) { return Has(label, "embed.weight"); },
                         Internal("injected fault copying the embedding"));
  auto r = coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed"));
  EXPECT_ERR(r.status(), "injected fault copying the embedding");
  for (auto& e : engines) {
    EXPECT_TRUE(Untouched(e));
    EXPECT_EQ(e.sink->kinds(), "SA");
  }
}

TEST_F(CoordinatorTest, MapFailureOfATrainerObjectAbortsNamingTheTensor) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  domain_->FailMap(TrainerBuffer(1), Unavailable("injected: object vanished"));
  auto r = coord_->PushLayer(Self(), b->sync_id, 1, "embed", Layer(1, "embed"));
  EXPECT_ERR(r.status(), "injected: object vanished");
  EXPECT_ERR(r.status(), "embed.weight");
  for (auto& e : engines) {
    EXPECT_TRUE(Untouched(e));
    EXPECT_EQ(e.sink->kinds(), "SA");
  }
  EXPECT_EQ(exec_->runs(), 0);
}

// A domain that maps fewer bytes than the reference asked for is a daemon
// bug (domains check offset + length against the object): the daemon aborts
// with a message rather than copy against a wrong mapping.
TEST_F(CoordinatorTest, ShortMappingFromTheDomainIsABrokenInvariant) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  domain_->ShortenMap(TrainerBuffer(0), 8);  // a broken domain: 8 bytes fewer than the reference asked for
  EXPECT_DEATH((void)coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed")), "invariant violated");
}

TEST_F(CoordinatorTest, AbortAllStopsEverything) {
  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest());
  ASSERT_TRUE(b.ok());
  PushAll(b->sync_id);
  auto fut = std::async(std::launch::async, [&] { return coord_->Commit(Self(), b->sync_id); });
  ASSERT_TRUE(engines[0].sink->WaitFor(Kind::kCommitted));
  coord_->AbortAll("the daemon is shutting down");
  auto c = fut.get();  // the waiting Commit returns at once
  EXPECT_EQ(c.status().code(), Code::kAborted);
  EXPECT_ERR(c.status(), "shutting down");
  for (auto& e : engines) EXPECT_EQ(e.sink->kinds(), "SCA");
  EXPECT_EQ(coord_->BeginSync(Self(), Manifest()).status().code(), Code::kUnavailable);
  EngineHandle h;
  std::vector<MemoryRef> mem;
  auto spec = Spec(3, 0, &mem, &h);
  EXPECT_EQ(coord_->RegisterEngine(Self(), spec, mem, h.sink.get()).status().code(), Code::kUnavailable);
}

TEST_F(CoordinatorTest, ConcurrentRanksPushInParallel) {
  Init(/*T=*/2, /*W=*/4);
  auto engines = RegisterAll(/*replicas=*/2);
  for (int round = 0; round < 5; ++round) {
    auto b = coord_->BeginSync(Self(), Manifest(round + 1));
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    std::vector<std::thread> ranks;
    std::atomic<int> failures{0};
    for (uint32_t r = 0; r < W_; ++r)
      ranks.emplace_back([&, r] {
        for (const auto& l : Layers()) {
          auto layer = Layer(r, l);
          if (!coord_->PushLayer(Self(), b->sync_id, r, l, layer).ok()) failures++;
        }
      });
    for (auto& t : ranks) t.join();
    ASSERT_EQ(failures.load(), 0);
    ASSERT_TRUE(CommitAcked(b->sync_id, engines).ok());
  }
  for (auto& e : engines) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
}

TEST(CoordinatorRealLayouts, LlamaExampleConfigSyncs) {
  auto reg = LayoutRegistry::LoadDir(WS_LAYOUTS_DIR);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  auto cfg = (*reg)->ExampleConfig("LlamaForCausalLM");
  ASSERT_TRUE(cfg.ok()) << cfg.status().ToString();
  ShmDir shm;
  auto domain = WrappedHostDomain(shm);
  auto exec = WrappedHostExecutor();
  Coordinator coord(*reg, domain.get(), exec.get());
  const uint32_t T = 2, W = 3;
  std::vector<std::shared_ptr<RecordingSink>> sinks;
  std::vector<std::string> ids;
  std::vector<ExpectedSource> sources;
  uint64_t engine_bytes = 0;
  for (uint32_t tp = 0; tp < T; ++tp) {
    ResolveOptions o;
    o.tp_size = T;
    o.tp_rank = tp;
    auto layout = (*reg)->Resolve("LlamaForCausalLM", *cfg, o);
    ASSERT_TRUE(layout.ok()) << layout.status().ToString();
    sources = layout->sources;
    EngineRankSpec spec;
    spec.model = "llama";
    spec.architecture = "LlamaForCausalLM";
    spec.hf_config_json = *cfg;
    spec.tp_rank = tp;
    spec.tp_size = T;
    std::vector<MemoryRef> mem;
    std::string buf = "/llama-engine" + std::to_string(tp);
    uint64_t off = 0;
    for (const auto& p : layout->params) {
      spec.params.push_back(EngineParamSpec{p.name, p.shape, DType::kBF16, ""});
      MemoryRef r;
      r.name = buf;
      r.offset = off;
      r.length = NumElements(p.shape) * 2;
      off += r.length;
      mem.push_back(r);
    }
    shm.Add(buf, off);
    engine_bytes += off;
    sinks.push_back(std::make_shared<RecordingSink>());
    auto id = coord.RegisterEngine(Self(), spec, mem, sinks.back().get());
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    ids.push_back(*id);
  }
  SourceManifest m;
  m.model = "llama";
  m.version = 1;
  m.world_size = W;
  std::vector<std::vector<std::pair<std::string, MemoryRef>>> per_rank(W);
  for (const auto& s : sources) {
    SourceTensor t{s.name, s.shape, DType::kF32, {}};
    int64_t rows = s.shape[0], row = NumElements(s.shape) / std::max<int64_t>(rows, 1);
    int64_t c = (rows + W - 1) / W;
    for (uint32_t r = 0; r < W; ++r) {
      int64_t a = std::min<int64_t>(r * c, rows), b = std::min<int64_t>((r + 1) * c, rows);
      t.shards.push_back(ShardSpec{r, 0, a, b - a});
      if (b == a) continue;
      std::string name = "/llama-" + s.name + "-" + std::to_string(r);
      shm.Add(name, (b - a) * row * 4);
      MemoryRef ref;
      ref.name = name;
      ref.length = (b - a) * row * 4;
      per_rank[r].emplace_back(s.name, ref);
    }
    m.tensors.push_back(std::move(t));
  }
  auto b = coord.BeginSync(Self(), m);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(b->bytes_planned, engine_bytes);
  for (uint32_t r = 0; r < W; ++r) {
    auto res = coord.PushLayer(Self(), b->sync_id, r, "all", per_rank[r]);
    ASSERT_TRUE(res.ok()) << res.status().ToString();
  }
  auto fut = std::async(std::launch::async, [&] { return coord.Commit(Self(), b->sync_id); });
  for (size_t i = 0; i < ids.size(); ++i) {
    ASSERT_TRUE(sinks[i]->WaitFor(Kind::kCommitted));
    ASSERT_TRUE(coord.AckVersion(Self(), ids[i], 1, true, "").ok());
  }
  auto c = fut.get();
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->bytes_written, engine_bytes);
}


// ---------------------------------------------------------------- trust boundary

Peer UnixPeer(uint32_t uid) {
  Peer p;
  p.via = Peer::Via::kUnix;
  p.has_creds = true;
  p.uid = p.gid = uid;
  p.pid = 4000 + static_cast<int32_t>(uid);
  p.principal = "uid:" + std::to_string(uid);
  return p;
}

// Peers other than the test's own uid: the shm objects they register or
// push are theirs (the real domain checks the owner).
class CoordinatorOwnershipTest : public CoordinatorTest {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root: shm objects are given to other uids";
    CoordinatorTest::SetUp();
    for (uint32_t r = 0; r < W_; ++r) shm_.Chown(TrainerBuffer(r), alice_.uid);
  }
  EngineHandle RegisterAs(const Peer& who, uint32_t replica, uint32_t tp, Status* st = nullptr) {
    EngineHandle h;
    std::vector<MemoryRef> mem;
    EngineRankSpec spec = Spec(replica, tp, &mem, &h);
    shm_.Chown(h.buffer, who.uid);
    auto id = coord_->RegisterEngine(who, spec, mem, h.sink.get());
    if (st) *st = id.status();
    if (id.ok()) h.id = *id;
    sinks_.push_back(h.sink);
    return h;
  }
  const Peer alice_ = UnixPeer(1000), bob_ = UnixPeer(1001);
};

TEST_F(CoordinatorOwnershipTest, OnlyTheOwnerActsOnEnginesModelsAndSyncs) {
  std::vector<EngineHandle> engines{RegisterAs(alice_, 0, 0), RegisterAs(alice_, 0, 1)};
  ASSERT_FALSE(engines[0].id.empty());
  ASSERT_FALSE(engines[1].id.empty());

  // Another principal can neither remove, acknowledge, join nor sync alice's model.
  Status st = coord_->UnregisterEngine(bob_, engines[0].id);
  EXPECT_EQ(st.code(), Code::kPermissionDenied);
  EXPECT_ERR(st, "belongs to uid:1000");
  EXPECT_ERR(st, "uid 1001 pid 5001");
  EXPECT_EQ(coord_->AckVersion(bob_, engines[0].id, 1, true, "").code(), Code::kPermissionDenied);
  Status join;
  RegisterAs(bob_, 1, 0, &join);  // a fake replica would block every sync of the model
  EXPECT_EQ(join.code(), Code::kPermissionDenied);
  EXPECT_ERR(join, "may not register engines");
  EXPECT_EQ(coord_->BeginSync(bob_, Manifest()).status().code(), Code::kPermissionDenied);

  auto b = coord_->BeginSync(alice_, Manifest(1));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ(coord_->Abort(bob_, b->sync_id, "hostile").code(), Code::kPermissionDenied);
  EXPECT_EQ(coord_->PushLayer(bob_, b->sync_id, 0, "embed", Layer(0, "embed")).status().code(),
            Code::kPermissionDenied);
  EXPECT_EQ(coord_->Commit(bob_, b->sync_id).status().code(), Code::kPermissionDenied);
  coord_->TrainerStreamClosed(bob_, b->sync_id, 0, /*clean=*/false);  // ignored: not bob's sync
  for (uint32_t r = 0; r < W_; ++r)
    for (const auto& l : Layers()) ASSERT_TRUE(coord_->PushLayer(alice_, b->sync_id, r, l, Layer(r, l)).ok());
  auto fut = std::async(std::launch::async, [&] { return coord_->Commit(alice_, b->sync_id); });
  for (auto& e : engines) {
    ASSERT_TRUE(e.sink->WaitFor(Kind::kCommitted, b->sync_id, std::chrono::seconds(5)));
    // A bogus ack from another principal does not count for the engine.
    EXPECT_EQ(coord_->AckVersion(bob_, e.id, 1, true, "").code(), Code::kPermissionDenied);
    ASSERT_TRUE(coord_->AckVersion(alice_, e.id, 1, true, "").ok());
  }
  auto c = fut.get();
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  for (const auto& e : engines) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e));

  // An admin (root or configured) may act on anything.
  auto b2 = coord_->BeginSync(alice_, Manifest(2));
  ASSERT_TRUE(b2.ok());
  EXPECT_TRUE(coord_->Abort(Self(), b2->sync_id, "operator").ok());
  EXPECT_TRUE(coord_->UnregisterEngine(Self(), engines[1].id).ok());
  EXPECT_TRUE(coord_->UnregisterEngine(alice_, engines[0].id).ok());
}

TEST_F(CoordinatorOwnershipTest, VersionsStrictlyIncrease) {
  auto engines = RegisterAll();
  EXPECT_ERR(coord_->BeginSync(Self(), Manifest(0)).status(), "version must be at least 1");
  auto b = coord_->BeginSync(Self(), Manifest(5));
  ASSERT_TRUE(b.ok());
  PushAll(b->sync_id);
  ASSERT_TRUE(CommitAcked(b->sync_id, engines).ok());
  for (uint64_t v : {5, 4}) {
    auto again = coord_->BeginSync(Self(), Manifest(v));
    EXPECT_EQ(again.status().code(), Code::kFailedPrecondition);
    EXPECT_ERR(again.status(), "not above the committed version 5");
  }
  auto next = coord_->BeginSync(Self(), Manifest(6));
  EXPECT_TRUE(next.ok()) << next.status().ToString();
}

TEST_F(CoordinatorOwnershipTest, EngineQuotaPerPeer) {
  max_engines_per_peer_ = 1;
  Init(2, 2);
  Status st;
  RegisterAs(alice_, 0, 0, &st);
  ASSERT_TRUE(st.ok()) << st.ToString();
  RegisterAs(alice_, 0, 1, &st);
  EXPECT_EQ(st.code(), Code::kResourceExhausted);
  EXPECT_ERR(st, "max_engines_per_peer = 1");
}

TEST_F(CoordinatorOwnershipTest, OneParamOverlappingAnotherEngineIsFoundAndNamed) {
  EngineHandle a;
  std::vector<MemoryRef> mem_a;
  EngineRankSpec spec_a = Spec(0, 0, &mem_a, &a);
  ASSERT_TRUE(coord_->RegisterEngine(Self(), spec_a, mem_a, a.sink.get()).ok());
  sinks_.push_back(a.sink);
  // Another model's rank in its own memory, but for one param (the last in
  // both engines' order) that reuses engine a's range.
  EngineHandle b;
  std::vector<MemoryRef> mem_b;
  EngineRankSpec spec_b = Spec(1, 0, &mem_b, &b);
  spec_b.model = "toy2";
  const size_t n = spec_b.params.size() - 1;
  ASSERT_EQ(spec_a.params[n].name, spec_b.params[n].name);
  mem_b[n] = mem_a[n];
  auto rb = coord_->RegisterEngine(Self(), spec_b, mem_b, b.sink.get());
  EXPECT_EQ(rb.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(rb.status(), "param " + spec_b.params[n].name + " ");
  EXPECT_ERR(rb.status(), "overlaps the memory of engine");
  EXPECT_ERR(rb.status(), "param " + spec_a.params[n].name);
  // Its own memory for that param too: accepted.
  EngineHandle c;
  std::vector<MemoryRef> mem_c;
  EngineRankSpec spec_c = Spec(1, 0, &mem_c, &c);
  spec_c.model = "toy2";
  auto rc = coord_->RegisterEngine(Self(), spec_c, mem_c, c.sink.get());
  EXPECT_TRUE(rc.ok()) << rc.status().ToString();
  sinks_.push_back(c.sink);
}

TEST_F(CoordinatorOwnershipTest, AliasAcrossModelsAndWithinARankRefused) {
  // Model toy, replica 0, and a second model whose rank 0 reuses toy's memory.
  EngineHandle a;
  std::vector<MemoryRef> mem_a;
  EngineRankSpec spec_a = Spec(0, 0, &mem_a, &a);
  ASSERT_TRUE(coord_->RegisterEngine(Self(), spec_a, mem_a, a.sink.get()).ok());
  sinks_.push_back(a.sink);

  EngineRankSpec spec_b = spec_a;
  spec_b.model = "toy2";
  std::vector<MemoryRef> mem_b = mem_a;  // same object, same ranges
  auto rb = coord_->RegisterEngine(Self(), spec_b, mem_b, a.sink.get());
  EXPECT_EQ(rb.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(rb.status(), "overlaps the memory of engine");
  EXPECT_ERR(rb.status(), "toy replica 0 tp_rank 0");

  // Within one rank: two params on one range.
  EngineHandle c;
  std::vector<MemoryRef> mem_c;
  EngineRankSpec spec_c = Spec(1, 0, &mem_c, &c);
  // layers.0.norm.weight and layers.1.norm.weight have the same shape: alias them.
  size_t n0 = 2, n1 = 4;
  ASSERT_EQ(spec_c.params[n0].name, "layers.0.norm.weight");
  ASSERT_EQ(spec_c.params[n1].name, "layers.1.norm.weight");
  mem_c[n1] = mem_c[n0];
  auto rc = coord_->RegisterEngine(Self(), spec_c, mem_c, c.sink.get());
  EXPECT_EQ(rc.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(rc.status(), "overlap in memory");
  // ... unless declared as a tied copy.
  spec_c.params[n1].tied_to = "layers.0.norm.weight";
  auto tied = coord_->RegisterEngine(Self(), spec_c, mem_c, c.sink.get());
  EXPECT_TRUE(tied.ok()) << tied.status().ToString();
  sinks_.push_back(c.sink);
  // A tie must name a param of the same rank.
  EngineHandle d;
  std::vector<MemoryRef> mem_d;
  EngineRankSpec spec_d = Spec(1, 1, &mem_d, &d);
  spec_d.params[1].tied_to = "no.such.param";
  EXPECT_ERR(coord_->RegisterEngine(Self(), spec_d, mem_d, d.sink.get()).status(), "tied_to no.such.param");
}

TEST_F(CoordinatorOwnershipTest, MemoryReferencesAlignedToTheirElementSize) {
  EngineHandle h;
  std::vector<MemoryRef> mem;
  EngineRankSpec spec = Spec(0, 0, &mem, &h);
  mem[1].offset += 1;
  auto r = coord_->RegisterEngine(Self(), spec, mem, h.sink.get());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(r.status(), "is not a multiple of the bf16 element size 2");

  auto engines = RegisterAll();
  auto b = coord_->BeginSync(Self(), Manifest(1));
  ASSERT_TRUE(b.ok());
  auto layer = Layer(0, "embed");
  shm_.Add("/odd", layer[0].second.length + 2);
  layer[0].second.name = "/odd";
  layer[0].second.offset = 2;
  auto res = coord_->PushLayer(Self(), b->sync_id, 0, "embed", layer);
  EXPECT_EQ(res.status().code(), Code::kInvalidArgument);
  EXPECT_ERR(res.status(), "is not a multiple of the f32 element size 4");
  for (const auto& e : engines) EXPECT_TRUE(Untouched(e));
}

// ---------------------------------------------------------------- across nodes

// Two nodes in one process: each a real Coordinator whose ClusterLink calls
// the other's peer methods directly; chunk bytes go through a mailbox
// instead of UCX. Packing, scattering, commits and aborts are the real ones.
class LoopbackLink final : public ClusterLink {
 public:
  explicit LoopbackLink(std::string self) : self_(std::move(self)) {}
  ~LoopbackLink() override { Join(); }
  void Peer(const std::string& node, Coordinator* c, LoopbackLink* link) { peers_[node] = {c, link}; }
  void Join() {
    std::vector<std::thread> t;
    {
      std::lock_guard lk(mu_);
      t.swap(threads_);
    }
    for (auto& th : t) th.join();
  }
  PeerBytes bytes(const std::string& node) {
    std::lock_guard lk(mu_);
    return bytes_[node];
  }

  const std::string& self() const override { return self_; }
  std::vector<std::string> UpPeers() const override {
    std::vector<std::string> v;
    for (const auto& [n, p] : peers_) v.push_back(n);
    return v;
  }
  bool Down(const std::string&, std::string*) const override { return false; }
  uint64_t staging_bytes() const override { return 1 << 20; }
  Result<std::vector<RemoteEngine>> Prepare(const std::string& node, const std::string& model) override {
    return peers_.at(node).coord->PeerPrepare(model);
  }
  Status Start(const std::string& node, const RemoteStart& start) override {
    return peers_.at(node).coord->PeerStart(start).WithContext("node " + node);
  }
  Result<uint64_t> Send(const std::string& node, const std::string& leader, uint64_t sync_id,
                        const std::vector<ChunkBuffer>& chunks) override {
    const auto& p = peers_.at(node);
    std::vector<uint32_t> numbers;
    {
      std::lock_guard lk(p.link->mu_);
      for (const auto& ch : chunks) {
        const auto* b = static_cast<const uint8_t*>(ch.data);
        p.link->mailbox_[{self_, sync_id, ch.chunk}].assign(b, b + ch.bytes);
        numbers.push_back(ch.chunk);
      }
    }
    {
      std::lock_guard lk(mu_);
      for (const auto& ch : chunks) bytes_[node].sent += ch.bytes;
    }
    auto r = p.coord->PeerReceive(leader, self_, sync_id, numbers);
    if (!r.ok()) return r.status().WithContext("node " + node + " receiving");
    return r;
  }
  Status Commit(const std::string& node, uint64_t sync_id) override {
    return peers_.at(node).coord->PeerCommit(self_, sync_id).status().WithContext("node " + node + " committing");
  }
  void AbortAsync(std::vector<std::string> nodes, uint64_t sync_id, std::string reason) override {
    std::lock_guard lk(mu_);
    threads_.emplace_back([this, nodes, sync_id, reason] {
      for (const auto& n : nodes) (void)peers_.at(n).coord->PeerAbort(self_, sync_id, reason);
    });
  }
  // GPU to GPU (the daemon's NCCL path) over the in-process fake communicators.
  void EnableDevice(ws::testing::FakePeerCommFabric* fabric) {
    factory_ = std::make_unique<ws::testing::FakePeerCommFactory>(fabric);
    comms_ = std::make_unique<PeerCommCache>(factory_.get(), std::chrono::seconds(60));
    transports_ = ChunkTransports();  // preferred to UCX where it serves, as in GrpcClusterLink
    transports_.Add(factory_->name(), DeviceCaps());
    transports_.Add("ucx", HostStagedCaps());
  }
  PeerCommCache::Stats device_stats() const { return comms_ ? comms_->stats() : PeerCommCache::Stats{}; }
  Result<std::string> ChunkTransport(const Route& route) const override { return transports_.Pick(route); }
  Result<uint64_t> SendDevice(const std::string& node, const std::string& leader, uint64_t sync_id,
                              const std::vector<ChunkBuffer>& chunks, const DeviceTransfer& t) override {
    if (!comms_) return FailedPrecondition("no device transport");
    const auto& p = peers_.at(node);
    WS_ASSIGN_OR_RETURN(auto lease, comms_->ForSend(CommKey{node, t.sender_device, t.receiver_device}));
    DeviceTransfer sent = t;  // what PeerReceiveRequest carries
    sent.unique_id = lease.new_unique_id;
    sent.generation = lease.generation;
    std::vector<uint32_t> numbers;
    for (const auto& ch : chunks) numbers.push_back(ch.chunk);
    uint64_t total = 0;
    const std::vector<PeerComm::P2P> ops = ChunkExchange(/*send=*/true, chunks, &total);
    auto rpc = std::async(std::launch::async, [&] { return p.coord->PeerReceive(leader, self_, sync_id, numbers, &sent); });
    Status st = comms_->Exchange(lease, ops);
    auto r = rpc.get();
    if (st.ok()) {
      std::lock_guard lk(mu_);
      bytes_[node].sent += total;
      bytes_[node].device_sent += total;
    }
    if (!r.ok()) return r.status().WithContext("node " + node + " receiving");
    if (!st.ok()) return st;
    return r;
  }
  Status ReceiveDevice(const std::string& from, uint64_t, const std::vector<ChunkBuffer>& chunks,
                       const DeviceTransfer& t) override {
    if (!comms_) return FailedPrecondition("no device transport");
    WS_ASSIGN_OR_RETURN(auto lease, comms_->ForReceive(CommKey{from, t.receiver_device, t.sender_device}, t.unique_id,
                                                       t.generation));
    uint64_t total = 0;
    WS_RETURN_IF_ERROR(comms_->Exchange(lease, ChunkExchange(/*send=*/false, chunks, &total)));
    std::lock_guard lk(mu_);
    bytes_[from].received += total;
    bytes_[from].device_received += total;
    return Status::Ok();
  }
  Status Receive(const std::string& from, uint64_t sync_id, const std::vector<ChunkBuffer>& chunks) override {
    std::lock_guard lk(mu_);
    for (const auto& ch : chunks) {
      auto it = mailbox_.find({from, sync_id, ch.chunk});
      if (it == mailbox_.end()) return Unavailable("chunk " + std::to_string(ch.chunk) + " never sent by " + from);
      if (it->second.size() != ch.bytes) return InvalidArgument("chunk " + std::to_string(ch.chunk) + ": size");
      std::memcpy(ch.data, it->second.data(), ch.bytes);
      bytes_[from].received += ch.bytes;
      mailbox_.erase(it);
    }
    return Status::Ok();
  }

 private:
  struct Node {
    Coordinator* coord = nullptr;
    LoopbackLink* link = nullptr;
  };
  const std::string self_;
  std::map<std::string, Node> peers_;  // set before any call
  std::mutex mu_;
  std::map<std::tuple<std::string, uint64_t, uint32_t>, std::vector<uint8_t>> mailbox_;
  std::map<std::string, PeerBytes> bytes_;
  std::vector<std::thread> threads_;
  std::unique_ptr<ws::testing::FakePeerCommFactory> factory_;
  std::unique_ptr<PeerCommCache> comms_;
  ChunkTransports transports_ = [] {
    ChunkTransports t;
    t.Add("ucx", HostStagedCaps());
    return t;
  }();
};

// Device staging over host memory that says it is device memory of device
// ordinal 0, named "GPU-<node>" (pairs with PresentAsDevice(0)).
class FakeDeviceStaging final : public DeviceStaging {
 public:
  explicit FakeDeviceStaging(std::string node) : uuid_("GPU-" + std::move(node)) {}
  Result<std::string> DeviceUuid(int ordinal) override {
    if (ordinal != 0) return NotFound("no device " + std::to_string(ordinal));
    return uuid_;
  }
  Result<std::shared_ptr<Mapping>> Allocate(const std::string& uuid, uint64_t bytes) override {
    if (uuid != uuid_) return NotFound("no device " + uuid + " here (" + uuid_ + ")");
    WS_ASSIGN_OR_RETURN(std::shared_ptr<HostBuffer> buf, HostBuffer::Create(bytes));
    std::lock_guard lk(mu_);
    ++allocations_;
    max_bytes_ = std::max(max_bytes_, bytes);
    return std::shared_ptr<Mapping>(std::make_shared<Labeled>(std::move(buf)));
  }
  int allocations() const {
    std::lock_guard lk(mu_);
    return allocations_;
  }

 private:
  class Labeled final : public Mapping {
   public:
    explicit Labeled(std::shared_ptr<HostBuffer> b) : b_(std::move(b)) {}
    void* data() const override { return b_->data(); }
    uint64_t size() const override { return b_->size(); }
    MemoryKind kind() const override { return MemoryKind::kCudaIpc; }
    int device() const override { return 0; }
    MemoryExtent extent() const override { return b_->extent(); }

   private:
    std::shared_ptr<HostBuffer> b_;
  };
  const std::string uuid_;
  mutable std::mutex mu_;
  int allocations_ = 0;
  uint64_t max_bytes_ = 0;
};

// Nodes a (coord_, the leader) and b (coord_b_): W=2 trainer ranks, rank 0
// pushing to a and rank 1 to b; a TP=2 replica on each node (replica 0 on a,
// replica 1 on b).
class CoordinatorTwoNodesTest : public CoordinatorTest {
 protected:
  void SetUp() override {
    cluster_ = &link_a_;
    if (device_) device_staging_ = &staging_a_;
    Init(/*T=*/2, /*W=*/2);
    if (device_) {
      domain_->PresentAsDevice(0);  // trainer and engine memory on both nodes: "GPU 0"
      link_a_.EnableDevice(&fabric_);
      link_b_.EnableDevice(&fabric_);
    }
    auto reg = LayoutRegistry::LoadTexts({{"toy.json", kToyRules}});
    ASSERT_TRUE(reg.ok());
    CoordinatorOptions o;
    o.ack_timeout = std::chrono::seconds(10);
    o.progress_timeout = std::chrono::minutes(5);
    o.clock = &clock_;
    o.housekeeping_interval = std::chrono::milliseconds(20);
    o.cluster = &link_b_;
    if (device_) o.device_staging = &staging_b_;
    coord_b_ = std::make_unique<Coordinator>(*reg, domain_.get(), exec_.get(), o);
    link_a_.Peer("b", coord_b_.get(), &link_b_);
    link_b_.Peer("a", coord_.get(), &link_a_);
    for (uint32_t tp = 0; tp < T_; ++tp) on_a_.push_back(Register(0, tp));
    for (uint32_t tp = 0; tp < T_; ++tp) {
      EngineHandle h;
      std::vector<MemoryRef> mem;
      EngineRankSpec spec = Spec(1, tp, &mem, &h);
      auto id = coord_b_->RegisterEngine(Self(), spec, mem, h.sink.get(), "b:" + std::to_string(tp));
      ASSERT_TRUE(id.ok()) << id.status().ToString();
      h.id = *id;
      sinks_.push_back(h.sink);
      on_b_.push_back(h);
    }
  }
  void TearDown() override {
    link_a_.Join();
    link_b_.Join();
    coord_b_.reset();
    coord_.reset();
  }
  Coordinator& On(uint32_t rank) { return rank == 0 ? *coord_ : *coord_b_; }
  SourceManifest SpreadManifest(uint64_t version) const {
    SourceManifest m = Manifest(version);
    m.rank_nodes = {"a", "b"};
    return m;
  }
  // Commit on a; each engine acks to its own node's coordinator.
  Result<SyncStats> CommitBoth(uint64_t sync_id) {
    auto fut = std::async(std::launch::async, [&] { return coord_->Commit(Self(), sync_id); });
    for (auto* side : {&on_a_, &on_b_})
      for (auto& e : *side) {
        if (!e.sink->WaitFor(Kind::kCommitted, sync_id, std::chrono::seconds(5))) break;
        Coordinator& c = side == &on_a_ ? *coord_ : *coord_b_;
        EXPECT_TRUE(c.AckVersion(Self(), e.id, e.sink->events().back().version, true, "").ok());
      }
    return fut.get();
  }
  // One whole sync of `version`: each rank pushes every layer to its own
  // node, commit on a, every engine acks.
  void SyncOnce(uint64_t version) {
    auto b = coord_->BeginSync(Self(), SpreadManifest(version));
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    for (uint32_t r = 0; r < W_; ++r)
      for (const auto& l : Layers()) {
        auto res = On(r).PushLayer(Self(), b->sync_id, r, l, Layer(r, l));
        ASSERT_TRUE(res.ok()) << "rank " << r << " " << l << ": " << res.status().ToString();
      }
    auto c = CommitBoth(b->sync_id);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
  }

  bool device_ = false;  // GPU to GPU: device memory everywhere, a device transport on both links
  ws::testing::FakePeerCommFabric fabric_;
  FakeDeviceStaging staging_a_{"a"}, staging_b_{"b"};
  LoopbackLink link_a_{"a"}, link_b_{"b"};
  std::unique_ptr<Coordinator> coord_b_;
  std::vector<EngineHandle> on_a_, on_b_;
};

TEST_F(CoordinatorTwoNodesTest, RanksOnBothNodesEachFeedEveryEngineAndOnlyTheOtherNodesBytesTravel) {
  // Rank 1 pushes to b's daemon with the leader's sync id.
  for (uint64_t v = 1; v <= 2; ++v) ASSERT_NO_FATAL_FAILURE(SyncOnce(v));
  const auto last = coord_->GetStatus().last_sync;
  ASSERT_TRUE(last.has_value());
  EXPECT_EQ(last->engines, 4u);
  for (const auto* side : {&on_a_, &on_b_})
    for (const auto& e : *side) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
  // Each node sent the other what its engines need of its own rank's shards; the same at both ends.
  const PeerBytes ab = link_a_.bytes("b"), ba = link_b_.bytes("a");
  EXPECT_GT(ab.sent, 0u);
  EXPECT_GT(ba.sent, 0u);
  EXPECT_EQ(link_b_.bytes("a").received, ab.sent);
  EXPECT_EQ(link_a_.bytes("b").received, ba.sent);
  // Both replicas need the same bytes: together the two directions carry one replica's worth
  // (bf16; each norm shard once for both TP ranks, the embedding's padding rows not at all).
  const uint64_t per_replica = 2 * (V * H + NL * (2 * H * H + H));
  EXPECT_EQ(ab.sent + ba.sent, 2 * per_replica);
  EXPECT_EQ(coord_b_->GetStatus().syncs_committed, 2u);
}

TEST_F(CoordinatorTwoNodesTest, ARankPushingToTheWrongNodeIsRefusedNamingItsNode) {
  auto b = coord_->BeginSync(Self(), SpreadManifest(1));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  auto res = coord_->PushLayer(Self(), b->sync_id, 1, "embed", Layer(1, "embed"));
  ASSERT_FALSE(res.ok());
  EXPECT_ERR(res.status(), "trainer rank 1 pushes to node b's daemon");
  // The leader aborted it everywhere.
  for (auto& e : on_b_) EXPECT_TRUE(e.sink->WaitFor(Kind::kAborted, b->sync_id)) << e.id;
}

TEST_F(CoordinatorTwoNodesTest, AFailureOnTheOtherNodeAbortsEverywhereNamingItAndTheNextSyncSucceeds) {
  auto b = coord_->BeginSync(Self(), SpreadManifest(1));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  // A shard reference past the end of rank 1's buffer: b refuses it and aborts the sync.
  auto bad = Layer(1, "embed");
  bad[0].second.offset += 1 << 20;
  ASSERT_FALSE(coord_b_->PushLayer(Self(), b->sync_id, 1, "embed", bad).ok());
  for (auto& e : on_a_) ASSERT_TRUE(e.sink->WaitFor(Kind::kAborted, b->sync_id)) << e.id;
  auto c = coord_->Commit(Self(), b->sync_id);
  ASSERT_FALSE(c.ok());
  EXPECT_ERR(c.status(), "node b");
  for (const auto& e : on_a_) EXPECT_TRUE(Untouched(e));

  ASSERT_NO_FATAL_FAILURE(SyncOnce(2));
  for (const auto* side : {&on_a_, &on_b_})
    for (const auto& e : *side) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
}

TEST_F(CoordinatorTwoNodesTest, CommitBeforeTheOtherNodesRankFinishedFailsNamingNodeAndShards) {
  auto b = coord_->BeginSync(Self(), SpreadManifest(1));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  for (const auto& l : Layers()) ASSERT_TRUE(coord_->PushLayer(Self(), b->sync_id, 0, l, Layer(0, l)).ok());
  auto c = coord_->Commit(Self(), b->sync_id);
  ASSERT_FALSE(c.ok());
  EXPECT_ERR(c.status(), "node b");
  EXPECT_ERR(c.status(), "(rank 1)");
  for (auto& e : on_a_) EXPECT_TRUE(e.sink->WaitFor(Kind::kAborted, b->sync_id)) << e.id;
}

TEST_F(CoordinatorTwoNodesTest, RankNodesMustNameUpPeersOnePerRank) {
  SourceManifest m = Manifest(1);
  m.rank_nodes = {"a", "z"};
  auto r = coord_->BeginSync(Self(), m);
  ASSERT_FALSE(r.ok());
  EXPECT_ERR(r.status(), "trainer rank 1 pushes to node z");
  m.rank_nodes = {"a"};
  r = coord_->BeginSync(Self(), m);
  ASSERT_FALSE(r.ok());
  EXPECT_ERR(r.status(), "one per rank");
  for (const auto* side : {&on_a_, &on_b_})
    for (const auto& e : *side) EXPECT_EQ(e.sink->kinds(), "") << e.id;
}


// The same two nodes with trainer and engine memory on "GPU 0" of each node
// and a device transport on both links: every chunk goes GPU to GPU.
class CoordinatorTwoNodesDeviceTest : public CoordinatorTwoNodesTest {
 protected:
  void SetUp() override {
    device_ = true;
    CoordinatorTwoNodesTest::SetUp();
  }
};

TEST_F(CoordinatorTwoNodesDeviceTest, ChunksGoGpuToGpuOverOneCommunicatorPerDirectionReusedAcrossSyncs) {
  ASSERT_NO_FATAL_FAILURE(SyncOnce(1));
  ASSERT_NO_FATAL_FAILURE(SyncOnce(2));
  for (const auto* side : {&on_a_, &on_b_})
    for (const auto& e : *side) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
  const PeerBytes ab = link_a_.bytes("b"), ba = link_b_.bytes("a");
  // Every chunk went GPU to GPU, the same bytes the host path carries.
  const uint64_t per_replica = 2 * (V * H + NL * (2 * H * H + H));
  EXPECT_EQ(ab.sent + ba.sent, 2 * per_replica);
  EXPECT_EQ(ab.device_sent, ab.sent);
  EXPECT_EQ(ba.device_sent, ba.sent);
  EXPECT_EQ(link_b_.bytes("a").device_received, ab.sent);
  EXPECT_EQ(link_a_.bytes("b").device_received, ba.sent);
  // a -> b and b -> a: two communicators, made in the first sync and reused by every later window.
  EXPECT_EQ(fabric_.unique_ids(), 2);
  EXPECT_EQ(link_a_.device_stats().created, 2u);  // its sender one and its receiver one
  EXPECT_EQ(link_b_.device_stats().created, 2u);
  EXPECT_GT(link_a_.device_stats().reused, 0u);
  // Rank 0 pushes first: a -> b is the first communicator, a's GPU rank 0.
  EXPECT_EQ(fabric_.Devices("uid-0"), (std::vector<std::string>{"GPU-a", "GPU-b"}));
  // Packed into and received from device staging on both nodes.
  EXPECT_GT(staging_a_.allocations(), 0);
  EXPECT_GT(staging_b_.allocations(), 0);
}

TEST_F(CoordinatorTwoNodesDeviceTest, AFailedExchangeAbortsTheSyncEverywhereAndTheNextSyncRebuildsTheCommunicator) {
  SyncOnce(1);
  ASSERT_EQ(fabric_.unique_ids(), 2);
  auto b = coord_->BeginSync(Self(), SpreadManifest(2));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  fabric_.FailNextExchanges(1);
  auto res = coord_->PushLayer(Self(), b->sync_id, 0, "embed", Layer(0, "embed"));
  ASSERT_FALSE(res.ok());
  EXPECT_ERR(res.status(), "node b");
  for (auto& e : on_b_) EXPECT_TRUE(e.sink->WaitFor(Kind::kAborted, b->sync_id)) << e.id;
  EXPECT_EQ(link_a_.device_stats().live, 1u);  // a -> b dropped; b -> a (a receives) untouched

  SyncOnce(3);
  for (const auto* side : {&on_a_, &on_b_})
    for (const auto& e : *side) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
  EXPECT_EQ(fabric_.unique_ids(), 3);  // a -> b rebuilt with a new unique id
  EXPECT_EQ(link_a_.device_stats().live, 2u);
}

TEST_F(CoordinatorTwoNodesDeviceTest, TheReceiverRefusesChunksSentForAnotherDevice) {
  auto b = coord_->BeginSync(Self(), SpreadManifest(1));
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  // Chunk 0 (tensor embed, rank 0's shard) comes from a; the sender names a GPU b does not use.
  DeviceTransfer t{"fake-nccl", "GPU-a", "GPU-elsewhere", "uid-x", 7};
  auto r = coord_b_->PeerReceive("a", "a", b->sync_id, {0}, &t);
  ASSERT_FALSE(r.ok());
  EXPECT_ERR(r.status(), "was sent GPU to GPU for device GPU-elsewhere");
  EXPECT_ERR(r.status(), "GPU-b");
  for (auto& e : on_b_) EXPECT_TRUE(e.sink->WaitFor(Kind::kAborted, b->sync_id)) << e.id;
}

TEST_F(CoordinatorTwoNodesTest, HostMemoryStaysOnTheHostStagedPathEvenWithADeviceTransport) {
  ws::testing::FakePeerCommFabric fabric;
  link_a_.EnableDevice(&fabric);
  link_b_.EnableDevice(&fabric);
  ASSERT_NO_FATAL_FAILURE(SyncOnce(1));
  for (const auto* side : {&on_a_, &on_b_})
    for (const auto& e : *side) EXPECT_EQ(shm_.Bytes(e.buffer), Expected(e)) << e.buffer;
  EXPECT_GT(link_a_.bytes("b").sent, 0u);
  EXPECT_EQ(link_a_.bytes("b").device_sent, 0u);
  EXPECT_EQ(link_b_.bytes("a").device_sent, 0u);
  EXPECT_EQ(fabric.unique_ids(), 0);
}

}  // namespace
}  // namespace ws::server::testing
