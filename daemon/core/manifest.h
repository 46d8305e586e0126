// Domain structs for both sides of a sync. Pure C++ (no gRPC, no CUDA): the
// gRPC layer converts protos into these, and everything below works on them.
// Thread-safety: plain value types.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "daemon/core/dtype.h"

namespace ws {

using Shape = std::vector<int64_t>;

int64_t NumElements(const Shape& s);

// Largest tensor weightsync accepts (2^50 elements): with every dim >= 0 and
// this bound, offset arithmetic on shapes cannot overflow int64.
inline constexpr int64_t kMaxTensorElements = int64_t{1} << 50;
// True when every dim is >= 0 and the product of the dims, zeros counted as 1,
// is <= kMaxTensorElements (computed without overflow). Then every partial
// product (element count, As2D rows, any extent) fits as well: [0, 2^60] is
// refused even though it holds no element. NumElements and As2D assume it.
bool ShapeInRange(const Shape& s);
std::string ShapeToString(const Shape& s);  // "[4096, 128]"

// Every tensor is viewed as 2-D for planning: [prod(shape[:-1]), shape[-1]];
// a 1-D tensor [n] is [n, 1]; a scalar is [1, 1].
struct View2D {
  int64_t rows = 0;
  int64_t cols = 0;
};
View2D As2D(const Shape& s);

// ---- Trainer side ---------------------------------------------------------

// A piece of a source tensor held by one trainer rank: the range
// [start, start+length) along `dim` (0 or 1) of the global tensor; the rank's
// bytes are that piece, contiguous and row-major.
struct ShardSpec {
  uint32_t rank = 0;
  uint32_t dim = 0;
  int64_t start = 0;
  int64_t length = 0;
};

struct SourceTensor {
  std::string name;
  Shape shape;  // global
  DType dtype = DType::kF32;
  std::vector<ShardSpec> shards;
};

struct SourceManifest {
  std::string model;
  uint64_t version = 0;
  uint32_t world_size = 1;
  std::vector<SourceTensor> tensors;
  // Dtype negotiation: each tensor's dtype is the trainer's source dtype and
  // BeginSync replaces it by the wire dtype it chooses (NegotiateDTypes).
  bool negotiate_dtypes = false;
  // Plan reuse (BeginSyncRequest.manifest_fingerprint, reuse_manifest): with
  // reuse_manifest, `tensors` is empty and the manifest the daemon keeps
  // under `fingerprint` is used.
  std::string fingerprint;
  bool reuse_manifest = false;
  // BeginSyncRequest.rank_nodes: the node each trainer rank pushes to (empty:
  // all to the daemon that got BeginSync). Per sync, not part of a kept manifest.
  std::vector<std::string> rank_nodes;
};

// ---- Engine side ----------------------------------------------------------

struct EngineParamSpec {
  std::string name;
  Shape shape;  // per-rank
  DType dtype = DType::kBF16;
  std::string mapping_json;  // optional explicit mapping (docs/layouts.md)
  // Names another param of the same rank whose memory this one shares exactly
  // (a tied copy, e.g. lm_head.weight tied to embed_tokens.weight). Only
  // declared ties may overlap in memory.
  std::string tied_to;
  // A staging buffer the engine applies only at commit: writes need no pause.
  bool staged = false;
};

// What one engine rank declares about itself (memory references are kept by
// the gRPC/memory layers; the core only needs names, shapes and dtypes).
struct EngineRankSpec {
  std::string model;
  std::string architecture;
  std::string hf_config_json;
  uint32_t replica_id = 0;
  uint32_t tp_rank = 0;
  uint32_t tp_size = 1;
  std::map<std::string, int64_t> options;  // e.g. enable_expert_parallel
  std::vector<EngineParamSpec> params;
  // The engine acknowledges `started` once paused (AckPaused); in-place
  // writes into it wait for that.
  bool acks_pause = false;
};

}  // namespace ws
