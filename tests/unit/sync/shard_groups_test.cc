// Plan-time shard groups for coalescing: shards whose copies differ only in
// destination offsets and whose names differ only in numbers share a group;
// anything else that a merged op would have to ignore separates them.
#include "daemon/sync/shard_groups.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace ws::server {
namespace {

// One tensor of one shard with the given copies (dst_offset varies freely).
struct Builder {
  SourceManifest m;
  SyncPlan plan;
  std::vector<DType> wire;
  Builder() { plan.shard_base.push_back(0); }
  void Add(const std::string& name, DType dt, std::vector<PlannedCopy> copies) {
    const uint32_t t = static_cast<uint32_t>(m.tensors.size());
    SourceTensor st;
    st.name = name;
    st.shape = {8, 32};
    st.dtype = dt;
    st.shards.push_back(ShardSpec{0, 0, 0, 8});
    m.tensors.push_back(st);
    wire.push_back(dt);
    plan.shard_begin.push_back(static_cast<uint32_t>(plan.copies.size()));
    for (PlannedCopy& c : copies) {
      c.tensor = t;
      plan.copies.push_back(c);
    }
    plan.shard_base.push_back(plan.shard_base.back() + 1);
  }
  std::vector<uint32_t> Groups() {
    plan.shard_begin.push_back(static_cast<uint32_t>(plan.copies.size()));
    return GroupShards(m, plan, wire);
  }
};

PlannedCopy Copy(uint32_t engine, int64_t dst_offset) {
  PlannedCopy c;
  c.engine = engine;
  c.param = 3;
  c.src_offset = 8;
  c.src_ld = 32;
  c.dst_offset = dst_offset;
  c.dst_ld = 4;
  c.rows = 8;
  c.cols = 4;
  return c;
}

TEST(ShardGroupsTest, ExpertsShareAGroupPerTensorKind) {
  Builder b;
  for (int e = 0; e < 3; ++e) {
    const std::string p = "model.layers.1.mlp.experts." + std::to_string(e) + ".";
    b.Add(p + "gate_proj.weight", DType::kF32, {Copy(0, e * 256)});
    b.Add(p + "up_proj.weight", DType::kF32, {Copy(0, e * 256 + 128)});
    b.Add(p + "down_proj.weight", DType::kF32, {Copy(0, e * 256), Copy(1, e * 256)});
  }
  const std::vector<uint32_t> g = b.Groups();
  ASSERT_EQ(g.size(), 9u);
  for (int e = 1; e < 3; ++e)
    for (int k = 0; k < 3; ++k) EXPECT_EQ(g[e * 3 + k], g[k]) << "expert " << e << " kind " << k;
  // gate and up have equal copies but different names: separate groups, so a
  // layer's gate shards are adjacent and merge at a constant stride.
  EXPECT_NE(g[0], g[1]);
  EXPECT_NE(g[0], g[2]);
  EXPECT_NE(g[1], g[2]);
}

TEST(ShardGroupsTest, AnyDifferenceButTheDestinationOffsetSeparates) {
  Builder b;
  const std::string n = "model.layers.0.mlp.experts.0.down_proj.weight";
  b.Add(n, DType::kF32, {Copy(0, 0)});
  b.Add("model.layers.0.mlp.experts.1.down_proj.weight", DType::kF32, {Copy(0, 999)});  // same group
  b.Add(n, DType::kBF16, {Copy(0, 0)});                                            // wire dtype
  b.Add(n, DType::kF32, {Copy(1, 0)});                                             // engine
  b.Add(n, DType::kF32, {Copy(0, 0), Copy(1, 0)});                                 // copy count
  PlannedCopy c = Copy(0, 0);
  c.param = 4;
  b.Add(n, DType::kF32, {c});
  c = Copy(0, 0);
  c.src_offset = 9;
  b.Add(n, DType::kF32, {c});
  c = Copy(0, 0);
  c.src_ld = 33;
  b.Add(n, DType::kF32, {c});
  c = Copy(0, 0);
  c.rows = 7;
  b.Add(n, DType::kF32, {c});
  c = Copy(0, 0);
  c.cols = 3;
  b.Add(n, DType::kF32, {c});
  c = Copy(0, 0);
  c.dst_ld = 5;
  b.Add(n, DType::kF32, {c});
  c = Copy(0, 0);
  c.transpose = true;
  b.Add(n, DType::kF32, {c});
  b.Add("model.layers.0.mlp.experts.0.up_proj.weight", DType::kF32, {Copy(0, 0)});  // name
  const std::vector<uint32_t> g = b.Groups();
  ASSERT_EQ(g.size(), 13u);
  EXPECT_EQ(g[0], g[1]);
  for (size_t i = 2; i < g.size(); ++i) {
    EXPECT_NE(g[i], g[0]) << "shard " << i;
    for (size_t j = 2; j < i; ++j) EXPECT_NE(g[i], g[j]) << i << " vs " << j;
  }
}

}  // namespace
}  // namespace ws::server
