#include "daemon/sync/shard_chains.h"

#include <algorithm>

#include "daemon/dataplane/coalesce.h"
#include "daemon/dataplane/executor.h"

namespace ws::server {

kernels::CopyOp PlannedOp(const PlannedCopy& c) {
  kernels::CopyOp op;
  op.src_offset = c.src_offset;
  op.src_ld = c.src_ld;
  op.dst_offset = c.dst_offset;
  op.dst_ld = c.dst_ld;
  op.rows = c.rows;
  op.cols = c.cols;
  op.transpose = c.transpose ? 1 : 0;
  return op;
}

ShardChains ChainShards(const SourceManifest& manifest, const SyncPlan& plan, const std::vector<uint32_t>& group) {
  ShardChains c;
  const uint32_t n_shards = static_cast<uint32_t>(group.size());
  uint32_t n_groups = 0;
  for (uint32_t g : group) n_groups = std::max(n_groups, g + 1);
  // Members by group (counting sort keeps manifest order within a group).
  c.member_begin.assign(n_groups + 1, 0);
  for (uint32_t g : group) ++c.member_begin[g + 1];
  for (uint32_t g = 0; g < n_groups; ++g) c.member_begin[g + 1] += c.member_begin[g];
  c.members.resize(n_shards);
  c.pos.resize(n_shards);
  {
    std::vector<uint32_t> fill(c.member_begin.begin(), c.member_begin.end() - 1);
    for (uint32_t f = 0; f < n_shards; ++f) c.members[fill[group[f]]++] = f;
  }
  // Each group's members by (trainer rank, destination of their first
  // copy): one rank's shards are consecutive (a message holds one rank's),
  // and a fused parameter's experts follow its layout whatever order the
  // manifest lists them in (a safetensors header lists experts 0, 1, 10, 100).
  std::vector<uint32_t> rank(n_shards);
  for (uint32_t t = 0; t < manifest.tensors.size(); ++t)
    for (uint32_t s = 0; s < manifest.tensors[t].shards.size(); ++s)
      rank[plan.shard_base[t] + s] = manifest.tensors[t].shards[s].rank;
  auto first_dst = [&](uint32_t f) {
    return plan.shard_begin[f] < plan.shard_begin[f + 1] ? plan.copies[plan.shard_begin[f]].dst_offset : int64_t{-1};
  };
  for (uint32_t g = 0; g < n_groups; ++g) {
    uint32_t* m = c.members.data() + c.member_begin[g];
    if (c.Members(g) < 2) continue;
    std::sort(m, m + c.Members(g), [&](uint32_t x, uint32_t y) {
      if (rank[x] != rank[y]) return rank[x] < rank[y];
      const int64_t dx = first_dst(x), dy = first_dst(y);
      return dx != dy ? dx < dy : x < y;
    });
  }
  for (uint32_t g = 0; g < n_groups; ++g)
    for (uint32_t q = 0; q < c.Members(g); ++q) c.pos[c.members[c.member_begin[g] + q]] = q;
  c.k_begin.assign(n_groups + 1, 0);
  c.run_begin.push_back(0);
  for (uint32_t g = 0; g < n_groups; ++g) {
    const uint32_t* m = c.members.data() + c.member_begin[g];
    const uint32_t n = c.Members(g);
    const uint32_t copies = n == 0 ? 0 : plan.shard_begin[m[0] + 1] - plan.shard_begin[m[0]];
    c.k_begin[g + 1] = c.k_begin[g] + copies;
    for (uint32_t k = 0; k < copies; ++k) {
      // The batched op's destination shape, as BindLayer builds it
      // (Canonical of one copy; pointers and source offsets do not matter).
      const PlannedCopy& pc = plan.copies[plan.shard_begin[m[0]] + k];
      const kernels::CopyOp shape = Canonical(PlannedOp(pc));
      auto dst = [&](uint32_t p) { return plan.copies[plan.shard_begin[m[p]] + k].dst_offset; };
      uint32_t start = 0;
      int64_t stride = 0;
      c.starts.push_back(0);
      for (uint32_t p = 1; p < n; ++p) {
        const int64_t d = dst(p) - dst(p - 1);
        bool extends = p - start == 1 ? d > 0 : d == stride;
        if (extends) {
          kernels::CopyOp run = shape;
          run.count = static_cast<int32_t>(std::min<uint32_t>(p - start + 1, INT32_MAX));
          run.dst_batch_stride = d;
          extends = p - start + 1 <= INT32_MAX && DstBatchesDisjoint(run);
        }
        if (extends) {
          stride = d;
          continue;
        }
        start = p;
        c.starts.push_back(p);
      }
      c.run_begin.push_back(static_cast<uint32_t>(c.starts.size()));
    }
  }
  return c;
}

}  // namespace ws::server
