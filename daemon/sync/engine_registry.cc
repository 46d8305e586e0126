#include "daemon/sync/engine_registry.h"

#include <algorithm>
#include <optional>
#include <set>
#include <tuple>

#include <spdlog/spdlog.h>

#include "daemon/core/json_limits.h"
#include "daemon/core/planner.h"

namespace ws::server {

namespace {

std::string JoinRanks(const std::vector<uint32_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}

}  // namespace

std::string Engine::Describe() const {
  std::string s = "engine " + id + " (" + spec.model + " replica " + std::to_string(spec.replica_id) +
                  " tp_rank " + std::to_string(spec.tp_rank);
  if (!label.empty()) s += ", " + label;
  if (!node.empty()) s += ", on node " + node;
  return s + ")";
}

std::string DescribeRank(const EngineRankSpec& spec) {
  return "model " + spec.model + " replica " + std::to_string(spec.replica_id) + " tp_rank " +
         std::to_string(spec.tp_rank);
}

uint64_t ElemBytes(uint64_t elems, DType dt) {
  uint64_t b;
  return __builtin_mul_overflow(elems, static_cast<uint64_t>(DTypeSize(dt)), &b) ? UINT64_MAX : b;
}

// ---------------------------------------------------------------- stateless steps

Result<nlohmann::json> CheckEngineSpec(const EngineRankSpec& spec, size_t memory_refs, const Limits& limits) {
  if (spec.model.empty()) return InvalidArgument("model is empty");
  if (spec.architecture.empty()) return InvalidArgument("architecture is empty");
  if (spec.tp_size == 0) return InvalidArgument("tp_size must be at least 1");
  if (spec.tp_rank >= spec.tp_size)
    return InvalidArgument("tp_rank " + std::to_string(spec.tp_rank) + " is not below tp_size " +
                           std::to_string(spec.tp_size));
  if (spec.params.empty()) return InvalidArgument("no params registered");
  if (memory_refs != spec.params.size())
    return InvalidArgument(std::to_string(spec.params.size()) + " params but " + std::to_string(memory_refs) +
                           " memory references");
  WS_ASSIGN_OR_RETURN(nlohmann::json cfg, ParseJsonLimited(spec.hf_config_json, "hf_config_json",
                                                           limits.max_json_depth, limits.max_json_bytes));
  if (!cfg.is_object()) return InvalidArgument("hf_config_json is not a JSON object");
  std::set<std::string> names;
  for (const auto& p : spec.params)
    if (!names.insert(p.name).second) return InvalidArgument("param " + p.name + " is registered twice");
  return cfg;
}

Result<RankLayout> ResolveEngineLayout(const LayoutRegistry& layouts, const EngineRankSpec& spec,
                                       const Limits& limits) {
  const std::string who = DescribeRank(spec);
  ResolveOptions ro;
  ro.tp_size = spec.tp_size;
  ro.tp_rank = spec.tp_rank;
  ro.engine_options = spec.options;
  ro.limits = limits;
  size_t n_explicit = 0;
  for (const auto& p : spec.params) n_explicit += p.mapping_json.empty() ? 0 : 1;
  RankLayout layout;
  if (n_explicit < spec.params.size()) {
    auto r = layouts.Resolve(spec.architecture, spec.hf_config_json, ro);
    if (!r.ok()) return r.status().WithContext(who);
    layout = std::move(r).value();
  } else {
    // Every param maps itself; a rule file for the architecture, if any,
    // still contributes its declared sources and skip patterns.
    auto r = layouts.Resolve(spec.architecture, spec.hf_config_json, ro);
    if (r.ok()) {
      layout.sources = std::move(r->sources);
      layout.skip_patterns = std::move(r->skip_patterns);
    }
    layout.architecture = spec.architecture;
    layout.rule_file = "(explicit mappings)";
  }
  std::vector<ExpectedSource> explicit_sources;
  for (const auto& p : spec.params) {
    if (p.mapping_json.empty()) continue;
    auto r = layouts.ResolveExplicit(p.name, p.mapping_json, spec.hf_config_json, ro, &explicit_sources);
    if (!r.ok()) return r.status().WithContext(who + ": param " + p.name + ": mapping_json");
    auto same = [&](const ExpectedParam& e) { return e.name == p.name; };
    std::erase_if(layout.params, same);
    layout.params.push_back(std::move(r).value());
  }
  for (auto& src : explicit_sources) {
    auto it = std::find_if(layout.sources.begin(), layout.sources.end(),
                           [&](const ExpectedSource& e) { return e.name == src.name; });
    if (it == layout.sources.end())
      layout.sources.push_back(std::move(src));
    else if (it->shape != src.shape)
      return InvalidArgument(who + ": source " + src.name + " is declared with shapes " + ShapeToString(it->shape) +
                             " and " + ShapeToString(src.shape));
  }
  if (Status st = ValidateEngine(spec, layout); !st.ok()) return st.WithContext(who);
  return layout;
}

Result<std::vector<std::shared_ptr<Mapping>>> MapEngineParams(MemoryDomain& domain, const EngineRankSpec& spec,
                                                              const std::vector<MemoryRef>& memory,
                                                              const Peer& caller, uint64_t* bytes) {
  const std::string who = DescribeRank(spec);
  const Accessor access = caller.ToAccessor();
  std::vector<std::shared_ptr<Mapping>> maps;
  *bytes = 0;
  for (size_t i = 0; i < spec.params.size(); ++i) {
    const auto& p = spec.params[i];
    uint64_t want = ElemBytes(static_cast<uint64_t>(NumElements(p.shape)), p.dtype);
    if (memory[i].offset % DTypeSize(p.dtype) != 0)
      return InvalidArgument(who + ": param " + p.name + ": memory offset " + std::to_string(memory[i].offset) +
                             " is not a multiple of the " + DTypeName(p.dtype) + " element size " +
                             std::to_string(DTypeSize(p.dtype)));
    if (!p.tied_to.empty() && std::none_of(spec.params.begin(), spec.params.end(),
                                           [&](const EngineParamSpec& q) { return q.name == p.tied_to; }))
      return InvalidArgument(who + ": param " + p.name + " is tied_to " + p.tied_to +
                             ", which this rank does not register");
    if (memory[i].length != want)
      return InvalidArgument(who + ": param " + p.name + ": memory length " + std::to_string(memory[i].length) +
                             " bytes does not match shape " + ShapeToString(p.shape) + " " + DTypeName(p.dtype) +
                             " (" + std::to_string(want) + " bytes)");
    auto m = domain.Map(memory[i], "param " + p.name, access);
    if (!m.ok()) return m.status().WithContext(who);
    if (!m.value()->writable())
      return InvalidArgument(who + ": param " + p.name + ": memory " + memory[i].ToString() + " is read-only for " +
                             caller.Describe());
    // Allocate the backing pages now: a full /dev/shm is a refusal naming
    // the param, not a fault in the middle of a sync.
    if (Status st = m.value()->Reserve(); !st.ok()) return st.WithContext(who + ": param " + p.name);
    maps.push_back(std::move(m).value());
    *bytes += want;
  }
  return maps;
}

// ---------------------------------------------------------------- registry

EngineRegistry::EngineRegistry(RegistryOptions opts, std::string boot_id)
    : opts_(std::move(opts)), boot_id_(std::move(boot_id)) {}

Status EngineRegistry::Admit(const Peer& caller, const std::string& model) const {
  auto it = models_.find(model);
  if (it != models_.end() && !caller.Owns(it->second.owner))
    return PermissionDenied("model " + model + " belongs to " + it->second.owner + "; " + caller.Describe() + " (" +
                            caller.principal + ") may not register engines for it");
  if (it != models_.end() && it->second.busy_sync)
    return FailedPrecondition("model " + model + " has sync " + std::to_string(it->second.busy_sync) +
                              " in flight; register after it ends");
  auto n = engines_by_owner_.find(caller.principal);
  if (n != engines_by_owner_.end() && n->second >= opts_.max_engines_per_peer)
    return ResourceExhausted(caller.Describe() + " (" + caller.principal + ") already has " +
                             std::to_string(n->second) + " engine ranks registered (limit max_engines_per_peer = " +
                             std::to_string(opts_.max_engines_per_peer) + ")");
  return Status::Ok();
}

Status EngineRegistry::CheckModelCompatible(const Model& m, const EngineRankSpec& spec) const {
  std::string who = "model " + m.name + ": replica " + std::to_string(spec.replica_id) + " tp_rank " +
                    std::to_string(spec.tp_rank);
  if (spec.architecture != m.architecture)
    return FailedPrecondition(who + " registers architecture " + spec.architecture +
                              " but the model's other engines use " + m.architecture);
  if (spec.tp_size != m.tp_size)
    return FailedPrecondition(who + " registers tp_size " + std::to_string(spec.tp_size) +
                              " but the model's other engines use tp_size " + std::to_string(m.tp_size));
  if (spec.options != m.options)
    return FailedPrecondition(who + " registers engine options that differ from the model's other engines");
  auto cfg = ParseJsonLimited(spec.hf_config_json, "hf_config_json", opts_.limits.max_json_depth,
                              opts_.limits.max_json_bytes);
  if (!cfg.ok() || *cfg != m.config)
    return FailedPrecondition(who + " registers an hf_config_json that differs from the model's other engines");
  return Status::Ok();
}

namespace {

// Orders extents by memory object, then start.
auto ExtentKey(const MemoryExtent& x) { return std::tuple(static_cast<int>(x.kind), x.object_a, x.object_b, x.begin); }
auto ObjectKey(const MemoryExtent& x) { return std::tuple(static_cast<int>(x.kind), x.object_a, x.object_b); }

std::vector<uint32_t> SortExtents(const std::vector<MemoryExtent>& extents) {
  std::vector<uint32_t> order(extents.size());
  for (uint32_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return std::tuple(ExtentKey(extents[a]), extents[a].end) < std::tuple(ExtentKey(extents[b]), extents[b].end);
  });
  return order;
}

// A pair (i in a, j in b) of overlapping extents, walking both sorted orders
// once: O(|a| + |b|). An extent that ends before the other list's current
// one begins cannot overlap any later one there.
std::optional<std::pair<uint32_t, uint32_t>> FirstOverlap(const Engine& a, const Engine& b) {
  size_t i = 0, j = 0;
  while (i < a.extent_order.size() && j < b.extent_order.size()) {
    const MemoryExtent& x = a.extents[a.extent_order[i]];
    const MemoryExtent& y = b.extents[b.extent_order[j]];
    if (x.begin >= x.end) {
      ++i;
    } else if (y.begin >= y.end) {
      ++j;
    } else if (ObjectKey(x) != ObjectKey(y)) {
      (ObjectKey(x) < ObjectKey(y) ? i : j)++;
    } else if (x.Overlaps(y)) {
      return std::pair(a.extent_order[i], b.extent_order[j]);
    } else {
      (x.end <= y.begin ? i : j)++;
    }
  }
  return std::nullopt;
}

}  // namespace

Status EngineRegistry::CheckIsolation(const Engine& e, const std::string& who) const {
  // Within the registration: in (object, start) order, compare each extent
  // with the furthest-reaching earlier one of the same object.
  const std::vector<uint32_t>& order = e.extent_order;
  auto same_object = [](const MemoryExtent& a, const MemoryExtent& b) { return ObjectKey(a) == ObjectKey(b); };
  for (size_t k = 1, reach = order.empty() ? 0 : order[0]; k < order.size(); ++k) {
    const size_t i = order[k];
    const MemoryExtent& x = e.extents[i];
    const MemoryExtent& r = e.extents[reach];
    if (x.Overlaps(r)) {
      const auto& pi = e.spec.params[i];
      const auto& pr = e.spec.params[reach];
      const bool tied = x.begin == r.begin && x.end == r.end && pi.dtype == pr.dtype && pi.shape == pr.shape &&
                        (pi.tied_to == pr.name || pr.tied_to == pi.name);
      if (!tied)
        return InvalidArgument(who + ": param " + pi.name + " and param " + pr.name + " overlap in memory (" +
                               x.ToString() + " and " + r.ToString() +
                               "); parameters may share memory only as a declared tied copy (tied_to) of the same range");
    }
    if (!same_object(x, r) || x.end > r.end) reach = i;
  }
  // Against every other registration: one merge walk each.
  for (const auto& [id, other] : engines_)
    if (auto hit = FirstOverlap(e, *other)) {
      const auto [i, j] = *hit;
      return InvalidArgument(who + ": param " + e.spec.params[i].name + " " + e.extents[i].ToString() +
                             " overlaps the memory of " + other->Describe() + " param " +
                             other->spec.params[j].name + " " + other->extents[j].ToString() +
                             "; engines may not share parameter memory");
    }
  return Status::Ok();
}

Result<std::string> EngineRegistry::Add(const Peer& caller, std::shared_ptr<Engine> e, EngineRankSpec spec,
                                        nlohmann::json config) {
  const std::string who = DescribeRank(spec);
  if (e->extent_order.size() != e->extents.size()) e->extent_order = SortExtents(e->extents);
  WS_RETURN_IF_ERROR(CheckIsolation(*e, who));
  auto it = models_.find(spec.model);
  if (it != models_.end()) {
    WS_RETURN_IF_ERROR(CheckModelCompatible(it->second, spec));
    for (const auto& [id, other] : engines_)
      if (other->spec.model == spec.model && other->spec.replica_id == spec.replica_id &&
          other->spec.tp_rank == spec.tp_rank)
        return AlreadyExists(who + " is already registered as " + other->Describe());
  } else {
    Model m;
    m.name = spec.model;
    m.owner = caller.principal;
    m.architecture = spec.architecture;
    m.config = std::move(config);
    m.tp_size = spec.tp_size;
    m.options = spec.options;
    it = models_.emplace(spec.model, std::move(m)).first;
  }
  // The ranks of one config declare the same source list (every source any
  // rank may read: tens of thousands for a MoE model): keep one copy of it.
  for (const auto& [id, other] : engines_) {
    if (other->spec.model != spec.model || other->layout.sources.size() != e->layout.sources.size()) continue;
    if (other->layout.sources == e->layout.sources) {
      e->layout.sources.ShareWith(other->layout.sources);
      break;
    }
  }
  it->second.engine_count++;
  engines_by_owner_[caller.principal]++;
  e->id = "eng-" + boot_id_ + "-" + std::to_string(next_engine_++);
  e->owner = caller.principal;
  e->spec = std::move(spec);
  engines_[e->id] = e;
  return e->id;
}

Result<std::shared_ptr<Engine>> EngineRegistry::FindOwned(const Peer& caller, const std::string& engine_id,
                                                          const char* action) const {
  auto it = engines_.find(engine_id);
  if (it == engines_.end()) return NotFound("engine " + engine_id + " is not registered");
  if (!caller.Owns(it->second->owner))
    return PermissionDenied(it->second->Describe() + " belongs to " + it->second->owner + "; " + caller.Describe() +
                            " (" + caller.principal + ") may not " + action + " it");
  return it->second;
}

void EngineRegistry::Remove(const Engine& e) {
  if (auto n = engines_by_owner_.find(e.owner); n != engines_by_owner_.end() && --n->second == 0)
    engines_by_owner_.erase(n);
  if (auto mit = models_.find(e.spec.model); mit != models_.end()) mit->second.engine_count--;
  engines_.erase(e.id);
}

Model* EngineRegistry::FindModel(const std::string& name) {
  auto it = models_.find(name);
  return it == models_.end() ? nullptr : &it->second;
}

void EngineRegistry::ReleaseModel(const std::string& name, uint64_t sync_id) {
  auto it = models_.find(name);
  if (it == models_.end() || it->second.busy_sync != sync_id) return;
  it->second.busy_sync = 0;
  if (it->second.engine_count == 0) models_.erase(it);
}

Result<std::vector<std::shared_ptr<Engine>>> EngineRegistry::CompleteEngines(const Model& m) const {
  std::vector<std::shared_ptr<Engine>> engines;
  for (const auto& [id, e] : engines_)
    if (e->spec.model == m.name) engines.push_back(e);
  std::sort(engines.begin(), engines.end(), [](const auto& a, const auto& b) {
    return std::pair(a->spec.replica_id, a->spec.tp_rank) < std::pair(b->spec.replica_id, b->spec.tp_rank);
  });
  std::map<uint32_t, std::set<uint32_t>> ranks;
  for (const auto& e : engines) ranks[e->spec.replica_id].insert(e->spec.tp_rank);
  std::string missing;
  for (const auto& [replica, have] : ranks) {
    std::vector<uint32_t> miss;
    for (uint32_t r = 0; r < m.tp_size; ++r)
      if (!have.count(r)) miss.push_back(r);
    if (!miss.empty())
      missing += "\n  replica " + std::to_string(replica) + " is missing tp ranks " + JoinRanks(miss) +
                 " (tp_size " + std::to_string(m.tp_size) + ")";
  }
  if (!missing.empty()) return FailedPrecondition("model " + m.name + " is not fully registered:" + missing);
  return engines;
}

}  // namespace ws::server
