// Fuzz target: a trainer's BeginSync manifest. Bytes -> BeginSyncRequest ->
// FromProto -> BuildPlan against two replicas of a tiny Llama at tp_size 2.
// An accepted plan must stay inside every shard and parameter buffer and
// write every engine byte exactly as often as the layout says.
#include <cstddef>
#include <cstdint>

#include "daemon/server/convert.h"
#include "tests/fuzz/fuzz_common.h"

namespace ws::fuzz {
namespace {

// Elements of shard `s`'s contiguous buffer.
int64_t ShardElements(const SourceTensor& t, const ShardSpec& s) {
  if (t.shape.empty()) return 1;
  int64_t n = s.length;
  for (size_t i = 0; i < t.shape.size(); ++i)
    if (i != s.dim) n *= t.shape[i];
  return n;
}

void CheckPlan(const SyncPlan& plan, const SourceManifest& m, const std::vector<PlanEngine>& engines) {
  uint64_t written = 0;
  for (const PlannedCopy& c : plan.copies) {
    Check(c.tensor < m.tensors.size() && c.shard < m.tensors[c.tensor].shards.size(), "copy source index");
    Check(c.engine < engines.size() && c.param < engines[c.engine].spec.params.size(), "copy destination index");
    const SourceTensor& t = m.tensors[c.tensor];
    const ShardSpec& sh = t.shards[c.shard];
    const EngineParamSpec& p = engines[c.engine].spec.params[c.param];
    Check(sh.rank < m.world_size, "copy reads a shard of rank " + std::to_string(sh.rank));
    Check(c.rows > 0 && c.cols > 0 && c.src_offset >= 0 && c.dst_offset >= 0, "copy extents of " + t.name);
    // Last element each side touches (rows/cols > 0, so these are real elements).
    const int64_t src_last = c.transpose ? c.src_offset + (c.cols - 1) * c.src_ld + (c.rows - 1)
                                         : c.src_offset + (c.rows - 1) * c.src_ld + (c.cols - 1);
    Check((c.transpose ? c.rows : c.cols) <= c.src_ld, "copy row stride of " + t.name);
    Check(src_last < ShardElements(t, sh), "copy reads past shard " + std::to_string(c.shard) + " of " + t.name);
    Check(c.cols <= c.dst_ld, "copy row stride into " + p.name);
    Check(c.dst_offset + (c.rows - 1) * c.dst_ld + (c.cols - 1) < NumElements(p.shape),
          "copy writes past param " + p.name);
    written += static_cast<uint64_t>(c.rows * c.cols) * DTypeSize(p.dtype);
  }
  for (const PlannedZero& z : plan.zeros) {
    Check(z.engine < engines.size() && z.param < engines[z.engine].spec.params.size(), "zero destination index");
    const EngineParamSpec& p = engines[z.engine].spec.params[z.param];
    Check(z.rows > 0 && z.cols > 0 && z.dst_offset >= 0 && z.cols <= z.dst_ld, "zero extents of " + p.name);
    Check(z.dst_offset + (z.rows - 1) * z.dst_ld + (z.cols - 1) < NumElements(p.shape),
          "zero-fill writes past param " + p.name);
    written += static_cast<uint64_t>(z.rows * z.cols) * DTypeSize(p.dtype);
  }
  // The layouts tile every param exactly once, so an accepted plan writes
  // each engine byte once.
  uint64_t expected = 0;
  for (const PlanEngine& e : engines)
    for (const EngineParamSpec& p : e.spec.params) expected += static_cast<uint64_t>(NumElements(p.shape)) * DTypeSize(p.dtype);
  Check(written == plan.bytes_written, "bytes_written matches the copies and zeros");
  Check(written == expected, "plan writes " + std::to_string(written) + " engine bytes, params hold " +
                                 std::to_string(expected));
  Check(plan.shard_base.size() == m.tensors.size() + 1, "shard_base covers every tensor");
  size_t listed = 0;
  for (uint32_t t = 0; t < m.tensors.size(); ++t) {
    Check(plan.shard_base[t + 1] - plan.shard_base[t] == m.tensors[t].shards.size(), "shard_base covers every shard");
    for (uint32_t s = 0; s < m.tensors[t].shards.size(); ++s) {
      auto [b, e] = plan.CopiesOf(t, s);
      for (uint32_t i = b; i < e; ++i) {
        Check(i < plan.copies.size() && plan.copies[i].tensor == t && plan.copies[i].shard == s, "CopiesOf index");
        ++listed;
      }
    }
  }
  Check(listed == plan.copies.size(), "CopiesOf lists every copy once");
}

}  // namespace
}  // namespace ws::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::vector<ws::PlanEngine>& engines = ws::fuzz::TinyLlamaEngines();
  weightsync::v1::BeginSyncRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto manifest = ws::server::FromProto(req);
  if (!manifest.ok()) return 0;
  auto plan = ws::BuildPlan(*manifest, engines);
  if (plan.ok()) ws::fuzz::CheckPlan(*plan, *manifest, engines);
  return 0;
}
