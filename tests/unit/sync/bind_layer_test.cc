// SyncSession::BindLayer on a real layout (the Mixtral rules of
// config/layouts, TP=2, fused w13/w2 experts): the plan-time chains
// (shard_chains.h) and the per-copy walk must write exactly the bytes of
// the uncoalesced plan (each planned copy run on its own) for every layout
// of the trainer's memory, and the chains must be taken where they apply.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "daemon/core/layout.h"
#include "daemon/dataplane/executor.h"
#include "tests/unit/testing/buffer_mapping.h"
#include "daemon/sync/sync_session.h"

namespace ws::server {
namespace {

using ws::testing::BufferMapping;

// How a rank lays out its shards in its one memory object.
enum class Order { kManifest, kReversed, kGapAfterEach3, kShuffled };

struct Fixture {
  SourceManifest manifest;
  std::vector<std::shared_ptr<Engine>> engines;
  std::shared_ptr<const ReadyPlan> plan;
  std::shared_ptr<const IndexedManifest> indexed;

  // lexicographic: the manifest lists tensors sorted by name, as a
  // safetensors header does (experts 0, 1, 10, 11, 2, ...); the trainer's
  // memory still follows the rules' (module) order.
  std::vector<uint32_t> module_order;  // manifest indices in the rules' source order
  Fixture(uint32_t world, bool lexicographic) {
    auto reg = LayoutRegistry::LoadDir(WS_LAYOUTS_DIR);
    EXPECT_TRUE(reg.ok()) << reg.status().ToString();
    const std::string config = *(*reg)->ExampleConfig("MixtralForCausalLM");
    for (uint32_t t = 0; t < 2; ++t) {
      ResolveOptions o;
      o.tp_size = 2;
      o.tp_rank = t;
      auto layout = (*reg)->Resolve("MixtralForCausalLM", config, o);
      EXPECT_TRUE(layout.ok()) << layout.status().ToString();
      auto e = std::make_shared<Engine>();
      e->id = "e" + std::to_string(t);
      e->layout = *layout;
      e->spec.model = "m";
      e->spec.tp_rank = t;
      e->spec.tp_size = 2;
      for (const ExpectedParam& p : layout->params) {
        e->spec.params.push_back(EngineParamSpec{p.name, p.shape, DType::kBF16, "", "", false});
        int64_t n = 1;
        for (int64_t d : p.shape) n *= d;
        e->maps.push_back(std::make_shared<BufferMapping>(static_cast<size_t>(n) * 2));
      }
      engines.push_back(e);
      if (t == 0) {
        manifest.model = "m";
        manifest.world_size = world;
        for (const ExpectedSource& s : layout->sources) {
          SourceTensor st;
          st.name = s.name;
          st.shape = s.shape;
          st.dtype = DType::kF32;
          const int64_t rows = s.shape[0], per = (rows + world - 1) / world;  // torch.chunk
          for (uint32_t r = 0; r < world; ++r) {
            const int64_t start = std::min<int64_t>(rows, r * per);
            st.shards.push_back(ShardSpec{r, 0, start, std::min<int64_t>(rows, start + per) - start});
          }
          manifest.tensors.push_back(st);
        }
        module_order.resize(manifest.tensors.size());
        std::iota(module_order.begin(), module_order.end(), 0u);
        if (lexicographic) {
          std::vector<uint32_t> by_name = module_order;
          std::sort(by_name.begin(), by_name.end(), [&](uint32_t a, uint32_t b) {
            return manifest.tensors[a].name < manifest.tensors[b].name;
          });
          std::vector<SourceTensor> sorted;
          for (uint32_t i : by_name) sorted.push_back(manifest.tensors[i]);
          manifest.tensors = sorted;
          for (uint32_t i = 0; i < by_name.size(); ++i) module_order[by_name[i]] = i;
        }
      }
    }
    auto ready = MakeReadyPlan(manifest, engines);
    EXPECT_TRUE(ready.ok()) << ready.status().ToString();
    plan = *ready;
    indexed = IndexManifest(manifest, "");
  }
};

struct Pushed {
  MemoryRef ref;
  LayerShards layer;
  std::shared_ptr<Mapping> whole;
};

// Rank r's shards in one buffer, in `order`, filled with values from `rng`.
Pushed Push(const Fixture& f, uint32_t rank, Order order, std::mt19937& rng) {
  std::vector<std::pair<uint32_t, uint64_t>> shards;  // (tensor, bytes)
  for (uint32_t t : f.module_order)
    for (const ShardSpec& s : f.manifest.tensors[t].shards)
      if (s.rank == rank && s.length > 0) shards.emplace_back(t, ShardElements(f.manifest.tensors[t], s) * 4);
  if (order == Order::kReversed) std::reverse(shards.begin(), shards.end());
  if (order == Order::kShuffled) std::shuffle(shards.begin(), shards.end(), rng);
  Pushed p;
  uint64_t at = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    p.layer.index.push_back(shards[i].first);
    p.layer.offset.push_back(at);
    at += shards[i].second + (order == Order::kGapAfterEach3 && i % 3 == 2 ? 64 : 0);
  }
  p.whole = std::make_shared<BufferMapping>(at);
  auto* u = static_cast<uint32_t*>(p.whole->data());
  for (uint64_t i = 0; i < at / 4; ++i) u[i] = static_cast<uint32_t>(rng()) & 0xbfffffffu;  // finite
  p.ref.name = "/ws-test";
  p.ref.length = at;
  p.layer.object = p.ref;
  return p;
}

// Engine bytes after binding every rank's message with `path`, or after
// running each planned copy alone (`reference`).
struct Counts {
  size_t ops = 0, planned = 0, chained = 0, walked = 0;
};

std::vector<std::vector<unsigned char>> Sync(const Fixture& f, Order order, BindPath path, bool reference,
                                             Counts* n) {
  for (const auto& e : f.engines)
    for (const auto& m : e->maps) std::memset(m->data(), 0, m->size());
  SyncSession s(1, "me", 1, f.indexed, f.engines);
  s.StartStreaming(f.plan);
  auto ex = MakeHostExecutor(ExecutorOptions{});
  std::mt19937 rng(42);
  *n = Counts{};
  for (uint32_t r = 0; r < f.manifest.world_size; ++r) {
    Pushed p = Push(f, r, order, rng);
    auto claimed = s.ClaimShards(r, p.layer, "test");
    EXPECT_TRUE(claimed.ok()) << claimed.status().ToString();
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    for (const ClaimedShard& c : *claimed) ranges.emplace_back(c.offset, c.length);
    const std::vector<std::shared_ptr<Mapping>> src = SliceMappings(p.whole, ranges);
    if (reference) {
      for (size_t i = 0; i < claimed->size(); ++i) {
        auto [b, e] = f.plan->plan.CopiesOf((*claimed)[i].tensor, (*claimed)[i].shard);
        for (uint32_t ci = b; ci < e; ++ci) {
          const PlannedCopy& c = f.plan->plan.copies[ci];
          kernels::CopyOp op;
          op.src = src[i]->data();
          op.dst = f.engines[c.engine]->maps[c.param]->data();
          op.src_offset = c.src_offset;
          op.src_ld = c.src_ld;
          op.dst_offset = c.dst_offset;
          op.dst_ld = c.dst_ld;
          op.rows = c.rows;
          op.cols = c.cols;
          op.transpose = c.transpose;
          op.src_dtype = kernels::kF32;
          op.dst_dtype = kernels::kBF16;
          RunOpReference(op);
          ++n->planned;
        }
      }
      continue;
    }
    auto bound = s.BindLayer(*claimed, src, "test", path);
    EXPECT_TRUE(bound.ok()) << bound.status().ToString();
    n->ops += bound->ops.size();
    n->chained += bound->groups_chained;
    n->walked += bound->groups_walked;
    auto ran = ex->RunNamed(bound->ops, bound->name);
    EXPECT_TRUE(ran.ok()) << ran.status().ToString();
  }
  std::vector<std::vector<unsigned char>> out;
  for (const auto& e : f.engines)
    for (const auto& m : e->maps) {
      const auto* b = static_cast<const unsigned char*>(m->data());
      out.emplace_back(b, b + m->size());
    }
  return out;
}

TEST(BindLayerTest, ChainsAndWalkWriteTheUncoalescedPlansBytes) {
  for (bool lexicographic : {false, true})
    for (uint32_t world : {1u, 2u, 3u}) {
      Fixture f(world, lexicographic);
      ASSERT_NE(f.plan, nullptr);
      for (Order order : {Order::kManifest, Order::kReversed, Order::kGapAfterEach3, Order::kShuffled}) {
        const std::string ctx = "W=" + std::to_string(world) + " order " + std::to_string(static_cast<int>(order)) +
                                (lexicographic ? " lexicographic manifest" : "");
        Counts ref, chains, walk;
        const auto want = Sync(f, order, BindPath::kAuto, true, &ref);
        const auto got_auto = Sync(f, order, BindPath::kAuto, false, &chains);
        const auto got_walk = Sync(f, order, BindPath::kWalk, false, &walk);
        ASSERT_EQ(got_auto, want) << ctx;
        ASSERT_EQ(got_walk, want) << ctx;
        bool written = false;
        for (const auto& b : want) written = written || std::any_of(b.begin(), b.end(), [](unsigned char c) { return c; });
        ASSERT_TRUE(written) << ctx;
        EXPECT_EQ(walk.chained, 0u) << ctx;
        if (order == Order::kManifest) {
          // Module order: a layer's experts lie at a constant stride, every
          // group takes the chains, and they merge exactly as the walk does.
          EXPECT_GT(chains.chained, 0u) << ctx;
          EXPECT_EQ(chains.walked, 0u) << ctx;
          EXPECT_EQ(chains.ops, walk.ops) << ctx;
          EXPECT_LT(chains.ops, ref.planned) << ctx;
        } else if (order == Order::kReversed || order == Order::kShuffled) {
          EXPECT_EQ(chains.chained, 0u) << ctx;  // not consecutive members in memory order
        }
      }
    }
}

TEST(BindLayerTest, ChainsRunOnlyWithinThePlansRuns) {
  Fixture f(2, true);
  const ShardChains& c = f.plan->chains;
  const SyncPlan& plan = f.plan->plan;
  ASSERT_EQ(c.members.size(), plan.shard_base.back());
  for (uint32_t g = 0; g + 1 < c.member_begin.size(); ++g) {
    const uint32_t n = c.Members(g);
    for (uint32_t q = 0; q < n; ++q) ASSERT_EQ(c.pos[c.members[c.member_begin[g] + q]], q);
    const uint32_t k_count = c.k_begin[g + 1] - c.k_begin[g];
    for (uint32_t k = 0; k < k_count; ++k) {
      uint32_t covered = 0;
      c.ForEachRun(g, k, 0, n, [&](uint32_t x, uint32_t y) {
        ASSERT_EQ(x, covered);
        ASSERT_LT(x, y);
        covered = y;
        // Within a run the k-th copies' destinations advance by one stride.
        for (uint32_t p = x + 2; p < y; ++p) {
          auto dst = [&](uint32_t q) { return plan.copies[plan.shard_begin[c.members[c.member_begin[g] + q]] + k].dst_offset; };
          ASSERT_EQ(dst(p) - dst(p - 1), dst(x + 1) - dst(x));
        }
      });
      ASSERT_EQ(covered, n);
      // Clipped to a middle range.
      if (n >= 3) {
        uint32_t seen = 0;
        c.ForEachRun(g, k, 1, n - 1, [&](uint32_t x, uint32_t y) { seen += y - x; ASSERT_GE(x, 1u); ASSERT_LE(y, n - 1); });
        ASSERT_EQ(seen, n - 2);
      }
    }
  }
}

}  // namespace
}  // namespace ws::server
