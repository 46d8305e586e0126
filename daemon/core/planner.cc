#include "daemon/core/planner.h"

#include <algorithm>
#include <map>
#include <set>
#include <tuple>
#include <unordered_map>

#include "daemon/core/text.h"

namespace ws {

namespace {

std::string Range(int64_t a, int64_t b) { return "[" + std::to_string(a) + ", " + std::to_string(b) + ")"; }

// [start, start + length) of a shard as the peer sent it, which may not fit int64.
std::string ShardRange(int64_t start, int64_t length) {
  int64_t end;
  if (__builtin_add_overflow(start, length, &end))
    return "[" + std::to_string(start) + ", " + std::to_string(start) + " + " + std::to_string(length) + ")";
  return Range(start, end);
}

// A shard's rectangle in its tensor's physical 2-D view, and its own row stride.
struct ShardRect {
  int64_t r0, r1, c0, c1;
  int64_t ld;
};

ShardRect RectOf(const SourceTensor& t, const ShardSpec& s) {
  View2D v = As2D(t.shape);
  if (s.dim == 1) return {0, v.rows, s.start, s.start + s.length, s.length};
  int64_t inner = 1;
  for (size_t i = 1; i + 1 < t.shape.size(); ++i) inner *= t.shape[i];
  return {s.start * inner, (s.start + s.length) * inner, 0, v.cols, v.cols};
}

// Replica groups of one tensor: shards with identical (dim, start, length).
struct Group {
  int64_t start, end;  // along the shard dim
  std::vector<uint32_t> shards;
};

struct TensorInfo {
  std::vector<Group> groups;  // sorted by start, non-overlapping
  uint32_t dim = 0;
};

// The checks every shard passes, read or not: rank below world_size, a dim
// of the tensor (for a planned tensor: 0, or 1 of a 2-D one) and a range
// within that dim. Valid non-empty shards go to `ranges` (by (start, length))
// and their dims to `dims`. The tensor's shape is in range.
void CheckShardSpecs(const SourceTensor& t, uint32_t world, bool planned, ErrorList* errs,
                     std::map<std::tuple<int64_t, int64_t>, std::vector<uint32_t>>* ranges, std::set<uint32_t>* dims) {
  const std::string who = "source tensor " + t.name;
  for (uint32_t i = 0; i < t.shards.size(); ++i) {
    const ShardSpec& s = t.shards[i];
    std::string sw = who + " shard " + std::to_string(i) + " (rank " + std::to_string(s.rank) + ")";
    if (s.rank >= world)
      errs->Add(sw + ": rank " + std::to_string(s.rank) + " is not below world_size " + std::to_string(world));
    if (planned && s.dim > 1) {
      errs->Add(sw + ": shard dim " + std::to_string(s.dim) + " is not supported (only 0 or 1)");
      continue;
    }
    if (planned && s.dim == 1 && t.shape.size() != 2) {
      errs->Add(sw + ": dim 1 sharding needs a 2-D tensor, this one is " + ShapeToString(t.shape));
      continue;
    }
    if (s.dim >= std::max<size_t>(t.shape.size(), 1)) {
      errs->Add(sw + ": shard dim " + std::to_string(s.dim) + " is not a dim of its shape " + ShapeToString(t.shape));
      continue;
    }
    int64_t extent = t.shape.empty() ? 1 : t.shape[s.dim];
    if (s.start < 0 || s.length < 0 || s.start > extent || s.length > extent - s.start) {
      errs->Add(sw + ": range " + ShardRange(s.start, s.length) + " along dim " + std::to_string(s.dim) +
                " is outside [0, " + std::to_string(extent) + ")");
      continue;
    }
    if (s.length == 0) continue;
    dims->insert(s.dim);
    (*ranges)[{s.start, s.length}].push_back(i);
  }
}

// Checks one planned tensor's shards; fills `info` when they are valid.
void CheckShards(const SourceTensor& t, uint32_t world, ErrorList* errs, TensorInfo* info) {
  const std::string who = "source tensor " + t.name;
  size_t before = errs->size();
  std::map<std::tuple<int64_t, int64_t>, std::vector<uint32_t>> ranges;
  std::set<uint32_t> dims;
  CheckShardSpecs(t, world, /*planned=*/true, errs, &ranges, &dims);
  if (dims.size() > 1) {
    errs->Add(who + ": shards split it along both dim 0 and dim 1");
    return;
  }
  if (errs->size() != before) return;
  uint32_t dim = dims.empty() ? 0 : *dims.begin();
  int64_t extent = t.shape.empty() ? 1 : t.shape[dim];
  if (NumElements(t.shape) == 0) return;
  if (ranges.empty()) {
    errs->Add(who + ": no shard holds any of its data (dim " + std::to_string(dim) + " extent " +
                    std::to_string(extent) + ")");
    return;
  }
  int64_t covered = 0;
  std::vector<Group> groups;
  for (const auto& [key, shards] : ranges) {
    auto [start, len] = key;
    if (start < covered) {
      errs->Add(who + ": shard ranges overlap along dim " + std::to_string(dim) + ": " +
                Range(groups.back().start, groups.back().end) + " and " + Range(start, start + len));
    } else if (start > covered) {
      errs->Add(who + ": no shard covers " + Range(covered, start) + " along dim " + std::to_string(dim));
    }
    covered = std::max(covered, start + len);
    groups.push_back({start, start + len, shards});
  }
  if (covered < extent)
    errs->Add(who + ": no shard covers " + Range(covered, extent) + " along dim " + std::to_string(dim));
  if (errs->size() != before) return;
  info->groups = std::move(groups);
  info->dim = dim;
}

}  // namespace

Status ValidateEngine(const EngineRankSpec& spec, const RankLayout& layout) {
  ErrorList errs;
  std::unordered_map<std::string, const ExpectedParam*> expected;
  for (const ExpectedParam& p : layout.params) expected[p.name] = &p;
  std::set<std::string> registered;
  std::vector<std::string> unfilled;
  for (const EngineParamSpec& p : spec.params) {
    if (!ShapeInRange(p.shape)) {
      errs.Add("parameter " + p.name + ": shape " + ShapeToString(p.shape) +
               " has a negative dim or more than 2^50 elements");
      continue;
    }
    if (!registered.insert(p.name).second) {
      errs.Add("parameter " + p.name + " is registered twice");
      continue;
    }
    auto it = expected.find(p.name);
    if (it == expected.end()) {
      unfilled.push_back(p.name);
      continue;
    }
    if (it->second->shape != p.shape)
      errs.Add("parameter " + p.name + ": engine registered shape " + ShapeToString(p.shape) + " but the " +
               layout.architecture + " layout gives " + ShapeToString(it->second->shape));
  }
  for (const ExpectedParam& p : layout.params)
    if (!registered.count(p.name))
      errs.Add("engine rank " + std::to_string(spec.tp_rank) + " did not register parameter " + p.name +
               " required by the " + layout.architecture + " layout");
  if (unfilled.empty() && errs.empty()) return Status::Ok();
  std::string msg;
  if (!unfilled.empty()) msg = "Some weights are not initialized: [" + JoinCapped(unfilled) + "]";
  if (!errs.empty()) msg += (msg.empty() ? "" : "\n") + errs.Join();
  return InvalidArgument(msg);
}

DType ChooseWireDType(DType source, const std::vector<DType>& destinations) {
  if (destinations.size() == 1 && DTypeSize(destinations[0]) < DTypeSize(source)) return destinations[0];
  return source;
}

std::vector<TensorDtypes> NegotiateDTypes(const SourceManifest& manifest, const std::vector<PlanEngine>& engines) {
  std::unordered_map<std::string, std::set<DType>> dests;  // source -> dtypes of the params it fills
  for (const PlanEngine& pe : engines) {
    std::unordered_map<std::string, const ExpectedParam*> expected;
    for (const ExpectedParam& p : pe.layout.params) expected.emplace(p.name, &p);
    for (const EngineParamSpec& ps : pe.spec.params) {
      auto it = expected.find(ps.name);
      if (it == expected.end()) continue;  // unfilled: ValidateEngine refuses it
      for (const Fill& f : it->second->fills)
        if (!f.source.empty() && f.rows > 0 && f.cols > 0) dests[f.source].insert(ps.dtype);
    }
  }
  std::vector<TensorDtypes> out(manifest.tensors.size());
  for (size_t t = 0; t < manifest.tensors.size(); ++t) {
    const SourceTensor& st = manifest.tensors[t];
    if (auto d = dests.find(st.name); d != dests.end()) out[t].destinations.assign(d->second.begin(), d->second.end());
    out[t].wire = ChooseWireDType(st.dtype, out[t].destinations);
  }
  return out;
}

Result<SyncPlan> BuildPlan(const SourceManifest& manifest, const std::vector<PlanEngine>& engines) {
  ErrorList errs;
  // Sources: declared ones (with shapes) and those some fill reads.
  std::unordered_map<std::string, std::pair<Shape, std::string>> declared;  // name -> (shape, architecture)
  std::map<std::string, std::string> needed_by;                     // source -> first param reading it
  std::vector<std::string> skips;  // distinct, in first-seen order
  std::set<std::string> skip_set;
  std::vector<std::unordered_map<std::string, const ExpectedParam*>> expected(engines.size());
  for (size_t e = 0; e < engines.size(); ++e) {
    const PlanEngine& pe = engines[e];
    Status st = ValidateEngine(pe.spec, pe.layout);
    if (!st.ok()) {
      std::string m = st.message();
      for (size_t a = 0, b; a <= m.size(); a = b + 1) {
        b = m.find('\n', a);
        if (b == std::string::npos) b = m.size();
        errs.Add("engine " + pe.engine_id + ": " + m.substr(a, b - a));
      }
    }
    for (const ExpectedSource& s : pe.layout.sources) declared.emplace(s.name, std::make_pair(s.shape, pe.layout.architecture));
    for (const ExpectedParam& p : pe.layout.params) {
      expected[e][p.name] = &p;
      for (const Fill& f : p.fills)
        if (!f.source.empty()) needed_by.emplace(f.source, p.name);
    }
    for (const std::string& s : pe.layout.skip_patterns)
      if (skip_set.insert(s).second) skips.push_back(s);
  }

  std::unordered_map<std::string, uint32_t> index;
  std::vector<TensorInfo> info(manifest.tensors.size());
  for (uint32_t t = 0; t < manifest.tensors.size(); ++t) {
    const SourceTensor& st = manifest.tensors[t];
    if (!index.emplace(st.name, t).second) {
      errs.Add("source tensor " + st.name + " appears twice in the manifest");
      continue;
    }
    auto d = declared.find(st.name);
    bool skipped = false;
    if (d == declared.end() && !needed_by.count(st.name)) {
      for (size_t i = 0; i < skips.size() && !skipped; ++i) skipped = GlobMatch(skips[i], st.name);
      if (!skipped) {
        errs.Add("unknown source tensor " + st.name + ": no engine layout declares it and no skip pattern matches it");
        continue;
      }
    }
    // Skipped tensors are never read, but pushes still map their shards and
    // size them from the shape: they pass the same sanity checks.
    if (static_cast<unsigned>(st.dtype) > static_cast<unsigned>(DType::kF16)) {
      errs.Add("source tensor " + st.name + ": unsupported dtype code " + std::to_string(static_cast<int>(st.dtype)) +
               " (f32, bf16 or f16)");
      continue;
    }
    if (!ShapeInRange(st.shape)) {
      errs.Add("source tensor " + st.name + ": shape " + ShapeToString(st.shape) +
               " has a negative dim or more than 2^50 elements");
      continue;
    }
    if (skipped) {
      std::map<std::tuple<int64_t, int64_t>, std::vector<uint32_t>> ranges;
      std::set<uint32_t> dims;
      CheckShardSpecs(st, manifest.world_size, /*planned=*/false, &errs, &ranges, &dims);
      continue;
    }
    if (d != declared.end() && d->second.first != st.shape) {
      errs.Add("source tensor " + st.name + " has shape " + ShapeToString(st.shape) + " but the " +
               d->second.second + " layout expects " + ShapeToString(d->second.first));
      continue;
    }
    CheckShards(st, manifest.world_size, &errs, &info[t]);
  }
  for (const auto& [src, param] : needed_by)
    if (!index.count(src)) errs.Add("missing source tensor " + src + " (needed by engine parameter " + param + ")");
  if (!errs.empty()) return InvalidArgument(errs.Join());

  SyncPlan plan;
  for (uint32_t e = 0; e < engines.size(); ++e) {
    const PlanEngine& pe = engines[e];
    for (uint32_t p = 0; p < pe.spec.params.size(); ++p) {
      const EngineParamSpec& ps = pe.spec.params[p];
      const ExpectedParam& ep = *expected[e].at(ps.name);
      const int64_t dst_ld = As2D(ps.shape).cols;
      const uint64_t dsize = DTypeSize(ps.dtype);
      for (const Fill& f : ep.fills) {
        if (f.rows <= 0 || f.cols <= 0) continue;
        const int64_t dst0 = f.dst_row0 * dst_ld + f.dst_col0;
        if (f.source.empty()) {
          plan.zeros.push_back({e, p, dst0, dst_ld, f.rows, f.cols});
          plan.bytes_written += static_cast<uint64_t>(f.rows * f.cols) * dsize;
          continue;
        }
        const uint32_t t = index.at(f.source);
        const SourceTensor& st = manifest.tensors[t];
        const View2D v = As2D(st.shape);
        // The fill's rectangle in the source's physical 2-D view.
        const int64_t pr0 = f.transpose ? f.src_col0 : f.src_row0;
        const int64_t pr1 = pr0 + (f.transpose ? f.cols : f.rows);
        const int64_t pc0 = f.transpose ? f.src_row0 : f.src_col0;
        const int64_t pc1 = pc0 + (f.transpose ? f.rows : f.cols);
        if (pr0 < 0 || pc0 < 0 || pr1 > v.rows || pc1 > v.cols) {
          errs.Add("engine " + pe.engine_id + " parameter " + ps.name + " reads rows " + Range(pr0, pr1) +
                         " cols " + Range(pc0, pc1) + " of source tensor " + st.name + ", which is only " +
                         ShapeToString(st.shape));
          continue;
        }
        // Groups are sorted and disjoint along the shard dim: visit only those
        // that can intersect the fill.
        const TensorInfo& ti = info[t];
        int64_t inner = 1;
        for (size_t i = 1; i + 1 < st.shape.size(); ++i) inner *= st.shape[i];
        const int64_t lo = ti.dim == 1 ? pc0 : pr0, hi = ti.dim == 1 ? pc1 : pr1;
        const int64_t unit = ti.dim == 1 ? 1 : inner;
        auto first = std::partition_point(ti.groups.begin(), ti.groups.end(),
                                          [&](const Group& g) { return g.end * unit <= lo; });
        for (auto git = first; git != ti.groups.end() && git->start * unit < hi; ++git) {
          const Group& g = *git;
          const uint32_t s = g.shards[e % g.shards.size()];
          const ShardRect sr = RectOf(st, st.shards[s]);
          const int64_t r0 = std::max(pr0, sr.r0), r1 = std::min(pr1, sr.r1);
          const int64_t c0 = std::max(pc0, sr.c0), c1 = std::min(pc1, sr.c1);
          if (r0 >= r1 || c0 >= c1) continue;
          PlannedCopy c;
          c.tensor = t;
          c.shard = s;
          c.engine = e;
          c.param = p;
          c.src_offset = (r0 - sr.r0) * sr.ld + (c0 - sr.c0);
          c.src_ld = sr.ld;
          c.dst_ld = dst_ld;
          c.transpose = f.transpose;
          if (!f.transpose) {
            c.dst_offset = (f.dst_row0 + r0 - pr0) * dst_ld + f.dst_col0 + (c0 - pc0);
            c.rows = r1 - r0;
            c.cols = c1 - c0;
          } else {
            // dst (i, j) <- physical (c0' + j, r0' + i): dst rows run along physical cols.
            c.dst_offset = (f.dst_row0 + c0 - pc0) * dst_ld + f.dst_col0 + (r0 - pr0);
            c.rows = c1 - c0;
            c.cols = r1 - r0;
          }
          plan.bytes_written += static_cast<uint64_t>(c.rows * c.cols) * dsize;
          plan.bytes_read += static_cast<uint64_t>(c.rows * c.cols) * DTypeSize(st.dtype);
          plan.copies.push_back(c);
        }
      }
    }
  }
  if (!errs.empty()) return InvalidArgument(errs.Join());
  // Group copies by (tensor, shard), keeping their order within a group.
  plan.shard_base.assign(manifest.tensors.size() + 1, 0);
  for (uint32_t t = 0; t < manifest.tensors.size(); ++t)
    plan.shard_base[t + 1] = plan.shard_base[t] + static_cast<uint32_t>(manifest.tensors[t].shards.size());
  std::vector<uint32_t>& begin = plan.shard_begin;
  begin.assign(plan.shard_base.back() + 1, 0);
  for (const PlannedCopy& c : plan.copies) ++begin[plan.shard_base[c.tensor] + c.shard + 1];
  for (size_t i = 1; i < begin.size(); ++i) begin[i] += begin[i - 1];
  std::vector<uint32_t> next(begin.begin(), begin.end() - 1);
  std::vector<PlannedCopy> sorted(plan.copies.size());
  for (const PlannedCopy& c : plan.copies) sorted[next[plan.shard_base[c.tensor] + c.shard]++] = c;
  plan.copies = std::move(sorted);
  return plan;
}

}  // namespace ws
