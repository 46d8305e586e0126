// Sender-side reshard across nodes: from a sync's plan (every engine of every
// node) to what each source node (the node whose daemon the shard's trainer
// rank pushes to) sends each other node. For each destination
// node and each trainer shard, the distinct rectangles of that shard its
// engines read, each already cast to the destination dtype (a segment), packed
// back to back into chunks of at most `max_chunk_bytes`. A rectangle that two
// engine ranks of one node need in the same dtype (norms and biases replicated
// across TP ranks) is one segment with two scatter targets: every byte
// crosses the network at most once per destination node. Source and
// destination derive the same packing from the same plan, so only the bytes
// travel, tagged by chunk.
//
// Pure C++; thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "daemon/core/dtype.h"
#include "daemon/core/manifest.h"
#include "daemon/core/planner.h"

namespace ws::cluster {

// One rectangle of a shard, cast to `dtype`, packed row-major:
//   packed[offset/size(dtype) + i*cols + j] =
//       cast(src[src_offset + (transpose ? j*src_ld + i : i*src_ld + j)])
// for i < rows, j < cols. It is rows [row0, row0+rows) of every planned copy
// in `copies` (identical rectangles of one shard, in one dtype).
struct PackSegment {
  int64_t src_offset = 0, src_ld = 0, rows = 0, cols = 0;
  bool transpose = false;
  DType dtype = DType::kF32;
  int64_t row0 = 0;
  uint64_t offset = 0;          // bytes into its chunk (a multiple of the dtype size)
  std::vector<uint32_t> copies; // indices into SyncPlan::copies: the scatter targets (>= 1)
  uint64_t bytes() const { return static_cast<uint64_t>(rows * cols) * DTypeSize(dtype); }
};

// Segments of one shard, sent as one message.
struct PackChunk {
  uint32_t tensor = 0, shard = 0;
  std::string source;  // the node that packs and sends it (its shard's trainer rank pushes there)
  uint64_t bytes = 0;  // message size: segments plus alignment padding
  std::vector<PackSegment> segments;
};

struct NodePack {
  std::vector<PackChunk> chunks;  // in (tensor, shard) order; index = tag's chunk number
  std::map<std::pair<uint32_t, uint32_t>, std::vector<uint32_t>> by_shard;  // (tensor, shard) -> chunks
  uint64_t bytes = 0;          // sum of chunk bytes: what crosses the network to the node
  uint64_t payload_bytes = 0;  // sum of segment bytes (bytes minus padding)
  uint64_t scatter_bytes = 0;  // engine bytes the node writes from them (>= payload_bytes)
  std::map<std::string, uint64_t> bytes_from;  // source node -> its chunks' bytes (sum = bytes)
};

struct PackPlan {
  std::map<std::string, NodePack> nodes;  // destination node -> its pack; only nodes with copies
};

// `engine_node[e]` is the node of plan engine e, `shard_node[i]` that of
// flat shard i (SyncPlan::shard_base): a copy into an engine on its shard's
// node is local and not packed. `param_dtypes[e][p]` is the dtype of engine
// e's param p. `max_chunk_bytes` >= 1: a segment larger than it is split by
// rows (a single row larger than it travels alone). A destination's chunks
// are numbered across all its sources, so their tags never collide.
PackPlan BuildPackPlan(const SyncPlan& plan, const std::vector<std::string>& engine_node,
                       const std::vector<std::vector<DType>>& param_dtypes,
                       const std::vector<std::string>& shard_node, uint64_t max_chunk_bytes);
// Every shard on node `self` (all trainer ranks push to one daemon).
PackPlan BuildPackPlan(const SyncPlan& plan, const std::vector<std::string>& engine_node,
                       const std::vector<std::vector<DType>>& param_dtypes, const std::string& self,
                       uint64_t max_chunk_bytes);

// The UCX tag of chunk `chunk` of a sync: the sync id's low 24 bits and the
// chunk number (< 2^40), so chunks of an earlier sync never match.
inline uint64_t ChunkTag(uint64_t sync_id, uint64_t chunk) {
  return ((sync_id & 0xFFFFFFull) << 40) | (chunk & ((uint64_t{1} << 40) - 1));
}

}  // namespace ws::cluster
