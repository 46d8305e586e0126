#include <limits>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "tests/unit/core/test_util.h"

namespace ws::testing {
namespace {

using nlohmann::json;

bool Has(const Status& s, const std::string& needle) { return s.message().find(needle) != std::string::npos; }
#define EXPECT_ERR(st, needle) \
  EXPECT_TRUE(Has((st), (needle))) << "expected \"" << (needle) << "\" in: " << (st).ToString()

// Rules: a [R, C] matrix "a" split by rows, "b" stored [C, R] and transposed
// (then split by logical rows = physical columns), a 1-D "c" copied whole, a 3-D "d".
const char* kRules = R"J({
  "architectures": ["PlanTest"],
  "vars": {"R": "rows", "C": "cols"},
  "skip": [{"pattern": "*.ignored"}],
  "sources": [
    {"name": "a", "shape": ["R", "C"]},
    {"name": "b", "shape": ["C", "R"]},
    {"name": "c", "shape": ["R"]},
    {"name": "d", "shape": [2, "R", "C"]}
  ],
  "params": [
    {"name": "pa", "parts": [{"src": "a", "rows": {"split": "T", "index": "r"}}]},
    {"name": "pb", "parts": [{"src": "b", "transpose": true, "rows": {"split": "T", "index": "r"}}]},
    {"name": "pc", "parts": [{"src": "c"}]},
    {"name": "pd", "parts": [{"src": "d", "rows": {"split": "T", "index": "r"}}], "shape": ["2 * R / T", "C"]}
  ]
})J";

struct Fixture {
  std::shared_ptr<const LayoutRegistry> reg;
  std::vector<PlanEngine> engines;
  std::map<std::string, Tensor> full;
};

Fixture Make(int64_t R, int64_t C, uint32_t T) {
  Fixture f;
  auto reg = LayoutRegistry::LoadTexts({{"plan.json", kRules}});
  EXPECT_TRUE(reg.ok()) << reg.status().ToString();
  f.reg = *reg;
  std::string cfg = json{{"rows", R}, {"cols", C}}.dump();
  for (uint32_t r = 0; r < T; ++r) {
    ResolveOptions o;
    o.tp_size = T;
    o.tp_rank = r;
    auto l = f.reg->Resolve("PlanTest", cfg, o);
    EXPECT_TRUE(l.ok()) << l.status().ToString();
    PlanEngine pe;
    pe.engine_id = "eng" + std::to_string(r);
    pe.spec.tp_rank = r;
    pe.spec.tp_size = T;
    for (const auto& p : l->params) pe.spec.params.push_back({p.name, p.shape, DType::kF32, ""});
    pe.layout = *l;
    f.engines.push_back(pe);
  }
  f.full = FillDistinct({{"a", {R, C}}, {"b", {C, R}}, {"c", {R}}, {"d", {2, R, C}}});
  return f;
}

TEST(ValidateEngine, Errors) {
  Fixture f = Make(4, 3, 2);
  EngineRankSpec spec = f.engines[1].spec;
  EXPECT_TRUE(ValidateEngine(spec, f.engines[1].layout).ok());

  spec.params.push_back({"extra.one", {2}, DType::kBF16, ""});
  spec.params.push_back({"extra.two", {2}, DType::kBF16, ""});
  Status s = ValidateEngine(spec, f.engines[1].layout);
  EXPECT_ERR(s, "Some weights are not initialized: [extra.one, extra.two]");

  spec = f.engines[1].spec;
  spec.params.erase(spec.params.begin());  // pa
  s = ValidateEngine(spec, f.engines[1].layout);
  EXPECT_ERR(s, "engine rank 1 did not register parameter pa required by the PlanTest layout");

  spec = f.engines[1].spec;
  spec.params[1].shape = {3, 3};
  s = ValidateEngine(spec, f.engines[1].layout);
  EXPECT_ERR(s, "parameter pb: engine registered shape [3, 3] but the PlanTest layout gives [2, 3]");

  spec = f.engines[1].spec;
  spec.params.push_back(spec.params[0]);
  s = ValidateEngine(spec, f.engines[1].layout);
  EXPECT_ERR(s, "parameter pa is registered twice");
}

TEST(BuildPlan, ExecutesAllShardingsIncludingTranspose) {
  for (uint32_t T : {1u, 2u, 4u}) {
    for (uint32_t W : {1u, 2u, 3u, 4u, 5u}) {
      for (ShardMode mode : {ShardMode::kDim0, ShardMode::kDim1, ShardMode::kHsdp}) {
        SCOPED_TRACE("T=" + std::to_string(T) + " W=" + std::to_string(W) + " " + ModeName(mode));
        Fixture f = Make(8, 5, T);
        Trainer tr = MakeTrainer(f.full, W, mode);
        auto plan = BuildPlan(tr.manifest, f.engines);
        ASSERT_TRUE(plan.ok()) << plan.status().ToString();
        auto got = Execute(*plan, tr, f.engines);
        for (uint32_t r = 0; r < T; ++r) {
          const Tensor& d = f.full.at("d");
          Tensor d2 = d;
          d2.shape = {16, 5};
          Tensor want_d = Col(d2, T, r);
          ASSERT_TRUE(SameTensor("pa", got[r].at("pa"), Col(f.full.at("a"), T, r)));
          ASSERT_TRUE(SameTensor("pb", got[r].at("pb"), Col(Transpose(f.full.at("b")), T, r)));
          ASSERT_TRUE(SameTensor("pc", got[r].at("pc"), f.full.at("c")));
          ASSERT_TRUE(SameTensor("pd", got[r].at("pd"), want_d));
        }
        for (const auto& c : plan->copies) {
          EXPECT_GT(c.rows, 0);
          EXPECT_GT(c.cols, 0);
        }
      }
    }
  }
}

TEST(BuildPlan, TransposedCopyOffsets) {
  // b is [C=2, R=4] stored [in, out]; pb on T=1 is its transpose [4, 2]. Two
  // trainer ranks hold b's columns [0, 2) and [2, 4) (dim 1).
  Fixture f = Make(4, 2, 1);
  SourceManifest m;
  m.world_size = 2;
  for (const auto& [name, t] : f.full) {
    SourceTensor st{name, t.shape, DType::kF32, {}};
    if (name == "b") st.shards = {{0, 1, 0, 2}, {1, 1, 2, 2}};
    else st.shards = {{0, 0, 0, t.shape[0]}};
    m.tensors.push_back(st);
  }
  auto plan = BuildPlan(m, f.engines);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  int seen = 0;
  for (const auto& c : plan->copies) {
    if (m.tensors[c.tensor].name != "b") continue;
    ++seen;
    EXPECT_TRUE(c.transpose);
    EXPECT_EQ(c.src_ld, 2);  // each shard is [2, 2]
    EXPECT_EQ(c.src_offset, 0);
    EXPECT_EQ(c.dst_ld, 2);
    EXPECT_EQ(c.rows, 2);
    EXPECT_EQ(c.cols, 2);
    EXPECT_EQ(c.dst_offset, c.shard == 0 ? 0 : 4);  // shard 1 holds b's cols 2..3 = pb rows 2..3
  }
  EXPECT_EQ(seen, 2);
  ASSERT_EQ(plan->shard_base.size(), m.tensors.size() + 1);
}

TEST(BuildPlan, HsdpReplicasRoundRobin) {
  Fixture f = Make(4, 3, 1);
  f.engines.push_back(f.engines[0]);
  f.engines[1].engine_id = "eng-b";
  Trainer tr = MakeTrainer(f.full, 4, ShardMode::kHsdp);  // 2 replicas x 2 shards
  auto plan = BuildPlan(tr.manifest, f.engines);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  for (const auto& c : plan->copies) {
    uint32_t rank = tr.manifest.tensors[c.tensor].shards[c.shard].rank;
    EXPECT_EQ(rank / 2, c.engine) << "engine " << c.engine << " read rank " << rank;
  }
  auto got = Execute(*plan, tr, f.engines);
  EXPECT_TRUE(SameTensor("pa", got[1].at("pa"), f.full.at("a")));
  uint64_t elems = 2 * (4 * 3 + 4 * 3 + 4 + 2 * 4 * 3);
  EXPECT_EQ(plan->bytes_read, elems * 4);
  EXPECT_EQ(plan->bytes_written, elems * 4);
}

TEST(BuildPlan, BytesUseEachSidesDtype) {
  Fixture f = Make(4, 3, 1);
  for (auto& p : f.engines[0].spec.params) p.dtype = DType::kBF16;
  Trainer tr = MakeTrainer(f.full, 1, ShardMode::kDim0);
  auto plan = BuildPlan(tr.manifest, f.engines);
  ASSERT_TRUE(plan.ok());
  uint64_t elems = 4 * 3 + 4 * 3 + 4 + 2 * 4 * 3;
  EXPECT_EQ(plan->bytes_read, elems * 4);
  EXPECT_EQ(plan->bytes_written, elems * 2);
}

SourceTensor* Tensor_(SourceManifest& m, const std::string& n) {
  for (auto& t : m.tensors)
    if (t.name == n) return &t;
  return nullptr;
}

TEST(BuildPlan, ManifestErrorsNameEveryTensor) {
  Fixture f = Make(4, 3, 2);
  Trainer tr = MakeTrainer(f.full, 2, ShardMode::kDim0);
  SourceManifest m = tr.manifest;
  m.tensors.push_back({"model.unknown.weight", {2}, DType::kF32, {{0, 0, 0, 2}}});
  m.tensors.push_back({"rotary.ignored", {2}, DType::kF32, {{0, 0, 0, 2}}});  // skipped: fine
  Tensor_(m, "a")->shape = {5, 3};
  m.tensors.erase(std::remove_if(m.tensors.begin(), m.tensors.end(), [](auto& t) { return t.name == "c"; }),
                  m.tensors.end());
  Tensor_(m, "b")->shards[1].rank = 7;
  Tensor_(m, "d")->dtype = static_cast<DType>(9);
  auto plan = BuildPlan(m, f.engines);
  ASSERT_FALSE(plan.ok());
  const Status& s = plan.status();
  EXPECT_ERR(s, "unknown source tensor model.unknown.weight");
  EXPECT_FALSE(Has(s, "rotary.ignored"));
  EXPECT_ERR(s, "source tensor a has shape [5, 3] but the PlanTest layout expects [4, 3]");
  EXPECT_ERR(s, "missing source tensor c (needed by engine parameter pc)");
  EXPECT_ERR(s, "source tensor b shard 1 (rank 7): rank 7 is not below world_size 2");
  EXPECT_ERR(s, "source tensor d: unsupported dtype");
  // One line per problem.
  EXPECT_EQ(std::count(s.message().begin(), s.message().end(), '\n'), 4);
}

TEST(BuildPlan, ShardCoverageErrors) {
  Fixture f = Make(6, 3, 1);
  Trainer tr = MakeTrainer(f.full, 1, ShardMode::kDim0);
  auto with = [&](const std::string& name, std::vector<ShardSpec> shards, uint32_t world = 8) {
    SourceManifest m = tr.manifest;
    m.world_size = world;
    Tensor_(m, name)->shards = std::move(shards);
    return BuildPlan(m, f.engines).status();
  };
  // Overlap of distinct ranges.
  EXPECT_ERR(with("a", {{0, 0, 0, 4}, {1, 0, 3, 3}}), "source tensor a: shard ranges overlap along dim 0: [0, 4) and [3, 6)");
  // Gap in the middle and at the end.
  EXPECT_ERR(with("a", {{0, 0, 0, 2}, {1, 0, 3, 2}}), "source tensor a: no shard covers [2, 3) along dim 0");
  EXPECT_ERR(with("a", {{0, 0, 0, 2}, {1, 0, 3, 2}}), "source tensor a: no shard covers [5, 6) along dim 0");
  // Replicas (identical ranges) and zero-length shards are fine.
  EXPECT_TRUE(with("a", {{0, 0, 0, 6}, {1, 0, 0, 6}, {2, 0, 6, 0}, {3, 0, 2, 0}}).ok());
  // Mixed dims.
  EXPECT_ERR(with("a", {{0, 0, 0, 6}, {1, 1, 0, 3}}), "source tensor a: shards split it along both dim 0 and dim 1");
  // dim 2, dim 1 of a 1-D tensor, dim 1 of a 3-D tensor.
  EXPECT_ERR(with("a", {{0, 2, 0, 6}}), "source tensor a shard 0 (rank 0): shard dim 2 is not supported");
  EXPECT_ERR(with("c", {{0, 1, 0, 1}}), "source tensor c shard 0 (rank 0): dim 1 sharding needs a 2-D tensor");
  EXPECT_ERR(with("d", {{0, 1, 0, 6}}), "source tensor d shard 0 (rank 0): dim 1 sharding needs a 2-D tensor");
  // Out of bounds.
  EXPECT_ERR(with("a", {{0, 0, 0, 7}}), "source tensor a shard 0 (rank 0): range [0, 7) along dim 0 is outside [0, 6)");
  EXPECT_ERR(with("a", {{0, 0, -1, 7}}), "is outside [0, 6)");
  // start + length overflowing int64 must not pass the range check.
  EXPECT_ERR(with("a", {{0, 0, 0, 6}, {1, 0, 6, std::numeric_limits<int64_t>::max()}}), "is outside [0, 6)");
  EXPECT_ERR(with("b", {{0, 1, 0, 7}}), "source tensor b shard 0 (rank 0): range [0, 7) along dim 1 is outside [0, 6)");
  // No data at all.
  EXPECT_ERR(with("a", {{0, 0, 0, 0}}), "source tensor a: no shard holds any of its data");
  EXPECT_ERR(with("a", {}), "source tensor a: no shard holds any of its data");
  // Duplicate tensor names.
  SourceManifest m = tr.manifest;
  m.tensors.push_back(m.tensors[0]);
  EXPECT_ERR(BuildPlan(m, f.engines).status(), "appears twice in the manifest");
}

TEST(BuildPlan, EngineErrorsAreReported) {
  Fixture f = Make(4, 3, 2);
  f.engines[1].spec.params.pop_back();
  Trainer tr = MakeTrainer(f.full, 1, ShardMode::kDim0);
  auto plan = BuildPlan(tr.manifest, f.engines);
  EXPECT_ERR(plan.status(), "engine eng1: engine rank 1 did not register parameter pd");
}

TEST(BuildPlan, ExplicitSourcesAreNotUnknown) {
  // A param from an explicit mapping reads a source no rule declares.
  Fixture f = Make(4, 3, 1);
  ExpectedParam p{"custom", {3}, {Fill{"extra.t", false, 0, 0, 0, 0, 3, 1}}};
  f.engines[0].layout.params.push_back(p);
  f.engines[0].spec.params.push_back({"custom", {3}, DType::kF32, ""});
  f.full["extra.t"] = Tensor{{3}, {7, 8, 9}};
  Trainer tr = MakeTrainer(f.full, 2, ShardMode::kDim0);
  auto plan = BuildPlan(tr.manifest, f.engines);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  auto got = Execute(*plan, tr, f.engines);
  EXPECT_TRUE(SameTensor("custom", got[0].at("custom"), f.full.at("extra.t")));
  // Shorter than the fill reads: refused, naming the tensor.
  Tensor_(tr.manifest, "extra.t")->shape = {2};
  Tensor_(tr.manifest, "extra.t")->shards = {{0, 0, 0, 2}};
  plan = BuildPlan(tr.manifest, f.engines);
  EXPECT_ERR(plan.status(), "of source tensor extra.t, which is only [2]");
}

// Wire dtypes of a manifest, by tensor name.
std::map<std::string, TensorDtypes> Negotiated(const SourceManifest& m, const std::vector<PlanEngine>& engines) {
  std::vector<TensorDtypes> v = NegotiateDTypes(m, engines);
  EXPECT_EQ(v.size(), m.tensors.size());
  std::map<std::string, TensorDtypes> out;
  for (size_t t = 0; t < v.size() && t < m.tensors.size(); ++t) out[m.tensors[t].name] = v[t];
  return out;
}

void SetDtypes(Fixture& f, DType d) {
  for (auto& e : f.engines)
    for (auto& p : e.spec.params) p.dtype = d;
}

TEST(NegotiateDTypes, ChooseWireDType) {
  using D = DType;
  EXPECT_EQ(ChooseWireDType(D::kF32, {D::kF16}), D::kF16);
  EXPECT_EQ(ChooseWireDType(D::kF32, {D::kBF16}), D::kBF16);
  EXPECT_EQ(ChooseWireDType(D::kF32, {D::kF32}), D::kF32);
  EXPECT_EQ(ChooseWireDType(D::kBF16, {D::kBF16}), D::kBF16);
  EXPECT_EQ(ChooseWireDType(D::kBF16, {D::kF32}), D::kBF16);  // never widened
  EXPECT_EQ(ChooseWireDType(D::kBF16, {D::kF16}), D::kBF16);  // same width: not narrower
  EXPECT_EQ(ChooseWireDType(D::kF16, {D::kBF16}), D::kF16);
  EXPECT_EQ(ChooseWireDType(D::kF32, {D::kBF16, D::kF16}), D::kF32);
  EXPECT_EQ(ChooseWireDType(D::kF32, {}), D::kF32);
}

TEST(NegotiateDTypes, SingleNarrowerDestinationIsTheWireDtype) {
  Fixture f = Make(4, 3, 2);
  Trainer tr = MakeTrainer(f.full, 2, ShardMode::kDim0);
  SetDtypes(f, DType::kF16);  // an fp16 engine, f32 sources
  for (const auto& [name, d] : Negotiated(tr.manifest, f.engines)) {
    EXPECT_EQ(d.wire, DType::kF16) << name;
    EXPECT_EQ(d.destinations, std::vector<DType>{DType::kF16}) << name;
  }
  SetDtypes(f, DType::kBF16);  // a bf16 engine, bf16 sources
  SourceManifest m = tr.manifest;
  for (auto& t : m.tensors) t.dtype = DType::kBF16;
  for (const auto& [name, d] : Negotiated(m, f.engines)) {
    EXPECT_EQ(d.wire, DType::kBF16) << name;
    EXPECT_EQ(d.destinations, std::vector<DType>{DType::kBF16}) << name;
  }
  // One param kept in fp32 on every rank (pc reads c), the rest bf16: c stays f32.
  for (auto& e : f.engines)
    for (auto& p : e.spec.params)
      if (p.name == "pc") p.dtype = DType::kF32;
  auto got = Negotiated(tr.manifest, f.engines);
  EXPECT_EQ(got.at("c").wire, DType::kF32);
  EXPECT_EQ(got.at("c").destinations, std::vector<DType>{DType::kF32});
  EXPECT_EQ(got.at("a").wire, DType::kBF16);
  EXPECT_EQ(got.at("b").wire, DType::kBF16);  // transposed fills route like the planner's
  EXPECT_EQ(got.at("d").wire, DType::kBF16);
}

TEST(NegotiateDTypes, EnginesOfDifferentDtypesKeepTheSource) {
  Fixture f = Make(4, 3, 1);
  SetDtypes(f, DType::kBF16);
  PlanEngine fp16 = f.engines[0];  // a second replica, in fp16
  fp16.engine_id = "replica1";
  fp16.spec.replica_id = 1;
  for (auto& p : fp16.spec.params) p.dtype = DType::kF16;
  f.engines.push_back(fp16);
  Trainer tr = MakeTrainer(f.full, 1, ShardMode::kDim0);
  for (const auto& [name, d] : Negotiated(tr.manifest, f.engines)) {
    EXPECT_EQ(d.wire, DType::kF32) << name;
    EXPECT_EQ(d.destinations, (std::vector<DType>{DType::kBF16, DType::kF16})) << name;
  }
}

TEST(NegotiateDTypes, SkippedTensorKeepsItsDtypeWithNoDestinations) {
  Fixture f = Make(4, 3, 1);
  SetDtypes(f, DType::kBF16);
  Trainer tr = MakeTrainer(f.full, 1, ShardMode::kDim0);
  tr.manifest.tensors.push_back({"rotary.ignored", {2}, DType::kF32, {{0, 0, 0, 2}}});
  std::vector<TensorDtypes> v = NegotiateDTypes(tr.manifest, f.engines);
  ASSERT_EQ(v.size(), tr.manifest.tensors.size());
  EXPECT_EQ(v.back().wire, DType::kF32);  // request order: the skipped tensor is last
  EXPECT_TRUE(v.back().destinations.empty());
  EXPECT_EQ(v.front().wire, DType::kBF16);
  // Planned with the wire dtypes, the plan reads bf16 shards.
  for (size_t t = 0; t < v.size(); ++t) tr.manifest.tensors[t].dtype = v[t].wire;
  auto plan = BuildPlan(tr.manifest, f.engines);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  uint64_t elems = 4 * 3 + 4 * 3 + 4 + 2 * 4 * 3;
  EXPECT_EQ(plan->bytes_read, elems * 2);
}

}  // namespace
}  // namespace ws::testing

namespace ws {
namespace {

TEST(ShapeInRange, RejectsNegativeAndOverflowingShapes) {
  EXPECT_TRUE(ShapeInRange({}));
  EXPECT_TRUE(ShapeInRange({0, int64_t{1} << 25, int64_t{1} << 25}));
  // Zeros count as 1: As2D of [2^40, 2^40, 0] would multiply 2^40 * 2^40 first.
  EXPECT_FALSE(ShapeInRange({0, int64_t{1} << 62}));
  EXPECT_FALSE(ShapeInRange({int64_t{1} << 40, int64_t{1} << 40, 0}));
  EXPECT_TRUE(ShapeInRange({int64_t{1} << 25, int64_t{1} << 25}));
  EXPECT_FALSE(ShapeInRange({-1, 4}));
  EXPECT_FALSE(ShapeInRange({4, (int64_t{1} << 62) + 1}));  // would wrap to a small byte count
  EXPECT_FALSE(ShapeInRange({int64_t{1} << 30, int64_t{1} << 30, int64_t{1} << 30}));
}

}  // namespace
}  // namespace ws
