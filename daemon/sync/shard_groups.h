// Plan-time grouping of trainer shards for coalescing (daemon/dataplane/
// coalesce.h). Shards of one group are interchangeable up to where their
// bytes sit and where their copies go: the same tensor name up to its
// index components ("model.layers.#.mlp.experts.#.down_proj.weight";
// digits inside a component, as in Mixtral's "w1" and "w3", stay), wire dtype and
// list of planned copies (engine, param, source offset and stride, shape,
// destination stride, transpose). At bind time a layer's shards are ordered by
// group, so that the k-th copies of a group's shards are adjacent, and
// merged into one batched op wherever their actual source and destination
// offsets advance by constant strides (checked per sync: message offsets may
// change).
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <vector>

#include "daemon/core/manifest.h"
#include "daemon/core/planner.h"

namespace ws::server {

// Group id per flat shard id (SyncPlan::shard_base), dense from 0.
std::vector<uint32_t> GroupShards(const SourceManifest& manifest, const SyncPlan& plan, const std::vector<DType>& wire);

}  // namespace ws::server
