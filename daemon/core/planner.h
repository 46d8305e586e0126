// Sync planning and validation. Given the trainer's metadata manifest and the
// resolved layouts of every engine rank of a model, produce the complete list
// of copy operations, or refuse the sync with an error naming every offending
// tensor / parameter. Nothing here touches memory. Pure C++.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "daemon/core/layout.h"
#include "daemon/core/manifest.h"
#include "daemon/core/status.h"

namespace ws {

// One engine rank as the planner sees it.
struct PlanEngine {
  std::string engine_id;
  EngineRankSpec spec;   // registered params (names, shapes, dtypes)
  RankLayout layout;     // resolved from the rules at registration
};

// The same, borrowed: the planner reads the engine's own spec and layout
// without copying them (they must outlive the call).
struct PlanEngineView {
  const std::string* engine_id = nullptr;
  const EngineRankSpec* spec = nullptr;
  const RankLayout* layout = nullptr;
};
std::vector<PlanEngineView> ViewsOf(const std::vector<PlanEngine>& engines);

// A rectangular element copy from one trainer shard into one engine param.
// Offsets are element indices into the shard's / param's contiguous buffer.
//   dst[dst_offset + i*dst_ld + j] = cast(src[src_offset + (transpose ? j*src_ld + i : i*src_ld + j)])
// for i < rows, j < cols.
struct PlannedCopy {
  uint32_t tensor = 0;   // index into SourceManifest::tensors
  uint32_t shard = 0;    // index into that tensor's shards
  uint32_t engine = 0;   // index into the engines vector
  uint32_t param = 0;    // index into that engine's spec.params
  int64_t src_offset = 0, src_ld = 0;
  int64_t dst_offset = 0, dst_ld = 0;
  int64_t rows = 0, cols = 0;
  bool transpose = false;
};

// Zero-fill of a rectangle of an engine param (vocab padding rows).
struct PlannedZero {
  uint32_t engine = 0;
  uint32_t param = 0;
  int64_t dst_offset = 0, dst_ld = 0;
  int64_t rows = 0, cols = 0;
};

struct SyncPlan {
  std::vector<PlannedCopy> copies;   // grouped by (tensor, shard), in manifest order: see CopiesOf
  std::vector<PlannedZero> zeros;
  // Flat shard ids: shard s of tensor t is shard_base[t] + s (size: tensors + 1).
  std::vector<uint32_t> shard_base;
  // The copies reading flat shard f are copies[shard_begin[f], shard_begin[f + 1]).
  std::vector<uint32_t> shard_begin;
  // [first, last) indices into `copies` reading tensor t, shard s.
  std::pair<uint32_t, uint32_t> CopiesOf(uint32_t t, uint32_t s) const {
    const uint32_t f = shard_base[t] + s;
    return {shard_begin[f], shard_begin[f + 1]};
  }
  uint64_t bytes_written = 0;  // engine bytes (copies + zeros)
  uint64_t bytes_read = 0;     // trainer bytes read by copies
};

// Checks a registered engine rank against its resolved layout: every
// registered param is filled ("Some weights are not initialized: ..."), every
// expected param is registered, shapes match. Run at registration.
Status ValidateEngine(const EngineRankSpec& spec, const RankLayout& layout);

// Dtypes of one manifest tensor under dtype negotiation
// (SourceManifest::negotiate_dtypes).
struct TensorDtypes {
  DType wire = DType::kF32;          // the dtype its shards travel in
  std::vector<DType> destinations;   // distinct dtypes of the params it is written into, in enum order
};

// The wire dtype of a tensor held in `source`: the destination dtype when
// there is exactly one and it is narrower than `source`, else `source`. So a
// value is never sent narrower than a destination and is rounded at most once.
DType ChooseWireDType(DType source, const std::vector<DType>& destinations);

// One entry per manifest tensor, in manifest order. Routes like BuildPlan:
// every non-empty fill of every registered param (of every engine) that reads
// the tensor contributes that param's dtype; tensors nothing reads (skipped
// ones) get none and keep their dtype. Validates nothing: BuildPlan does.
std::vector<TensorDtypes> NegotiateDTypes(const SourceManifest& manifest, const std::vector<PlanEngineView>& engines);
std::vector<TensorDtypes> NegotiateDTypes(const SourceManifest& manifest, const std::vector<PlanEngine>& engines);

// Validates the manifest (unknown/unmapped tensors, shapes, dtypes, shard
// ranks, overlaps and gaps) against all engines and builds the plan. The error
// message lists every problem found, one per line, each naming the tensor.
// With `wire` (one dtype per manifest tensor), the tensors are planned as if
// their dtype were wire[t] (the negotiated wire dtypes), without copying the
// manifest.
Result<SyncPlan> BuildPlan(const SourceManifest& manifest, const std::vector<PlanEngineView>& engines,
                           const std::vector<DType>* wire = nullptr);
Result<SyncPlan> BuildPlan(const SourceManifest& manifest, const std::vector<PlanEngine>& engines);

}  // namespace ws
