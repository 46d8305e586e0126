#include "daemon/sync/shard_groups.h"

#include <string>
#include <unordered_map>

namespace ws::server {

namespace {

// The name with every dot-separated component that is all digits (an
// index: "layers.3", "experts.17") replaced by '#'. Digits inside a
// component stay ("w1" and "w3" of Mixtral's experts are different
// tensors, laid out apart in the trainer's memory).
std::string NamePattern(const std::string& name) {
  std::string p;
  p.reserve(name.size());
  for (size_t i = 0; i < name.size();) {
    size_t j = name.find('.', i);
    if (j == std::string::npos) j = name.size();
    bool digits = j > i;
    for (size_t k = i; k < j && digits; ++k) digits = name[k] >= '0' && name[k] <= '9';
    if (digits)
      p += '#';
    else
      p.append(name, i, j - i);
    if (j < name.size()) p += '.';
    i = j + 1;
  }
  return p;
}

uint64_t Mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h * 0xff51afd7ed558ccdull;
}

bool SameCopy(const PlannedCopy& a, const PlannedCopy& b) {
  return a.engine == b.engine && a.param == b.param && a.src_offset == b.src_offset && a.src_ld == b.src_ld &&
         a.rows == b.rows && a.cols == b.cols && a.dst_ld == b.dst_ld && a.transpose == b.transpose;
}

}  // namespace

std::vector<uint32_t> GroupShards(const SourceManifest& manifest, const SyncPlan& plan, const std::vector<DType>& wire) {
  const size_t n_tensors = manifest.tensors.size();
  std::vector<uint32_t> pattern(n_tensors);
  {
    std::unordered_map<std::string, uint32_t> ids;
    for (size_t t = 0; t < n_tensors; ++t)
      pattern[t] = ids.emplace(NamePattern(manifest.tensors[t].name), static_cast<uint32_t>(ids.size())).first->second;
  }
  std::vector<uint32_t> group(plan.shard_base.empty() ? 0 : plan.shard_base.back());
  std::vector<std::pair<uint32_t, uint32_t>> rep;  // per group: a (tensor, shard) of it
  std::unordered_map<uint64_t, uint32_t> by_hash;  // open addressing over the hash on collisions
  by_hash.reserve(1024);
  auto same = [&](uint32_t t, uint32_t s, uint32_t u, uint32_t r) {
    if (pattern[t] != pattern[u] || wire[t] != wire[u]) return false;
    auto [b0, e0] = plan.CopiesOf(t, s);
    auto [b1, e1] = plan.CopiesOf(u, r);
    if (e0 - b0 != e1 - b1) return false;
    for (uint32_t k = 0; k < e0 - b0; ++k)
      if (!SameCopy(plan.copies[b0 + k], plan.copies[b1 + k])) return false;
    return true;
  };
  for (uint32_t t = 0; t < n_tensors; ++t) {
    for (uint32_t s = 0; s < manifest.tensors[t].shards.size(); ++s) {
      auto [b, e] = plan.CopiesOf(t, s);
      uint64_t h = Mix(Mix(pattern[t], static_cast<uint64_t>(wire[t])), e - b);
      for (uint32_t ci = b; ci < e; ++ci) {
        const PlannedCopy& c = plan.copies[ci];
        h = Mix(h, (static_cast<uint64_t>(c.engine) << 32) | c.param);
        h = Mix(Mix(Mix(h, static_cast<uint64_t>(c.src_offset)), static_cast<uint64_t>(c.src_ld)),
                static_cast<uint64_t>(c.rows));
        h = Mix(Mix(Mix(h, static_cast<uint64_t>(c.cols)), static_cast<uint64_t>(c.dst_ld)), c.transpose);
      }
      for (;; ++h) {
        auto [it, inserted] = by_hash.emplace(h, static_cast<uint32_t>(rep.size()));
        if (inserted) rep.emplace_back(t, s);
        if (inserted || same(t, s, rep[it->second].first, rep[it->second].second)) {
          group[plan.shard_base[t] + s] = it->second;
          break;
        }
      }
    }
  }
  return group;
}

}  // namespace ws::server
