#include "client/cpp/fsdp.h"

#include <numeric>

#include <gtest/gtest.h>

#include "client/cpp/shm.h"

namespace ws::fsdp {
namespace {

std::vector<Range> All(int64_t n, uint32_t w) {
  std::vector<Range> out;
  for (uint32_t i = 0; i < w; ++i) out.push_back(ChunkRange(n, w, i));
  return out;
}

TEST(ChunkRange, TorchChunkSemantics) {
  // torch.arange(10).chunk(4) -> sizes 3,3,3,1
  EXPECT_EQ(All(10, 4), (std::vector<Range>{{0, 3}, {3, 3}, {6, 3}, {9, 1}}));
  // even split
  EXPECT_EQ(All(8, 4), (std::vector<Range>{{0, 2}, {2, 2}, {4, 2}, {6, 2}}));
  // torch.arange(6).chunk(4) -> 3 chunks of 2: the last rank is empty
  EXPECT_EQ(All(6, 4), (std::vector<Range>{{0, 2}, {2, 2}, {4, 2}, {6, 0}}));
  // torch.arange(5).chunk(4) -> 2,2,1 and an empty rank
  EXPECT_EQ(All(5, 4), (std::vector<Range>{{0, 2}, {2, 2}, {4, 1}, {5, 0}}));
  // W > n: one row each, then empty ranks
  EXPECT_EQ(All(3, 8), (std::vector<Range>{{0, 1}, {1, 1}, {2, 1}, {3, 0}, {3, 0}, {3, 0}, {3, 0}, {3, 0}}));
  EXPECT_EQ(All(1, 1), (std::vector<Range>{{0, 1}}));
  EXPECT_EQ(All(0, 2), (std::vector<Range>{{0, 0}, {0, 0}}));
}

TEST(ChunkRange, CoversExactlyForManySizes) {
  for (int64_t n = 0; n < 70; ++n)
    for (uint32_t w = 1; w < 20; ++w) {
      int64_t next = 0;
      const int64_t chunk = (n + w - 1) / w;
      for (uint32_t i = 0; i < w; ++i) {
        Range r = ChunkRange(n, w, i);
        if (r.length > 0) {
          EXPECT_EQ(r.start, next) << n << "/" << w << "/" << i;
          EXPECT_LE(r.length, chunk);
          next = r.start + r.length;
        }
      }
      EXPECT_EQ(next, n) << n << "/" << w;
    }
}

TEST(SplitTensor, OnlyNonEmptyShards) {
  auto s = SplitTensor({5, 3}, 4, 0);
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[2].rank, 2u);
  EXPECT_EQ(s[2].start, 4);
  EXPECT_EQ(s[2].length, 1);
  EXPECT_EQ(s[2].dim, 0u);
  // dim 1 applies to 2-D tensors only
  s = SplitTensor({2, 7}, 2, 1);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].dim, 1u);
  EXPECT_EQ(s[1].start, 4);
  EXPECT_EQ(s[1].length, 3);
  s = SplitTensor({7}, 2, 1);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].dim, 0u);
  s = SplitTensor({2, 3, 4}, 2, 1);
  EXPECT_EQ(s[0].dim, 0u);
}

TEST(PackShard, Dim0AndDim1) {
  std::vector<float> t(4 * 5);
  std::iota(t.begin(), t.end(), 0.f);
  const auto* src = reinterpret_cast<const uint8_t*>(t.data());
  ShardSpec s0{1, 0, 2, 2};
  EXPECT_EQ(ShardBytes({4, 5}, 4, s0), 40u);
  std::vector<float> out(10, -1.f);
  PackShard(src, {4, 5}, 4, s0, reinterpret_cast<uint8_t*>(out.data()));
  for (int i = 0; i < 10; ++i) EXPECT_EQ(out[i], 10.f + i);

  ShardSpec s1{1, 1, 3, 2};
  EXPECT_EQ(ShardBytes({4, 5}, 4, s1), 32u);
  std::vector<float> out1(8, -1.f);
  PackShard(src, {4, 5}, 4, s1, reinterpret_cast<uint8_t*>(out1.data()));
  EXPECT_EQ(out1, (std::vector<float>{3, 4, 8, 9, 13, 14, 18, 19}));
}

TEST(LayerKey, Grouping) {
  EXPECT_EQ(LayerKey("model.layers.3.self_attn.q_proj.weight"), "model.layers.3");
  EXPECT_EQ(LayerKey("model.layers.12.mlp.experts.7.w1.weight"), "model.layers.12");
  EXPECT_EQ(LayerKey("transformer.h.0.attn.c_attn.weight"), "transformer.h.0");
  EXPECT_EQ(LayerKey("model.embed_tokens.weight"), "model.embed_tokens");
  EXPECT_EQ(LayerKey("lm_head.weight"), "lm_head");
  EXPECT_EQ(LayerKey("model.norm.weight"), "model.norm");
  EXPECT_EQ(LayerKey("scale"), "scale");
  EXPECT_EQ(LayerKey("model.v2x.weight"), "model.v2x");  // digits inside a component do not count

  auto g = GroupByLayer({"model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.0.b.weight",
                         "model.layers.1.a.weight", "model.norm.weight", "model.layers.0.c.bias", "lm_head.weight"});
  ASSERT_EQ(g.size(), 5u);
  EXPECT_EQ(g[0].key, "model.embed_tokens");
  EXPECT_EQ(g[1].key, "model.layers.0");
  EXPECT_EQ(g[1].members, (std::vector<size_t>{1, 2, 5}));
  EXPECT_EQ(g[2].key, "model.layers.1");
  EXPECT_EQ(g[3].key, "model.norm");
  EXPECT_EQ(g[4].key, "lm_head");
}

TEST(Shm, CreateUniqueAndUnlink) {
  const std::string name = ShmObject::UniqueName("test");
  EXPECT_EQ(name.rfind("/ws-", 0), 0u);
  EXPECT_NE(ShmObject::UniqueName("test"), name);
  {
    auto a = ShmObject::Create(name, 4096);
    ASSERT_TRUE(a.ok()) << a.status().ToString();
    a->data()[4095] = 7;
    auto b = ShmObject::Create(name, 16);
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), Code::kAlreadyExists);
    ShmObject moved = std::move(*a);
    EXPECT_EQ(moved.size(), 4096u);
    EXPECT_EQ(moved.data()[4095], 7);
  }
  auto again = ShmObject::Create(name, 0);  // unlinked by the destructor
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->size(), 0u);
  EXPECT_FALSE(ShmObject::Create("no-slash", 8).ok());
}

}  // namespace
}  // namespace ws::fsdp
