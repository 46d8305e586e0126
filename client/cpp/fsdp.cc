#include "client/cpp/fsdp.h"

#include <algorithm>
#include <cstring>
#include <unordered_map>

namespace ws::fsdp {

Range ChunkRange(int64_t extent, uint32_t world, uint32_t index) {
  if (world == 0 || extent <= 0) return {std::max<int64_t>(extent, 0), 0};
  const int64_t chunk = (extent + world - 1) / world;
  const int64_t start = static_cast<int64_t>(index) * chunk;
  if (start >= extent) return {extent, 0};
  return {start, std::min(chunk, extent - start)};
}

std::vector<ShardSpec> SplitTensor(const Shape& shape, uint32_t world, uint32_t dim) {
  std::vector<ShardSpec> out;
  if (shape.empty()) {
    out.push_back({0, 0, 0, 1});
    return out;
  }
  const uint32_t d = (dim == 1 && shape.size() == 2) ? 1 : 0;
  for (uint32_t r = 0; r < world; ++r) {
    Range rg = ChunkRange(shape[d], world, r);
    if (rg.length > 0) out.push_back({r, d, rg.start, rg.length});
  }
  return out;
}

uint64_t ShardBytes(const Shape& shape, size_t esize, const ShardSpec& shard) {
  if (shape.empty()) return esize;
  int64_t n = shard.length;
  for (size_t i = 0; i < shape.size(); ++i)
    if (i != shard.dim) n *= shape[i];
  return static_cast<uint64_t>(n) * esize;
}

void PackShard(const uint8_t* src, const Shape& shape, size_t esize, const ShardSpec& shard, uint8_t* dst) {
  if (shape.empty()) {
    std::memcpy(dst, src, esize);
    return;
  }
  if (shard.dim == 0) {
    uint64_t row = esize;
    for (size_t i = 1; i < shape.size(); ++i) row *= static_cast<uint64_t>(shape[i]);
    std::memcpy(dst, src + static_cast<uint64_t>(shard.start) * row, static_cast<uint64_t>(shard.length) * row);
    return;
  }
  const uint64_t rows = static_cast<uint64_t>(shape[0]);
  const uint64_t src_ld = static_cast<uint64_t>(shape[1]) * esize;
  const uint64_t len = static_cast<uint64_t>(shard.length) * esize;
  const uint8_t* s = src + static_cast<uint64_t>(shard.start) * esize;
  for (uint64_t i = 0; i < rows; ++i) std::memcpy(dst + i * len, s + i * src_ld, len);
}

std::string LayerKey(const std::string& name) {
  size_t pos = 0;
  while (pos <= name.size()) {
    size_t end = name.find('.', pos);
    if (end == std::string::npos) end = name.size();
    bool digits = end > pos;
    for (size_t i = pos; i < end && digits; ++i) digits = name[i] >= '0' && name[i] <= '9';
    if (digits) return name.substr(0, end);
    pos = end + 1;
  }
  size_t last = name.rfind('.');
  return last == std::string::npos ? name : name.substr(0, last);
}

std::vector<LayerGroup> GroupByLayer(const std::vector<std::string>& names) {
  std::vector<LayerGroup> groups;
  std::unordered_map<std::string, size_t> index;
  for (size_t i = 0; i < names.size(); ++i) {
    std::string key = LayerKey(names[i]);
    auto [it, inserted] = index.emplace(key, groups.size());
    if (inserted) groups.push_back({key, {}});
    groups[it->second].members.push_back(i);
  }
  return groups;
}

}  // namespace ws::fsdp
