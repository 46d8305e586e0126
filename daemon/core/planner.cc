#include "daemon/core/planner.h"

#include <algorithm>
#include <bit>
#include <functional>
#include <map>
#include <set>
#include <string_view>
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

// `v` is the tensor's 2-D view and `inner` the product of its dims between
// the first and the last.
ShardRect RectOf(View2D v, int64_t inner, const ShardSpec& s) {
  if (s.dim == 1) return {0, v.rows, s.start, s.start + s.length, s.length};
  return {s.start * inner, (s.start + s.length) * inner, 0, v.cols, v.cols};
}

// Replica groups of one tensor: shards with identical (dim, start, length).
// Flat: the groups of all tensors in one vector, their shards in another.
struct Group {
  int64_t start, end;      // along the shard dim
  uint32_t first, count;   // shards: Groups::shards[first, first + count), in shard order
};

struct TensorInfo {
  uint32_t group_begin = 0, group_end = 0;  // [begin, end) in Groups::groups, sorted by start, disjoint
  uint32_t dim = 0;
  View2D view;        // As2D(shape)
  int64_t inner = 1;  // product of the dims between the first and the last
};

struct Groups {
  std::vector<Group> groups;
  std::vector<uint32_t> shards;
};

// A valid non-empty shard: its range and index.
struct RangeItem {
  int64_t start, length;
  uint32_t shard;
  bool operator<(const RangeItem& o) const {
    return std::tie(start, length, shard) < std::tie(o.start, o.length, o.shard);
  }
};

// The checks every shard passes, read or not: rank below world_size, a dim
// of the tensor (for a planned tensor: 0, or 1 of a 2-D one) and a range
// within that dim. Valid non-empty shards go to `ranges` and their dims to
// `dims` (bit d for dim d < 2, bit 2 for any other). The tensor's shape is in
// range. Messages are built only for errors.
void CheckShardSpecs(const SourceTensor& t, uint32_t world, bool planned, ErrorList* errs,
                     std::vector<RangeItem>* ranges, unsigned* dims) {
  auto sw = [&](uint32_t i) {
    return "source tensor " + t.name + " shard " + std::to_string(i) + " (rank " + std::to_string(t.shards[i].rank) +
           ")";
  };
  for (uint32_t i = 0; i < t.shards.size(); ++i) {
    const ShardSpec& s = t.shards[i];
    if (s.rank >= world)
      errs->Add(sw(i) + ": rank " + std::to_string(s.rank) + " is not below world_size " + std::to_string(world));
    if (planned && s.dim > 1) {
      errs->Add(sw(i) + ": shard dim " + std::to_string(s.dim) + " is not supported (only 0 or 1)");
      continue;
    }
    if (planned && s.dim == 1 && t.shape.size() != 2) {
      errs->Add(sw(i) + ": dim 1 sharding needs a 2-D tensor, this one is " + ShapeToString(t.shape));
      continue;
    }
    if (s.dim >= std::max<size_t>(t.shape.size(), 1)) {
      errs->Add(sw(i) + ": shard dim " + std::to_string(s.dim) + " is not a dim of its shape " +
                ShapeToString(t.shape));
      continue;
    }
    int64_t extent = t.shape.empty() ? 1 : t.shape[s.dim];
    if (s.start < 0 || s.length < 0 || s.start > extent || s.length > extent - s.start) {
      errs->Add(sw(i) + ": range " + ShardRange(s.start, s.length) + " along dim " + std::to_string(s.dim) +
                " is outside [0, " + std::to_string(extent) + ")");
      continue;
    }
    if (s.length == 0) continue;
    *dims |= s.dim < 2 ? 1u << s.dim : 4u;
    ranges->push_back({s.start, s.length, i});
  }
}

// Checks one planned tensor's shards; appends its groups to `out` and fills
// `info` when they are valid. `ranges` is scratch space.
void CheckShards(const SourceTensor& t, uint32_t world, ErrorList* errs, std::vector<RangeItem>* ranges, Groups* out,
                 TensorInfo* info) {
  auto who = [&] { return "source tensor " + t.name; };
  info->view = As2D(t.shape);
  for (size_t i = 1; i + 1 < t.shape.size(); ++i) info->inner *= t.shape[i];
  size_t before = errs->size();
  ranges->clear();
  unsigned dims = 0;
  CheckShardSpecs(t, world, /*planned=*/true, errs, ranges, &dims);
  if (std::popcount(dims) > 1) {
    errs->Add(who() + ": shards split it along both dim 0 and dim 1");
    return;
  }
  if (errs->size() != before) return;
  uint32_t dim = dims == 2 ? 1 : 0;
  int64_t extent = t.shape.empty() ? 1 : t.shape[dim];
  if (NumElements(t.shape) == 0) return;
  if (ranges->empty()) {
    errs->Add(who() + ": no shard holds any of its data (dim " + std::to_string(dim) + " extent " +
              std::to_string(extent) + ")");
    return;
  }
  std::sort(ranges->begin(), ranges->end());
  const size_t g0 = out->groups.size(), s0 = out->shards.size();
  int64_t covered = 0;
  for (size_t i = 0; i < ranges->size();) {
    const int64_t start = (*ranges)[i].start, len = (*ranges)[i].length;
    if (start < covered) {
      const Group& prev = out->groups.back();
      errs->Add(who() + ": shard ranges overlap along dim " + std::to_string(dim) + ": " +
                Range(prev.start, prev.end) + " and " + Range(start, start + len));
    } else if (start > covered) {
      errs->Add(who() + ": no shard covers " + Range(covered, start) + " along dim " + std::to_string(dim));
    }
    covered = std::max(covered, start + len);
    Group g{start, start + len, static_cast<uint32_t>(out->shards.size()), 0};
    for (; i < ranges->size() && (*ranges)[i].start == start && (*ranges)[i].length == len; ++i) {
      out->shards.push_back((*ranges)[i].shard);
      ++g.count;
    }
    out->groups.push_back(g);
  }
  if (covered < extent)
    errs->Add(who() + ": no shard covers " + Range(covered, extent) + " along dim " + std::to_string(dim));
  if (errs->size() != before) {
    out->groups.resize(g0);
    out->shards.resize(s0);
    return;
  }
  info->group_begin = static_cast<uint32_t>(g0);
  info->group_end = static_cast<uint32_t>(out->groups.size());
  info->dim = dim;
}

// Manifest tensor name -> its first position (open addressing over the
// names, which the manifest keeps).
class NameIndex {
 public:
  static constexpr uint32_t kNone = UINT32_MAX;

  explicit NameIndex(const std::vector<SourceTensor>& tensors) : tensors_(tensors) {
    size_t cap = 16;
    while (cap < 2 * tensors.size()) cap <<= 1;
    slots_.assign(cap, Slot{kNone, 0});
    mask_ = cap - 1;
  }
  // Adds tensor t under its name; false when the name is there already.
  bool Insert(uint32_t t) {
    const std::string& name = tensors_[t].name;
    const size_t h = std::hash<std::string_view>{}(name);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.tensor == kNone) {
        s = Slot{t, static_cast<uint32_t>(h)};
        return true;
      }
      if (s.hash == static_cast<uint32_t>(h) && tensors_[s.tensor].name == name) return false;
    }
  }
  uint32_t Find(std::string_view name) const {
    const size_t h = std::hash<std::string_view>{}(name);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.tensor == kNone) return kNone;
      if (s.hash == static_cast<uint32_t>(h) && tensors_[s.tensor].name == name) return s.tensor;
    }
  }

 private:
  struct Slot {
    uint32_t tensor, hash;
  };
  const std::vector<SourceTensor>& tensors_;
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

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

std::vector<PlanEngineView> ViewsOf(const std::vector<PlanEngine>& engines) {
  std::vector<PlanEngineView> v;
  v.reserve(engines.size());
  for (const PlanEngine& e : engines) v.push_back({&e.engine_id, &e.spec, &e.layout});
  return v;
}

std::vector<TensorDtypes> NegotiateDTypes(const SourceManifest& manifest, const std::vector<PlanEngine>& engines) {
  return NegotiateDTypes(manifest, ViewsOf(engines));
}

std::vector<TensorDtypes> NegotiateDTypes(const SourceManifest& manifest, const std::vector<PlanEngineView>& engines) {
  NameIndex index(manifest.tensors);
  for (uint32_t t = 0; t < manifest.tensors.size(); ++t) index.Insert(t);
  std::vector<uint8_t> dests(manifest.tensors.size(), 0);  // per tensor: bit d for each DType d it is written in
  for (const PlanEngineView& pe : engines) {
    std::unordered_map<std::string_view, const ExpectedParam*> expected;
    expected.reserve(pe.layout->params.size());
    for (const ExpectedParam& p : pe.layout->params) expected.emplace(p.name, &p);
    for (const EngineParamSpec& ps : pe.spec->params) {
      auto it = expected.find(ps.name);
      if (it == expected.end()) continue;  // unfilled: ValidateEngine refuses it
      for (const Fill& f : it->second->fills) {
        if (f.source.empty() || f.rows <= 0 || f.cols <= 0) continue;
        if (uint32_t t = index.Find(f.source); t != NameIndex::kNone)
          dests[t] |= static_cast<uint8_t>(1u << static_cast<unsigned>(ps.dtype));
      }
    }
  }
  std::vector<TensorDtypes> out(manifest.tensors.size());
  for (size_t t = 0; t < manifest.tensors.size(); ++t) {
    // A repeated name gets the dtypes of its first position's name, as every position reads them.
    const uint8_t d = dests[index.Find(manifest.tensors[t].name)];
    for (unsigned k = 0; k < 8; ++k)
      if (d & (1u << k)) out[t].destinations.push_back(static_cast<DType>(k));
    out[t].wire = ChooseWireDType(manifest.tensors[t].dtype, out[t].destinations);
  }
  return out;
}

Result<SyncPlan> BuildPlan(const SourceManifest& manifest, const std::vector<PlanEngine>& engines) {
  return BuildPlan(manifest, ViewsOf(engines));
}

Result<SyncPlan> BuildPlan(const SourceManifest& manifest, const std::vector<PlanEngineView>& engines,
                           const std::vector<DType>* wire) {
  const std::vector<SourceTensor>& tensors = manifest.tensors;
  const uint32_t n_tensors = static_cast<uint32_t>(tensors.size());
  auto dtype_of = [&](uint32_t t) { return wire != nullptr ? (*wire)[t] : tensors[t].dtype; };
  ErrorList errs;
  NameIndex index(tensors);
  std::vector<uint8_t> duplicate(n_tensors, 0);
  for (uint32_t t = 0; t < n_tensors; ++t) duplicate[t] = !index.Insert(t);

  // Declared sources (with shapes): per manifest tensor, the first engine
  // declaring it. Engines of one config declare the same list: each distinct
  // list is looked up once.
  struct Declared {
    const Shape* shape = nullptr;
    const std::string* architecture = nullptr;
  };
  std::vector<Declared> declared(n_tensors);
  std::vector<const SourceList*> seen_sources;
  std::vector<std::string> skips;  // distinct, in first-seen order
  std::set<std::string> skip_set;
  // Per engine: param name -> expected param, and per expected param (by its
  // index in layout.params) the position of its first fill in `fill_tensor`.
  std::vector<std::unordered_map<std::string_view, const ExpectedParam*>> expected(engines.size());
  std::vector<std::vector<uint32_t>> fill_base(engines.size());
  std::vector<uint32_t> fill_tensor;          // per fill of every engine: the manifest tensor it reads, or kNone
  std::vector<uint8_t> needed(n_tensors, 0);  // some fill reads it
  std::unordered_map<std::string_view, std::string_view> missing;  // source not in the manifest -> first param reading it
  for (size_t e = 0; e < engines.size(); ++e) {
    const PlanEngineView& pe = engines[e];
    const RankLayout& layout = *pe.layout;
    Status st = ValidateEngine(*pe.spec, layout);
    if (!st.ok()) {
      std::string m = st.message();
      for (size_t a = 0, b; a <= m.size(); a = b + 1) {
        b = m.find('\n', a);
        if (b == std::string::npos) b = m.size();
        errs.Add("engine " + *pe.engine_id + ": " + m.substr(a, b - a));
      }
    }
    if (std::none_of(seen_sources.begin(), seen_sources.end(),
                     [&](const SourceList* s) { return *s == layout.sources; })) {
      seen_sources.push_back(&layout.sources);
      for (const ExpectedSource& s : layout.sources)
        if (uint32_t t = index.Find(s.name); t != NameIndex::kNone && declared[t].shape == nullptr)
          declared[t] = {&s.shape, &layout.architecture};
    }
    expected[e].reserve(layout.params.size());
    fill_base[e].resize(layout.params.size());
    for (size_t i = 0; i < layout.params.size(); ++i) {
      const ExpectedParam& p = layout.params[i];
      expected[e][p.name] = &p;
      fill_base[e][i] = static_cast<uint32_t>(fill_tensor.size());
      for (const Fill& f : p.fills) {
        uint32_t t = NameIndex::kNone;
        if (!f.source.empty()) {
          t = index.Find(f.source);
          if (t != NameIndex::kNone)
            needed[t] = 1;
          else
            missing.try_emplace(f.source, p.name);
        }
        fill_tensor.push_back(t);
      }
    }
    for (const std::string& s : layout.skip_patterns)
      if (skip_set.insert(s).second) skips.push_back(s);
  }

  std::vector<TensorInfo> info(n_tensors);
  Groups groups;
  groups.groups.reserve(n_tensors);
  std::vector<RangeItem> ranges;  // scratch
  for (uint32_t t = 0; t < n_tensors; ++t) {
    const SourceTensor& st = tensors[t];
    if (duplicate[t]) {
      errs.Add("source tensor " + st.name + " appears twice in the manifest");
      continue;
    }
    const Declared& d = declared[t];
    bool skipped = false;
    if (d.shape == nullptr && !needed[t]) {
      for (size_t i = 0; i < skips.size() && !skipped; ++i) skipped = GlobMatch(skips[i], st.name);
      if (!skipped) {
        errs.Add("unknown source tensor " + st.name + ": no engine layout declares it and no skip pattern matches it");
        continue;
      }
    }
    // Skipped tensors are never read, but pushes still map their shards and
    // size them from the shape: they pass the same sanity checks.
    const DType dt = dtype_of(t);
    if (static_cast<unsigned>(dt) > static_cast<unsigned>(DType::kF16)) {
      errs.Add("source tensor " + st.name + ": unsupported dtype code " + std::to_string(static_cast<int>(dt)) +
               " (f32, bf16 or f16)");
      continue;
    }
    if (!ShapeInRange(st.shape)) {
      errs.Add("source tensor " + st.name + ": shape " + ShapeToString(st.shape) +
               " has a negative dim or more than 2^50 elements");
      continue;
    }
    if (skipped) {
      ranges.clear();
      unsigned dims = 0;
      CheckShardSpecs(st, manifest.world_size, /*planned=*/false, &errs, &ranges, &dims);
      continue;
    }
    if (d.shape != nullptr && *d.shape != st.shape) {
      errs.Add("source tensor " + st.name + " has shape " + ShapeToString(st.shape) + " but the " + *d.architecture +
               " layout expects " + ShapeToString(*d.shape));
      continue;
    }
    CheckShards(st, manifest.world_size, &errs, &ranges, &groups, &info[t]);
  }
  if (!missing.empty()) {
    std::vector<std::pair<std::string_view, std::string_view>> m(missing.begin(), missing.end());
    std::sort(m.begin(), m.end());
    for (const auto& [src, param] : m)
      errs.Add("missing source tensor " + std::string(src) + " (needed by engine parameter " + std::string(param) + ")");
  }
  if (!errs.empty()) return InvalidArgument(errs.Join());

  SyncPlan plan;
  // Flat shard ids: shard s of tensor t is shard_base[t] + s.
  plan.shard_base.assign(n_tensors + 1, 0);
  for (uint32_t t = 0; t < n_tensors; ++t)
    plan.shard_base[t + 1] = plan.shard_base[t] + static_cast<uint32_t>(tensors[t].shards.size());
  std::vector<uint32_t>& begin = plan.shard_begin;
  begin.assign(plan.shard_base.back() + 1, 0);

  // Two passes over the same copies: the first checks the fills and counts
  // the copies of each shard, the second writes each copy at its place in
  // (tensor, shard) order, in the order generated within a shard.
  std::vector<uint32_t> next;
  for (int pass = 0; pass < 2; ++pass) {
    for (uint32_t e = 0; e < engines.size(); ++e) {
      const PlanEngineView& pe = engines[e];
      const RankLayout& layout = *pe.layout;
      for (uint32_t p = 0; p < pe.spec->params.size(); ++p) {
        const EngineParamSpec& ps = pe.spec->params[p];
        const ExpectedParam& ep = *expected[e].at(ps.name);
        const uint32_t* ft = fill_tensor.data() + fill_base[e][&ep - layout.params.data()];
        const int64_t dst_ld = As2D(ps.shape).cols;
        const uint64_t dsize = DTypeSize(ps.dtype);
        for (size_t k = 0; k < ep.fills.size(); ++k) {
          const Fill& f = ep.fills[k];
          if (f.rows <= 0 || f.cols <= 0) continue;
          const int64_t dst0 = f.dst_row0 * dst_ld + f.dst_col0;
          if (f.source.empty()) {
            if (pass == 0) {
              plan.zeros.push_back({e, p, dst0, dst_ld, f.rows, f.cols});
              plan.bytes_written += static_cast<uint64_t>(f.rows * f.cols) * dsize;
            }
            continue;
          }
          const uint32_t t = ft[k];
          const SourceTensor& st = tensors[t];
          const TensorInfo& ti = info[t];
          const View2D v = ti.view;
          // The fill's rectangle in the source's physical 2-D view.
          const int64_t pr0 = f.transpose ? f.src_col0 : f.src_row0;
          const int64_t pr1 = pr0 + (f.transpose ? f.cols : f.rows);
          const int64_t pc0 = f.transpose ? f.src_row0 : f.src_col0;
          const int64_t pc1 = pc0 + (f.transpose ? f.rows : f.cols);
          if (pr0 < 0 || pc0 < 0 || pr1 > v.rows || pc1 > v.cols) {
            if (pass == 0)
              errs.Add("engine " + *pe.engine_id + " parameter " + ps.name + " reads rows " + Range(pr0, pr1) +
                       " cols " + Range(pc0, pc1) + " of source tensor " + st.name + ", which is only " +
                       ShapeToString(st.shape));
            continue;
          }
          // Groups are sorted and disjoint along the shard dim: visit only those
          // that can intersect the fill.
          const int64_t inner = ti.inner;
          const int64_t lo = ti.dim == 1 ? pc0 : pr0, hi = ti.dim == 1 ? pc1 : pr1;
          const int64_t unit = ti.dim == 1 ? 1 : inner;
          const Group* gb = groups.groups.data() + ti.group_begin;
          const Group* ge = groups.groups.data() + ti.group_end;
          const Group* first = std::partition_point(gb, ge, [&](const Group& g) { return g.end * unit <= lo; });
          for (const Group* g = first; g != ge && g->start * unit < hi; ++g) {
            const uint32_t s = groups.shards[g->first + e % g->count];
            const ShardRect sr = RectOf(v, inner, st.shards[s]);
            const int64_t r0 = std::max(pr0, sr.r0), r1 = std::min(pr1, sr.r1);
            const int64_t c0 = std::max(pc0, sr.c0), c1 = std::min(pc1, sr.c1);
            if (r0 >= r1 || c0 >= c1) continue;
            const uint32_t flat = plan.shard_base[t] + s;
            if (pass == 0) {
              ++begin[flat + 1];
              continue;
            }
            PlannedCopy& c = plan.copies[next[flat]++];
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
            plan.bytes_read += static_cast<uint64_t>(c.rows * c.cols) * DTypeSize(dtype_of(t));
          }
        }
      }
    }
    if (pass == 0) {
      if (!errs.empty()) return InvalidArgument(errs.Join());
      for (size_t i = 1; i < begin.size(); ++i) begin[i] += begin[i - 1];
      plan.copies.resize(begin.back());
      next.assign(begin.begin(), begin.end() - 1);
    }
  }
  return plan;
}

}  // namespace ws
