// Plan-time chains of a shard group's copies, so that binding a layer
// message costs per shard, not per planned copy.
//
// A group's shards (shard_groups.h) have the same list of planned copies up
// to their destination offsets: their k-th copies all go to one engine
// param with one shape. In the order of their destinations (the order a
// trainer's module walk stores consecutive experts in), the k-th copies of
// consecutive members often advance by a constant destination stride, as
// the experts of a fused 3-D parameter do. ChainShards orders each group's
// members by (trainer rank, destination of their first copy) and finds, per group and
// per k, the runs of members along which they do and along which the
// batched op stays within DstBatchesDisjoint (coalesce.h): a run is then one
// batched op whenever a message holds those members at a constant source
// stride, which BindLayer checks per shard (not per copy) before it uses a
// run, and BindOp still checks the merged op against both mappings.
//
// Thread-safety: pure functions; a ShardChains is immutable once built.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "daemon/core/planner.h"
#include "daemon/kernels/copy_math.h"

namespace ws::server {

struct ShardChains {
  std::vector<uint32_t> pos;           // per flat shard id: its position among its group's members
  std::vector<uint32_t> member_begin;  // per group g (+1): its members are members[member_begin[g], member_begin[g + 1])
  std::vector<uint32_t> members;       // flat shard ids, by group, by (rank, first copy's destination)
  std::vector<uint32_t> k_begin;       // per group g (+1): its (g, k) entries are k_begin[g] + k
  std::vector<uint32_t> run_begin;     // per (g, k) entry (+1): its run starts are starts[run_begin[e], run_begin[e + 1])
  std::vector<uint32_t> starts;        // member positions where a run starts, ascending (the first is 0)

  uint32_t Members(uint32_t g) const { return member_begin[g + 1] - member_begin[g]; }
  // The runs of group g's k-th copies as [start, end) member positions.
  // Calls f(start, end) for each run meeting positions [from, to), clipped to it.
  template <typename F>
  void ForEachRun(uint32_t g, uint32_t k, uint32_t from, uint32_t to, F&& f) const;
};

// Planned copy `c` as a copy op: offsets, row strides, shape and transpose
// (no pointers, dtypes or batches yet). BindLayer's ops and the chains'
// batch shapes both start from it.
kernels::CopyOp PlannedOp(const PlannedCopy& c);

// `group`: GroupShards' result for `plan` of `manifest`.
ShardChains ChainShards(const SourceManifest& manifest, const SyncPlan& plan, const std::vector<uint32_t>& group);

template <typename F>
void ShardChains::ForEachRun(uint32_t g, uint32_t k, uint32_t from, uint32_t to, F&& f) const {
  const uint32_t e = k_begin[g] + k;
  const uint32_t* const first = starts.data() + run_begin[e];
  const uint32_t* const last = starts.data() + run_begin[e + 1];
  // The run holding `from`: the last start at or before it.
  const uint32_t* r = std::upper_bound(first, last, from) - 1;
  for (; r != last && *r < to; ++r) {
    const uint32_t end = r + 1 != last ? r[1] : Members(g);
    f(std::max(*r, from), std::min(end, to));
  }
}

}  // namespace ws::server
