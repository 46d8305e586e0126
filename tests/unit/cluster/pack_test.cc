#include "daemon/cluster/pack.h"

#include <gtest/gtest.h>

namespace ws::cluster {
namespace {

// A copy of rows x cols of shard (tensor, shard) into engine e's param p.
PlannedCopy Copy(uint32_t tensor, uint32_t shard, uint32_t engine, uint32_t param, int64_t src_offset, int64_t rows,
                 int64_t cols, int64_t src_ld, int64_t dst_offset = 0, bool transpose = false) {
  PlannedCopy c;
  c.tensor = tensor;
  c.shard = shard;
  c.engine = engine;
  c.param = param;
  c.src_offset = src_offset;
  c.src_ld = src_ld;
  c.dst_offset = dst_offset;
  c.dst_ld = cols;
  c.rows = rows;
  c.cols = cols;
  c.transpose = transpose;
  return c;
}

TEST(PackPlan, ReplicatedRectanglesCrossOncePerNodeAndLocalCopiesStay) {
  // Engines: 0 on a (the source node), 1 and 2 on b (TP ranks), 3 on c.
  SyncPlan plan;
  // A norm (tensor 0): all four engines read the same 16 elements.
  for (uint32_t e = 0; e < 4; ++e) plan.copies.push_back(Copy(0, 0, e, 0, 0, 16, 1, 1));
  // A TP-split weight (tensor 1, 8x8): b's ranks read rows 0-3 and 4-7, c reads all.
  plan.copies.push_back(Copy(1, 0, 1, 1, 0, 4, 8, 8));
  plan.copies.push_back(Copy(1, 0, 2, 1, 32, 4, 8, 8));
  plan.copies.push_back(Copy(1, 0, 3, 1, 0, 8, 8, 8));
  const std::vector<std::string> nodes = {"a", "b", "b", "c"};
  const std::vector<std::vector<DType>> dtypes(4, {DType::kBF16, DType::kBF16});
  PackPlan p = BuildPackPlan(plan, nodes, dtypes, "a", 1 << 20);

  ASSERT_EQ(p.nodes.size(), 2u);  // nothing packed for a itself
  const NodePack& b = p.nodes.at("b");
  // The norm once (16 bf16) with two scatter targets, the weight's two halves once each.
  EXPECT_EQ(b.payload_bytes, (16 + 64) * 2u);
  EXPECT_EQ(b.bytes, b.payload_bytes);
  EXPECT_EQ(b.scatter_bytes, (16 * 2 + 64) * 2u);
  ASSERT_EQ(b.chunks.size(), 2u);
  ASSERT_EQ(b.chunks[0].segments.size(), 1u);
  EXPECT_EQ(b.chunks[0].segments[0].copies, (std::vector<uint32_t>{1, 2}));
  ASSERT_EQ(b.chunks[1].segments.size(), 2u);
  EXPECT_EQ(b.chunks[1].segments[1].offset, 32u * 2);
  EXPECT_EQ(b.by_shard.at({1, 0}), std::vector<uint32_t>{1});
  const NodePack& c = p.nodes.at("c");
  EXPECT_EQ(c.payload_bytes, (16 + 64) * 2u);
  EXPECT_EQ(c.scatter_bytes, c.payload_bytes);
}

TEST(PackPlan, DifferentDtypesAreDifferentSegmentsAlignedToTheirSize) {
  SyncPlan plan;
  plan.copies.push_back(Copy(0, 0, 0, 0, 0, 3, 1, 1));  // bf16: 6 bytes
  plan.copies.push_back(Copy(0, 0, 1, 0, 0, 3, 1, 1));  // the same elements in f32: another segment
  PackPlan p = BuildPackPlan(plan, {"b", "b"}, {{DType::kBF16}, {DType::kF32}}, "a", 1 << 20);
  const NodePack& b = p.nodes.at("b");
  ASSERT_EQ(b.chunks.size(), 1u);
  ASSERT_EQ(b.chunks[0].segments.size(), 2u);
  EXPECT_EQ(b.chunks[0].segments[1].offset, 8u);  // 6 rounded up to the f32 size
  EXPECT_EQ(b.payload_bytes, 6u + 12u);
  EXPECT_EQ(b.bytes, 8u + 12u);  // the padding travels
}

TEST(PackPlan, LargeRectanglesSplitByRowsIntoBoundedChunks) {
  SyncPlan plan;
  plan.copies.push_back(Copy(0, 0, 0, 0, 5, 10, 4, 6));  // 10 rows of 4 f32 (16 bytes), src_ld 6
  plan.copies.push_back(Copy(0, 0, 0, 1, 7, 10, 4, 6, 0, /*transpose=*/true));
  PackPlan p = BuildPackPlan(plan, {"b"}, {{DType::kF32, DType::kF32}}, "a", 48);
  const NodePack& b = p.nodes.at("b");
  uint64_t rows = 0;
  for (const auto& ch : b.chunks) {
    EXPECT_LE(ch.bytes, 48u);
    for (const auto& s : ch.segments) rows += s.rows;
  }
  EXPECT_EQ(rows, 20u);
  EXPECT_EQ(b.payload_bytes, 2 * 10 * 16u);
  // Row 3 of the plain copy starts 3 source rows in; of the transposed one, 3 elements in.
  const PackSegment& second = b.chunks[1].segments[0];
  EXPECT_EQ(second.row0, 3);
  EXPECT_EQ(second.src_offset, 5 + 3 * 6);
  const PackSegment* t = nullptr;
  for (const auto& ch : b.chunks)
    for (const auto& s : ch.segments)
      if (s.transpose && s.row0 == 3) t = &s;
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->src_offset, 7 + 3);
}

TEST(PackPlan, ChunkTagsSeparateSyncsAndChunks) {
  EXPECT_NE(ChunkTag(1, 0), ChunkTag(2, 0));
  EXPECT_NE(ChunkTag(1, 0), ChunkTag(1, 1));
  EXPECT_EQ(ChunkTag(0x1000001, 5), ChunkTag(1, 5));  // 24 bits of the sync id
}

TEST(PackPlan, ShardsOnSeveralNodesArePackedByTheirNodeAndNumberedPerDestination) {
  // Trainer ranks on a (tensor 0 shard 0, tensor 1 shard 0) and b (their shard 1); engines 0-1 on
  // a, 2-3 on b (TP ranks of one replica each).
  SyncPlan plan;
  plan.shard_base = {0, 2, 4};
  // A norm (tensor 0, 8 elements per shard): every engine reads both shards.
  for (uint32_t e = 0; e < 4; ++e) {
    plan.copies.push_back(Copy(0, 0, e, 0, 0, 8, 1, 1));
    plan.copies.push_back(Copy(0, 1, e, 0, 0, 8, 1, 1, 8));
  }
  // A TP-split weight (tensor 1, two shards of 4x8): TP rank 0 reads shard 0, TP rank 1 shard 1.
  for (uint32_t e = 0; e < 4; ++e) plan.copies.push_back(Copy(1, e % 2, e, 1, 0, 4, 8, 8));
  const std::vector<std::string> engines = {"a", "a", "b", "b"};
  const std::vector<std::vector<DType>> dtypes(4, {DType::kBF16, DType::kBF16});
  PackPlan p = BuildPackPlan(plan, engines, dtypes, std::vector<std::string>{"a", "b", "a", "b"}, 1 << 20);

  ASSERT_EQ(p.nodes.size(), 2u);
  for (const auto& [dst, src] : std::map<std::string, std::string>{{"a", "b"}, {"b", "a"}}) {
    const NodePack& np = p.nodes.at(dst);
    // From the other node only: its norm shard once (two scatter targets) and the weight shard
    // of the TP rank it holds.
    EXPECT_EQ(np.payload_bytes, (8 + 32) * 2u) << dst;
    EXPECT_EQ(np.scatter_bytes, (8 * 2 + 32) * 2u) << dst;
    EXPECT_EQ(np.bytes_from, (std::map<std::string, uint64_t>{{src, np.bytes}})) << dst;
    ASSERT_EQ(np.chunks.size(), 2u) << dst;
    for (const PackChunk& ch : np.chunks) {
      EXPECT_EQ(ch.source, src);
      EXPECT_EQ(ch.shard, dst == "a" ? 1u : 0u);
    }
    EXPECT_EQ(np.chunks[0].segments[0].copies.size(), 2u);
  }

  // Every shard on a: a sends b everything b needs, and nothing comes to a.
  PackPlan one = BuildPackPlan(plan, engines, dtypes, std::vector<std::string>(4, "a"), 1 << 20);
  ASSERT_EQ(one.nodes.size(), 1u);
  EXPECT_EQ(one.nodes.at("b").payload_bytes, (16 + 64) * 2u);
  EXPECT_EQ(one.nodes.at("b").bytes_from.at("a"), one.nodes.at("b").bytes);
  const PackPlan same = BuildPackPlan(plan, engines, dtypes, "a", 1 << 20);
  EXPECT_EQ(same.nodes.at("b").bytes, one.nodes.at("b").bytes);
}

}  // namespace
}  // namespace ws::cluster
