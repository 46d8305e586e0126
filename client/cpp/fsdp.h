// Trainer-side helpers that mimic PyTorch FSDP2 sharding: torch.chunk splits
// along one dimension, packing one rank's piece contiguously, and grouping
// checkpoint tensors into per-layer messages.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "daemon/core/manifest.h"

namespace ws::fsdp {

struct Range {
  int64_t start = 0;
  int64_t length = 0;
  bool operator==(const Range&) const = default;
};

// Piece `index` of torch.chunk(extent, world): chunk = ceil(extent/world);
// piece i = [i*chunk, min((i+1)*chunk, extent)) when i*chunk < extent, else
// empty (length 0, start = extent).
Range ChunkRange(int64_t extent, uint32_t world, uint32_t index);

// The non-empty shards of a tensor of `shape` split across `world` ranks
// along `dim` (0, or 1 for 2-D tensors; other tensors always use dim 0).
// A scalar is held whole by rank 0.
std::vector<ShardSpec> SplitTensor(const Shape& shape, uint32_t world, uint32_t dim);

// Bytes of `shard` of a tensor of `shape` with elements of `esize` bytes.
uint64_t ShardBytes(const Shape& shape, size_t esize, const ShardSpec& shard);

// Copies `shard` of the row-major tensor at `src` into `dst` as a contiguous
// row-major block (a dim-1 shard of [rows, cols] becomes [rows, length]).
void PackShard(const uint8_t* src, const Shape& shape, size_t esize, const ShardSpec& shard, uint8_t* dst);

// The layer a tensor belongs to: the name up to and including its first
// all-digit component ("model.layers.3.mlp.up_proj.weight" -> "model.layers.3");
// without one, the name minus its last component ("model.embed_tokens.weight"
// -> "model.embed_tokens", "lm_head.weight" -> "lm_head"); a one-component
// name is its own key.
std::string LayerKey(const std::string& name);

struct LayerGroup {
  std::string key;
  std::vector<size_t> members;  // indices into the input, in input order
};

// Groups names by LayerKey, groups ordered by first appearance.
std::vector<LayerGroup> GroupByLayer(const std::vector<std::string>& names);

}  // namespace ws::fsdp
