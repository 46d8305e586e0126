#include "daemon/cluster/pack.h"

#include <algorithm>
#include <tuple>

namespace ws::cluster {

namespace {

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// `source(tensor, shard)`: the node holding that shard.
template <typename SourceOf>
PackPlan Build(const SyncPlan& plan, const std::vector<std::string>& engine_node,
               const std::vector<std::vector<DType>>& param_dtypes, const SourceOf& source_of,
               uint64_t max_chunk_bytes) {
  if (max_chunk_bytes == 0) max_chunk_bytes = 1;
  // node -> (tensor, shard) -> distinct rectangles, in copy order.
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, uint8_t>;
  struct Shard {
    std::vector<PackSegment> segs;
    std::map<Key, size_t> index;
  };
  std::map<std::string, std::map<std::pair<uint32_t, uint32_t>, Shard>> groups;
  std::map<std::string, uint64_t> scatter;
  for (uint32_t ci = 0; ci < plan.copies.size(); ++ci) {
    const PlannedCopy& c = plan.copies[ci];
    const std::string& node = engine_node.at(c.engine);
    if (node == source_of(c.tensor, c.shard) || c.rows <= 0 || c.cols <= 0) continue;
    const DType dt = param_dtypes.at(c.engine).at(c.param);
    Shard& sh = groups[node][{c.tensor, c.shard}];
    Key k{c.src_offset, c.src_ld, c.rows, c.cols, c.transpose, static_cast<uint8_t>(dt)};
    auto [it, fresh] = sh.index.emplace(k, sh.segs.size());
    if (fresh) {
      PackSegment s;
      s.src_offset = c.src_offset;
      s.src_ld = c.src_ld;
      s.rows = c.rows;
      s.cols = c.cols;
      s.transpose = c.transpose;
      s.dtype = dt;
      sh.segs.push_back(std::move(s));
    }
    sh.segs[it->second].copies.push_back(ci);
    scatter[node] += static_cast<uint64_t>(c.rows * c.cols) * DTypeSize(dt);
  }

  PackPlan out;
  for (auto& [node, shards] : groups) {
    NodePack& np = out.nodes[node];
    np.scatter_bytes = scatter[node];
    for (auto& [shard_key, sh] : shards) {
      const std::pair<uint32_t, uint32_t> ts = shard_key;  // a lambda may not capture a structured binding (clang)
      const std::string& source = source_of(ts.first, ts.second);
      PackChunk cur;
      cur.tensor = ts.first;
      cur.shard = ts.second;
      cur.source = source;
      auto flush = [&] {
        if (cur.segments.empty()) return;
        np.by_shard[ts].push_back(static_cast<uint32_t>(np.chunks.size()));
        np.bytes += cur.bytes;
        np.bytes_from[cur.source] += cur.bytes;
        np.chunks.push_back(std::move(cur));
        cur = PackChunk{};
        cur.tensor = ts.first;
        cur.shard = ts.second;
        cur.source = source;
      };
      for (const PackSegment& whole : sh.segs) {
        const uint64_t esize = DTypeSize(whole.dtype);
        const uint64_t row_bytes = static_cast<uint64_t>(whole.cols) * esize;
        const int64_t step = static_cast<int64_t>(std::max<uint64_t>(1, max_chunk_bytes / row_bytes));
        for (int64_t r0 = 0; r0 < whole.rows; r0 += step) {
          PackSegment s = whole;
          s.row0 = r0;
          s.rows = std::min(step, whole.rows - r0);
          s.src_offset = whole.src_offset + (whole.transpose ? r0 : r0 * whole.src_ld);
          uint64_t at = AlignUp(cur.bytes, esize);
          if (!cur.segments.empty() && at + s.bytes() > max_chunk_bytes) {
            flush();
            at = 0;
          }
          s.offset = at;
          cur.bytes = at + s.bytes();
          np.payload_bytes += s.bytes();
          cur.segments.push_back(std::move(s));
        }
      }
      flush();
    }
  }
  return out;
}


}  // namespace

PackPlan BuildPackPlan(const SyncPlan& plan, const std::vector<std::string>& engine_node,
                       const std::vector<std::vector<DType>>& param_dtypes, const std::string& self,
                       uint64_t max_chunk_bytes) {
  return Build(plan, engine_node, param_dtypes, [&](uint32_t, uint32_t) -> const std::string& { return self; },
               max_chunk_bytes);
}

PackPlan BuildPackPlan(const SyncPlan& plan, const std::vector<std::string>& engine_node,
                       const std::vector<std::vector<DType>>& param_dtypes,
                       const std::vector<std::string>& shard_node, uint64_t max_chunk_bytes) {
  return Build(
      plan, engine_node, param_dtypes,
      [&](uint32_t t, uint32_t s) -> const std::string& { return shard_node.at(plan.shard_base.at(t) + s); },
      max_chunk_bytes);
}

}  // namespace ws::cluster
