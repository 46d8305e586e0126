#include "daemon/server/coordinator.h"

#include <algorithm>
#include <tuple>
#include <random>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "daemon/core/json_limits.h"
#include "daemon/core/text.h"

namespace ws::server {

namespace {

using Clock = std::chrono::steady_clock;

enum class SyncState { kPlanning, kStreaming, kCommitting, kCommitted, kAborted };

const char* StateName(SyncState s) {
  switch (s) {
    case SyncState::kPlanning: return "planning";
    case SyncState::kStreaming: return "streaming";
    case SyncState::kCommitting: return "committing";
    case SyncState::kCommitted: return "committed";
    case SyncState::kAborted: return "aborted";
  }
  return "?";
}

bool Terminal(SyncState s) { return s == SyncState::kCommitted || s == SyncState::kAborted; }

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string RandomHex(int digits) {
  std::random_device rd;
  std::mt19937_64 g((static_cast<uint64_t>(rd()) << 32) ^ rd());
  static const char* kHex = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < digits; ++i) s.push_back(kHex[g() & 15]);
  return s;
}

// Elements of one trainer shard (a contiguous range along `dim` of the
// tensor). Saturates at UINT64_MAX (no length can match it) on overflow or a
// negative extent; the planner has refused such manifests already.
uint64_t ShardElements(const SourceTensor& t, const ShardSpec& s) {
  if (s.length <= 0) return 0;
  if (t.shape.empty()) return 1;
  if (s.dim >= t.shape.size()) return 0;
  uint64_t n = static_cast<uint64_t>(s.length);
  for (size_t i = 0; i < t.shape.size(); ++i) {
    if (i == s.dim) continue;
    if (t.shape[i] < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(t.shape[i]), &n)) return UINT64_MAX;
  }
  return n;
}

// Bytes of `elems` elements of `dt`, saturating.
uint64_t ElemBytes(uint64_t elems, DType dt) {
  uint64_t b;
  return __builtin_mul_overflow(elems, static_cast<uint64_t>(DTypeSize(dt)), &b) ? UINT64_MAX : b;
}

// Largest element index an op touches on each side, for a bounds check
// against the mapped sizes (a planner bug must not write outside a buffer).
bool OpInBounds(const kernels::CopyOp& op, uint64_t src_elems, uint64_t dst_elems) {
  if (op.rows <= 0 || op.cols <= 0) return true;
  // Computed with overflow checks: a wrapped index must fail the check.
  auto last = [](int64_t offset, int64_t outer, int64_t ld, int64_t inner, uint64_t* out) {
    int64_t a, b;
    if (__builtin_mul_overflow(outer - 1, ld, &a) || __builtin_add_overflow(offset, a, &b) ||
        __builtin_add_overflow(b, inner - 1, &b))
      return false;
    *out = static_cast<uint64_t>(b);
    return true;
  };
  if (op.dst_offset < 0 || op.dst_ld < (op.rows > 1 ? op.cols : 0)) return false;
  uint64_t dst_last;
  if (!last(op.dst_offset, op.rows, op.dst_ld, op.cols, &dst_last) || dst_last >= dst_elems) return false;
  if (op.zero_fill) return true;
  if (op.src_offset < 0 || op.src_ld < 0) return false;
  uint64_t src_last;
  if (!(op.transpose ? last(op.src_offset, op.cols, op.src_ld, op.rows, &src_last)
                     : last(op.src_offset, op.rows, op.src_ld, op.cols, &src_last)))
    return false;
  return src_last < src_elems;
}

// Multi-line error messages as one log line, quoted.
std::string LogQuote(const std::string& s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\n') {
      out += "; ";
      while (i + 1 < s.size() && s[i + 1] == ' ') ++i;
    } else if (s[i] == '"' || s[i] == '\\') {
      out += '\\';
      out += s[i];
    } else {
      out += s[i];
    }
  }
  return out + "\"";
}

std::string JoinRanks(const std::vector<uint32_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}

}  // namespace

struct Coordinator::Engine {
  std::string id;
  std::string owner;  // principal of the peer that registered it
  std::string label;
  EngineRankSpec spec;
  RankLayout layout;
  std::vector<std::shared_ptr<Mapping>> maps;  // one per spec.params entry
  std::vector<MemoryExtent> extents;           // maps[i]->extent()
  uint64_t bytes = 0;
  EventSink* sink = nullptr;  // null once unregistered
  uint64_t applied_version = 0;

  std::string Describe() const {
    std::string s = "engine " + id + " (" + spec.model + " replica " + std::to_string(spec.replica_id) +
                    " tp_rank " + std::to_string(spec.tp_rank);
    if (!label.empty()) s += ", " + label;
    return s + ")";
  }
};

struct Coordinator::Model {
  std::string name;
  std::string owner;  // principal of its first engine; only it (or an admin) registers and syncs
  std::string architecture;
  nlohmann::json config;
  uint32_t tp_size = 1;
  std::map<std::string, int64_t> options;
  uint32_t engine_count = 0;
  uint64_t committed_version = 0;
  uint64_t busy_sync = 0;  // sync holding the model (in flight or draining its copies)
};

struct Coordinator::Sync {
  uint64_t id = 0;
  std::string owner;  // principal of the BeginSync caller
  SourceManifest manifest;
  std::map<std::string, uint32_t> tensor_index;
  std::vector<std::shared_ptr<Engine>> engines;  // keeps mappings alive while copies run
  SyncPlan plan;
  std::vector<std::vector<uint8_t>> received;  // [tensor][shard]
  SyncState state = SyncState::kPlanning;
  int writers = 0;  // pushes / zero fills currently writing engine memory
  bool started_sent = false;
  bool aborted_sent = false;
  std::set<std::string> pending_acks;
  std::set<std::string> acked;  // engines that applied this sync's version
  Clock::time_point begin = Clock::now();
  Clock::time_point last_activity = Clock::now();  // BeginSync / PushLayer, for the idle timeout
  Clock::time_point end;
  uint64_t bytes_written = 0;
  uint64_t bytes_read = 0;
  std::string error;
};

Coordinator::Coordinator(std::shared_ptr<const LayoutRegistry> layouts, MemoryDomain* domain,
                         Executor* executor, CoordinatorOptions opts)
    : layouts_(std::move(layouts)),
      domain_(domain),
      executor_(executor),
      opts_(opts),
      started_(Clock::now()),
      boot_id_(RandomHex(8)) {
  // Sync ids grow across daemon restarts, so a trainer that still holds an id
  // from before a restart gets NotFound rather than someone else's sync.
  next_sync_id_ = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                            std::chrono::system_clock::now().time_since_epoch())
                                            .count());
  housekeeping_ = std::thread([this] { HousekeepingLoop(); });
}

Coordinator::~Coordinator() {
  {
    std::lock_guard lk(mu_);
    stop_housekeeping_ = true;
  }
  housekeeping_cv_.notify_all();
  if (housekeeping_.joinable()) housekeeping_.join();
}

void Coordinator::HousekeepingLoop() {
  std::unique_lock lk(mu_);
  while (!housekeeping_cv_.wait_for(lk, opts_.housekeeping_interval, [&] { return stop_housekeeping_; })) {
    for (auto* o : opts_.observers) o->Housekeeping();
    if (opts_.progress_timeout.count() > 0) {
      const auto now = Clock::now();
      std::vector<std::shared_ptr<Sync>> idle;
      for (const auto& [id, s] : syncs_)
        if ((s->state == SyncState::kPlanning || s->state == SyncState::kStreaming) && s->writers == 0 &&
            now - s->last_activity > opts_.progress_timeout)
          idle.push_back(s);
      for (const auto& s : idle) {
        AbortLocked(*s, fmt::format("no trainer activity for {:.1f} s before Commit (trainer gone or stuck?); "
                                    "see --sync-progress-timeout",
                                    opts_.progress_timeout.count() / 1000.0));
        trim_pending_ = true;
      }
    }
    const bool trim = trim_pending_, trim_cuda = trim_cuda_pending_;
    trim_pending_ = trim_cuda_pending_ = false;
    lk.unlock();
    if (trim) domain_->Trim();
    if (trim_cuda) domain_->TrimCuda();
    domain_->TrimStale();
    lk.lock();
  }
}

Coordinator::TrimGuard::~TrimGuard() {
  bool trim, trim_cuda;
  {
    std::lock_guard lk(c->mu_);
    trim = c->trim_pending_;
    trim_cuda = c->trim_cuda_pending_;
    c->trim_pending_ = c->trim_cuda_pending_ = false;
  }
  if (trim) c->domain_->Trim();
  if (trim_cuda) c->domain_->TrimCuda();
}

// ---------------------------------------------------------------- engines

Status Coordinator::CheckModelCompatibleLocked(const Model& m, const EngineRankSpec& spec) const {
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

Status Coordinator::CheckIsolationLocked(const Engine& e, const std::string& who) const {
  // Within the registration: sort by (object, start) and compare each extent
  // with the furthest-reaching earlier one of the same object.
  std::vector<size_t> order(e.extents.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto key = [&](size_t i) {
    const MemoryExtent& x = e.extents[i];
    return std::tuple(static_cast<int>(x.kind), x.object_a, x.object_b, x.begin, x.end);
  };
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return key(a) < key(b); });
  auto same_object = [](const MemoryExtent& a, const MemoryExtent& b) {
    return a.kind == b.kind && a.object_a == b.object_a && a.object_b == b.object_b;
  };
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
  for (const auto& [id, other] : engines_)
    for (size_t j = 0; j < other->extents.size(); ++j)
      for (size_t i = 0; i < e.extents.size(); ++i)
        if (e.extents[i].Overlaps(other->extents[j]))
          return InvalidArgument(who + ": param " + e.spec.params[i].name + " " + e.extents[i].ToString() +
                                 " overlaps the memory of " + other->Describe() + " param " +
                                 other->spec.params[j].name + " " + other->extents[j].ToString() +
                                 "; engines may not share parameter memory");
  return Status::Ok();
}

Result<std::string> Coordinator::RegisterEngine(const Peer& caller, EngineRankSpec spec,
                                                std::vector<MemoryRef> memory, EventSink* sink, std::string label) {
  TrimGuard trim{this};  // a refusal after mapping lets the domain drop those objects
  if (spec.model.empty()) return InvalidArgument("model is empty");
  if (spec.architecture.empty()) return InvalidArgument("architecture is empty");
  if (spec.tp_size == 0) return InvalidArgument("tp_size must be at least 1");
  if (spec.tp_rank >= spec.tp_size)
    return InvalidArgument("tp_rank " + std::to_string(spec.tp_rank) + " is not below tp_size " +
                           std::to_string(spec.tp_size));
  if (spec.params.empty()) return InvalidArgument("no params registered");
  if (memory.size() != spec.params.size())
    return InvalidArgument(std::to_string(spec.params.size()) + " params but " + std::to_string(memory.size()) +
                           " memory references");
  WS_ASSIGN_OR_RETURN(nlohmann::json cfg, ParseJsonLimited(spec.hf_config_json, "hf_config_json",
                                                           opts_.limits.max_json_depth, opts_.limits.max_json_bytes));
  if (!cfg.is_object()) return InvalidArgument("hf_config_json is not a JSON object");
  const std::string who = "model " + spec.model + " replica " + std::to_string(spec.replica_id) +
                          " tp_rank " + std::to_string(spec.tp_rank);
  {
    std::set<std::string> names;
    for (const auto& p : spec.params)
      if (!names.insert(p.name).second) return InvalidArgument("param " + p.name + " is registered twice");
  }
  // Cheap refusals first, before resolving and mapping; re-checked below.
  auto admit_locked = [&]() -> Status {
    if (shutting_down_) return Unavailable("the daemon is shutting down");
    auto it = models_.find(spec.model);
    if (it != models_.end() && !caller.Owns(it->second.owner))
      return PermissionDenied("model " + spec.model + " belongs to " + it->second.owner + "; " + caller.Describe() +
                              " (" + caller.principal + ") may not register engines for it");
    if (it != models_.end() && it->second.busy_sync)
      return FailedPrecondition("model " + spec.model + " has sync " + std::to_string(it->second.busy_sync) +
                                " in flight; register after it ends");
    auto n = engines_by_owner_.find(caller.principal);
    if (n != engines_by_owner_.end() && n->second >= opts_.max_engines_per_peer)
      return ResourceExhausted(caller.Describe() + " (" + caller.principal + ") already has " +
                               std::to_string(n->second) + " engine ranks registered (limit max_engines_per_peer = " +
                               std::to_string(opts_.max_engines_per_peer) + ")");
    return Status::Ok();
  };
  {
    std::lock_guard lk(mu_);
    WS_RETURN_IF_ERROR(admit_locked());
  }

  // Layout: the architecture's rule file, plus explicit per-param mappings.
  ResolveOptions ro;
  ro.tp_size = spec.tp_size;
  ro.tp_rank = spec.tp_rank;
  ro.engine_options = spec.options;
  ro.limits = opts_.limits;
  size_t n_explicit = 0;
  for (const auto& p : spec.params) n_explicit += p.mapping_json.empty() ? 0 : 1;
  RankLayout layout;
  if (n_explicit < spec.params.size()) {
    auto r = layouts_->Resolve(spec.architecture, spec.hf_config_json, ro);
    if (!r.ok()) return r.status().WithContext(who);
    layout = std::move(r).value();
  } else {
    // Every param maps itself; a rule file for the architecture, if any,
    // still contributes its declared sources and skip patterns.
    auto r = layouts_->Resolve(spec.architecture, spec.hf_config_json, ro);
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
    auto r = layouts_->ResolveExplicit(p.name, p.mapping_json, spec.hf_config_json, ro, &explicit_sources);
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

  // Memory: exactly numel * dtype size bytes per param, aligned to the
  // element size, owned by the caller, mapped writable.
  const Accessor access = caller.ToAccessor();
  std::vector<std::shared_ptr<Mapping>> maps;
  uint64_t bytes = 0;
  auto refuse = [&](Status st) {
    std::lock_guard lk(mu_);
    trim_pending_ = true;
    return st;
  };
  for (size_t i = 0; i < spec.params.size(); ++i) {
    const auto& p = spec.params[i];
    uint64_t want = ElemBytes(static_cast<uint64_t>(NumElements(p.shape)), p.dtype);
    if (memory[i].offset % DTypeSize(p.dtype) != 0)
      return refuse(InvalidArgument(who + ": param " + p.name + ": memory offset " + std::to_string(memory[i].offset) +
                                    " is not a multiple of the " + DTypeName(p.dtype) + " element size " +
                                    std::to_string(DTypeSize(p.dtype))));
    if (!p.tied_to.empty() && std::none_of(spec.params.begin(), spec.params.end(),
                                           [&](const EngineParamSpec& q) { return q.name == p.tied_to; }))
      return refuse(InvalidArgument(who + ": param " + p.name + " is tied_to " + p.tied_to +
                                    ", which this rank does not register"));
    if (memory[i].length != want)
      return refuse(InvalidArgument(who + ": param " + p.name + ": memory length " + std::to_string(memory[i].length) +
                             " bytes does not match shape " + ShapeToString(p.shape) + " " + DTypeName(p.dtype) +
                             " (" + std::to_string(want) + " bytes)"));
    auto m = domain_->Map(memory[i], "param " + p.name, access);
    if (!m.ok()) return refuse(m.status().WithContext(who));
    if (!m.value()->writable())
      return refuse(InvalidArgument(who + ": param " + p.name + ": memory " + memory[i].ToString() +
                                    " is read-only for " + caller.Describe()));
    // Allocate the backing pages now: a full /dev/shm is a refusal naming
    // the param, not a fault in the middle of a sync.
    if (Status st = m.value()->Reserve(); !st.ok()) return refuse(st.WithContext(who + ": param " + p.name));
    maps.push_back(std::move(m).value());
    bytes += want;
  }

  auto e = std::make_shared<Engine>();
  e->label = std::move(label);
  e->layout = std::move(layout);
  e->maps = std::move(maps);
  for (const auto& m : e->maps) e->extents.push_back(m->extent());
  e->bytes = bytes;
  e->sink = sink;
  e->spec.params = spec.params;  // for messages of the isolation check; replaced by the whole spec below

  std::lock_guard lk(mu_);
  auto refuse_locked = [&](Status st) {
    trim_pending_ = true;
    return st;
  };
  if (Status st = admit_locked(); !st.ok()) return refuse_locked(st);
  if (Status st = CheckIsolationLocked(*e, who); !st.ok()) return refuse_locked(st);
  auto it = models_.find(spec.model);
  if (it != models_.end()) {
    const Model& m = it->second;
    if (Status st = CheckModelCompatibleLocked(m, spec); !st.ok()) return refuse_locked(st);
    for (const auto& [id, other] : engines_)
      if (other->spec.model == spec.model && other->spec.replica_id == spec.replica_id &&
          other->spec.tp_rank == spec.tp_rank)
        return refuse_locked(AlreadyExists(who + " is already registered as " + other->Describe()));
  } else {
    Model m;
    m.name = spec.model;
    m.owner = caller.principal;
    m.architecture = spec.architecture;
    m.config = std::move(cfg);
    m.tp_size = spec.tp_size;
    m.options = spec.options;
    it = models_.emplace(spec.model, std::move(m)).first;
  }
  it->second.engine_count++;
  engines_by_owner_[caller.principal]++;
  e->id = "eng-" + boot_id_ + "-" + std::to_string(next_engine_++);
  e->owner = caller.principal;
  e->spec = std::move(spec);
  engines_[e->id] = e;
  spdlog::info("engine registered: {} params={} bytes={} layout={} by {}", e->Describe(), e->spec.params.size(),
               e->bytes, e->layout.rule_file, caller.Describe());
  return e->id;
}

Result<std::shared_ptr<Coordinator::Engine>> Coordinator::FindOwnedEngineLocked(const Peer& caller,
                                                                              const std::string& engine_id,
                                                                              const char* action) {
  auto it = engines_.find(engine_id);
  if (it == engines_.end()) return NotFound("engine " + engine_id + " is not registered");
  if (!caller.Owns(it->second->owner))
    return PermissionDenied(it->second->Describe() + " belongs to " + it->second->owner + "; " + caller.Describe() +
                            " (" + caller.principal + ") may not " + action + " it");
  return it->second;
}

Status Coordinator::UnregisterEngine(const Peer& caller, const std::string& engine_id) {
  TrimGuard trim{this};
  std::lock_guard lk(mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<Engine> e, FindOwnedEngineLocked(caller, engine_id, "unregister"));
  e->sink = nullptr;
  engines_.erase(engine_id);
  if (auto n = engines_by_owner_.find(e->owner); n != engines_by_owner_.end() && --n->second == 0)
    engines_by_owner_.erase(n);
  trim_pending_ = true;
  std::shared_ptr<Sync> sync;
  if (auto mit = models_.find(e->spec.model); mit != models_.end()) {
    Model& m = mit->second;
    m.engine_count--;
    // An engine that already acknowledged the version being committed has
    // applied it: its leaving does not undo the commit for the others.
    if (auto sit = syncs_.find(m.busy_sync); sit != syncs_.end() && !Terminal(sit->second->state) &&
                                             !(sit->second->state == SyncState::kCommitting &&
                                               sit->second->acked.count(e->id)))
      sync = sit->second;
    else if (m.engine_count == 0 && m.busy_sync == 0)
      models_.erase(mit);
  }
  // Aborting releases the model (and drops it when it has no engines left).
  if (sync) AbortLocked(*sync, e->Describe() + " unregistered");
  spdlog::info("engine unregistered: {}", e->Describe());
  return Status::Ok();
}

// ---------------------------------------------------------------- syncs

void Coordinator::EmitLocked(const Sync& sync, EngineEvent::Kind kind, const std::string& reason) {
  EngineEvent ev;
  ev.kind = kind;
  ev.sync_id = sync.id;
  ev.version = sync.manifest.version;
  ev.reason = reason;
  for (const auto& e : sync.engines)
    if (e->sink) e->sink->Deliver(ev);
}

SyncStats Coordinator::StatsLocked(const Sync& sync) const {
  SyncStats s;
  s.sync_id = sync.id;
  s.model = sync.manifest.model;
  s.version = sync.manifest.version;
  s.state = StateName(sync.state);
  s.bytes_written = sync.bytes_written;
  s.bytes_read = sync.bytes_read;
  s.seconds = Seconds((Terminal(sync.state) ? sync.end : Clock::now()) - sync.begin);
  s.gbps = s.seconds > 0 ? static_cast<double>(s.bytes_written) / s.seconds / 1e9 : 0;
  s.error = sync.error;
  s.engines = static_cast<uint32_t>(sync.engines.size());
  s.world_size = sync.manifest.world_size;
  return s;
}

void Coordinator::FinishLocked(Sync& sync, bool committed) {
  sync.state = committed ? SyncState::kCommitted : SyncState::kAborted;
  sync.end = Clock::now();
  SyncStats st = StatsLocked(sync);
  if (committed) {
    ++syncs_committed_;
    if (auto it = models_.find(sync.manifest.model); it != models_.end())
      it->second.committed_version = sync.manifest.version;
  } else {
    ++syncs_aborted_;
  }
  last_sync_ = st;
  for (auto* o : opts_.observers) o->SyncFinished(st, committed);
  finished_[sync.id] = st;
  finished_owner_[sync.id] = sync.owner;
  while (finished_.size() > 64) {
    finished_owner_.erase(finished_.begin()->first);
    finished_.erase(finished_.begin());
  }
  // The one summary line per sync.
  auto line = fmt::format("sync {} model={} version={} engines={} world_size={} bytes={} seconds={:.3f} gbps={:.3f} outcome={}",
                          sync.id, st.model, st.version, st.engines, st.world_size, st.bytes_written, st.seconds,
                          st.gbps, st.state);
  if (committed)
    spdlog::info("{}", line);
  else
    spdlog::warn("{} error={}", line, LogQuote(st.error));
  ReleaseIfIdleLocked(sync);
  cv_.notify_all();
}

void Coordinator::AbortLocked(Sync& sync, const std::string& reason) {
  if (Terminal(sync.state)) return;
  sync.error = Truncate(reason, kMaxReasonBytes);  // kept, logged and sent to every engine
  FinishLocked(sync, /*committed=*/false);
}

// A finished sync gives its model back once nothing writes engine memory any
// more; only then do engines hear Aborted.
void Coordinator::ReleaseIfIdleLocked(Sync& sync) {
  if (!Terminal(sync.state) || sync.writers > 0) return;
  if (sync.state == SyncState::kAborted) trim_pending_ = true;
  trim_cuda_pending_ = true;  // the trainer may free its memory now
  if (sync.state == SyncState::kAborted && sync.started_sent && !sync.aborted_sent) {
    sync.aborted_sent = true;
    EmitLocked(sync, EngineEvent::Kind::kAborted, sync.error);
  }
  if (auto it = models_.find(sync.manifest.model); it != models_.end() && it->second.busy_sync == sync.id) {
    it->second.busy_sync = 0;
    if (it->second.engine_count == 0) models_.erase(it);
  }
  const uint64_t id = sync.id;
  syncs_.erase(id);  // may destroy `sync` unless the caller holds a reference
  cv_.notify_all();
}

Result<std::shared_ptr<Coordinator::Sync>> Coordinator::FindOwnedLocked(const Peer& caller, uint64_t sync_id,
                                                                       const char* action) {
  // Ownership first: a peer learns nothing about other principals' syncs.
  std::string owner;
  if (auto it = syncs_.find(sync_id); it != syncs_.end()) owner = it->second->owner;
  else if (auto f = finished_owner_.find(sync_id); f != finished_owner_.end()) owner = f->second;
  if (!owner.empty() && !caller.Owns(owner))
    return PermissionDenied("sync " + std::to_string(sync_id) + " belongs to " + owner + "; " + caller.Describe() +
                            " (" + caller.principal + ") may not " + action + " it");
  return FindLiveLocked(sync_id);
}

Result<std::shared_ptr<Coordinator::Sync>> Coordinator::FindLiveLocked(uint64_t sync_id) {
  const std::string name = "sync " + std::to_string(sync_id);
  if (auto it = syncs_.find(sync_id); it != syncs_.end()) {
    if (!Terminal(it->second->state)) return it->second;
    return Aborted(name + " was aborted: " + it->second->error);  // still draining its copies
  }
  if (auto f = finished_.find(sync_id); f != finished_.end()) {
    if (f->second.state == "aborted") return Aborted(name + " was aborted: " + f->second.error);
    return FailedPrecondition(name + " is already committed");
  }
  return NotFound(name + " is not in flight on this daemon");
}

Result<BeginSyncResult> Coordinator::BeginSync(const Peer& caller, SourceManifest manifest) {
  if (manifest.model.empty()) return InvalidArgument("model is empty");
  if (manifest.world_size == 0) return InvalidArgument("world_size must be at least 1");
  if (manifest.version == 0) return InvalidArgument("version must be at least 1");
  auto sync = std::make_shared<Sync>();
  {
    std::lock_guard lk(mu_);
    if (shutting_down_) return Unavailable("the daemon is shutting down");
    auto mit = models_.find(manifest.model);
    if (mit == models_.end() || mit->second.engine_count == 0)
      return FailedPrecondition("no engines registered for model " + manifest.model);
    Model& m = mit->second;
    if (!caller.Owns(m.owner))
      return PermissionDenied("model " + m.name + " belongs to " + m.owner + "; " + caller.Describe() + " (" +
                              caller.principal + ") may not sync it");
    if (manifest.version <= m.committed_version)
      return FailedPrecondition("model " + m.name + ": version " + std::to_string(manifest.version) +
                                " is not above the committed version " + std::to_string(m.committed_version) +
                                "; versions must strictly increase");
    {
      uint32_t mine = 0;
      for (const auto& [id, s] : syncs_) mine += s->owner == caller.principal ? 1 : 0;
      if (mine >= opts_.max_syncs_per_peer)
        return ResourceExhausted(caller.Describe() + " (" + caller.principal + ") already has " +
                                 std::to_string(mine) + " syncs in flight (limit max_syncs_per_peer = " +
                                 std::to_string(opts_.max_syncs_per_peer) + ")");
    }
    if (m.busy_sync) {
      auto sit = syncs_.find(m.busy_sync);
      std::string what = sit != syncs_.end() && Terminal(sit->second->state)
                             ? " is still finishing its copies after an abort"
                             : " is in flight";
      return FailedPrecondition("model " + m.name + ": sync " + std::to_string(m.busy_sync) + what +
                                "; one sync per model at a time");
    }
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
    if (!missing.empty())
      return FailedPrecondition("model " + m.name + " is not fully registered:" + missing);
    sync->id = next_sync_id_++;
    sync->owner = caller.principal;
    sync->engines = std::move(engines);
    sync->manifest = std::move(manifest);
    m.busy_sync = sync->id;
    syncs_[sync->id] = sync;
  }

  // Plan without the lock. Engine specs and layouts are immutable after registration.
  Status backed;
  for (const auto& e : sync->engines) {
    // One stat per object: the param reaching furthest into it decides.
    std::map<const void*, size_t> furthest;
    auto end = [&](size_t i) { return static_cast<const char*>(e->maps[i]->data()) + e->maps[i]->size(); };
    for (size_t i = 0; i < e->maps.size(); ++i) {
      auto [it, inserted] = furthest.emplace(e->maps[i]->object(), i);
      if (!inserted && end(i) > end(it->second)) it->second = i;
    }
    for (const auto& [obj, i] : furthest)
      if (Status st = e->maps[i]->CheckBacked(); !st.ok() && backed.ok())
        backed = FailedPrecondition(e->Describe() + " param " + e->spec.params[i].name + ": " + st.message());
  }
  std::vector<PlanEngine> pe;
  pe.reserve(sync->engines.size());
  for (const auto& e : sync->engines) pe.push_back(PlanEngine{e->id, e->spec, e->layout});
  // Until the sync streams, only this thread reads the manifest's tensors.
  std::vector<TensorDtypes> dtypes;
  if (sync->manifest.negotiate_dtypes) {
    dtypes = NegotiateDTypes(sync->manifest, pe);
    for (size_t t = 0; t < dtypes.size(); ++t) sync->manifest.tensors[t].dtype = dtypes[t].wire;
  }
  auto plan = backed.ok() ? BuildPlan(sync->manifest, pe) : Result<SyncPlan>(backed);

  std::lock_guard lk(mu_);
  const SourceManifest& mf = sync->manifest;
  if (sync->state == SyncState::kAborted)  // an engine left while planning
    return Aborted("sync " + std::to_string(sync->id) + " was aborted: " + sync->error);
  if (!plan.ok()) {
    // Refused: it never started, nothing was written, engines heard nothing.
    if (auto it = models_.find(mf.model); it != models_.end() && it->second.busy_sync == sync->id) {
      it->second.busy_sync = 0;
      if (it->second.engine_count == 0) models_.erase(it);
    }
    syncs_.erase(sync->id);
    cv_.notify_all();
    Status st = plan.status().WithContext("model " + mf.model + " version " + std::to_string(mf.version));
    spdlog::warn("BeginSync refused: {}", LogQuote(st.message()));
    return st;
  }
  sync->plan = std::move(plan).value();
  sync->plan.by_shard.resize(mf.tensors.size());
  for (uint32_t t = 0; t < mf.tensors.size(); ++t) sync->plan.by_shard[t].resize(mf.tensors[t].shards.size());
  for (uint32_t t = 0; t < mf.tensors.size(); ++t) sync->tensor_index.emplace(mf.tensors[t].name, t);
  sync->received.resize(mf.tensors.size());
  for (uint32_t t = 0; t < mf.tensors.size(); ++t) sync->received[t].assign(mf.tensors[t].shards.size(), 0);
  sync->state = SyncState::kStreaming;
  sync->started_sent = true;
  EmitLocked(*sync, EngineEvent::Kind::kStarted);
  spdlog::debug("sync {} begun: model={} version={} engines={} world_size={} copy_ops={} bytes_planned={}",
                sync->id, mf.model, mf.version, sync->engines.size(), mf.world_size, sync->plan.copies.size(),
                sync->plan.bytes_written);
  BeginSyncResult r;
  r.sync_id = sync->id;
  r.engines = static_cast<uint32_t>(sync->engines.size());
  r.copy_ops = sync->plan.copies.size();
  r.bytes_planned = sync->plan.bytes_written;
  r.dtypes = std::move(dtypes);
  return r;
}

Result<LayerResult> Coordinator::PushLayer(const Peer& caller, uint64_t sync_id, uint32_t rank,
                                           const std::string& layer,
                                           const std::vector<std::pair<std::string, MemoryRef>>& shards) {
  TrimGuard trim{this};
  struct Item {
    uint32_t t, s;
    const MemoryRef* ref;
    std::string what;
  };
  std::shared_ptr<Sync> sync;
  std::vector<Item> items;
  const std::string where = "sync " + std::to_string(sync_id) + " rank " + std::to_string(rank) + " layer \"" +
                            layer + "\"";
  {
    std::lock_guard lk(mu_);
    WS_ASSIGN_OR_RETURN(sync, FindOwnedLocked(caller, sync_id, "push layers to"));
    const SourceManifest& mf = sync->manifest;
    auto fail = [&](Status st) {
      AbortLocked(*sync, st.message());
      return st;
    };
    if (sync->state == SyncState::kCommitting)  // refuse, but the commit stands
      return FailedPrecondition(where + ": arrived after Commit; no more layers are accepted");
    if (sync->state != SyncState::kStreaming)
      return fail(FailedPrecondition(where + ": arrived after Commit; no more layers are accepted"));
    sync->last_activity = Clock::now();
    if (rank >= mf.world_size)
      return fail(InvalidArgument(where + ": rank is not below world_size " + std::to_string(mf.world_size)));
    std::vector<std::string> errors;
    std::set<std::pair<uint32_t, uint32_t>> taken;
    for (const auto& [name, ref] : shards) {
      auto ti = sync->tensor_index.find(name);
      if (ti == sync->tensor_index.end()) {
        errors.push_back("tensor " + name + " is not in the manifest");
        continue;
      }
      const SourceTensor& t = mf.tensors[ti->second];
      std::optional<uint32_t> pick;
      bool seen = false;
      for (uint32_t s = 0; s < t.shards.size(); ++s) {
        if (t.shards[s].rank != rank || ShardElements(t, t.shards[s]) == 0) continue;
        seen = true;
        if (!sync->received[ti->second][s] && !taken.count({ti->second, s})) {
          pick = s;
          break;
        }
      }
      std::string what = "tensor " + name + " (rank " + std::to_string(rank) + ")";
      if (!pick) {
        errors.push_back(seen ? what + " was already received" : "tensor " + name + " has no shard for rank " +
                                                                     std::to_string(rank) + " in the manifest");
        continue;
      }
      uint64_t want = ElemBytes(ShardElements(t, t.shards[*pick]), t.dtype);
      if (ref.offset % DTypeSize(t.dtype) != 0) {
        errors.push_back(what + ": memory offset " + std::to_string(ref.offset) + " is not a multiple of the " +
                         DTypeName(t.dtype) + " element size " + std::to_string(DTypeSize(t.dtype)));
        continue;
      }
      if (ref.length != want) {
        errors.push_back(what + ": memory length " + std::to_string(ref.length) + " bytes does not match the shard (" +
                         std::to_string(want) + " bytes of " + DTypeName(t.dtype) + ")");
        continue;
      }
      taken.insert({ti->second, *pick});
      items.push_back(Item{ti->second, *pick, &ref, what});
    }
    if (!errors.empty()) {
      ErrorList listed;  // the first few; a layer may hold thousands of bad shards
      for (auto& e : errors) listed.Add(std::move(e));
      return fail(InvalidArgument(where + ":" + listed.Join("\n  ", /*lead=*/true)));
    }
    for (const auto& it : items) sync->received[it.t][it.s] = 1;
    sync->writers++;
  }

  // Map every shard of the layer (as the caller) before any byte moves.
  const Accessor access = caller.ToAccessor();
  auto finish = [&](Status st) -> Status {
    std::lock_guard lk(mu_);
    sync->writers--;
    sync->last_activity = Clock::now();
    if (!st.ok()) AbortLocked(*sync, st.message());
    ReleaseIfIdleLocked(*sync);
    cv_.notify_all();
    if (st.ok() && sync->state == SyncState::kAborted)
      return Aborted("sync " + std::to_string(sync_id) + " was aborted: " + sync->error);
    return st;
  };
  std::vector<std::shared_ptr<Mapping>> src(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    auto m = domain_->Map(*items[i].ref, items[i].what, access);
    if (!m.ok()) return finish(m.status().WithContext(where));
    src[i] = std::move(m).value();
  }

  const SourceManifest& mf = sync->manifest;
  std::vector<kernels::CopyOp> ops;
  std::vector<std::string> labels;
  uint64_t bytes_read = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const SourceTensor& t = mf.tensors[items[i].t];
    uint64_t src_elems = src[i]->size() / DTypeSize(t.dtype);
    for (uint32_t ci : sync->plan.by_shard[items[i].t][items[i].s]) {
      const PlannedCopy& c = sync->plan.copies[ci];
      const Engine& e = *sync->engines[c.engine];
      const EngineParamSpec& p = e.spec.params[c.param];
      const Mapping& dst = *e.maps[c.param];
      kernels::CopyOp op;
      op.src = src[i]->data();
      op.dst = dst.data();
      op.src_offset = c.src_offset;
      op.src_ld = c.src_ld;
      op.dst_offset = c.dst_offset;
      op.dst_ld = c.dst_ld;
      op.rows = c.rows;
      op.cols = c.cols;
      op.src_dtype = static_cast<uint8_t>(t.dtype);
      op.dst_dtype = static_cast<uint8_t>(p.dtype);
      op.transpose = c.transpose ? 1 : 0;
      std::string label = items[i].what + " -> " + e.id + " param " + p.name;
      if (!OpInBounds(op, src_elems, dst.size() / DTypeSize(p.dtype)))
        return finish(Internal(where + ": planned copy " + label + " falls outside its buffers"));
      bytes_read += static_cast<uint64_t>(c.rows * c.cols) * DTypeSize(t.dtype);
      ops.push_back(op);
      labels.push_back(std::move(label));
    }
  }
  {
    std::lock_guard lk(mu_);
    if (sync->state == SyncState::kAborted) {  // aborted while we mapped: write nothing
      sync->writers--;
      ReleaseIfIdleLocked(*sync);
      return Aborted("sync " + std::to_string(sync_id) + " was aborted: " + sync->error);
    }
  }
  auto t0 = Clock::now();
  auto ran = executor_->RunLabeled(ops, labels);
  double secs = Seconds(Clock::now() - t0);
  if (!ran.ok()) return finish(ran.status().WithContext(where));
  {
    std::lock_guard lk(mu_);
    sync->bytes_written += ran.value();
    sync->bytes_read += bytes_read;
  }
  Status st = finish(Status::Ok());
  if (!st.ok()) return st;
  spdlog::trace("{}: {} shards, {} bytes in {:.4f}s", where, items.size(), ran.value(), secs);
  return LayerResult{layer, ran.value(), secs};
}

Result<SyncStats> Coordinator::Commit(const Peer& caller, uint64_t sync_id) {
  TrimGuard trim{this};
  std::unique_lock lk(mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<Sync> sync, FindOwnedLocked(caller, sync_id, "commit"));
  const std::string where = "sync " + std::to_string(sync_id);
  auto aborted = [&] { return Aborted(where + " was aborted: " + sync->error); };
  if (sync->state != SyncState::kStreaming)
    return FailedPrecondition(where + " is " + StateName(sync->state) + "; Commit is accepted once, while streaming");
  sync->state = SyncState::kCommitting;
  cv_.wait(lk, [&] { return sync->writers == 0 || Terminal(sync->state); });
  if (sync->state == SyncState::kAborted) return aborted();

  const SourceManifest& mf = sync->manifest;
  std::vector<std::string> missing;
  size_t n_missing = 0;
  for (uint32_t t = 0; t < mf.tensors.size(); ++t)
    for (uint32_t s = 0; s < mf.tensors[t].shards.size(); ++s)
      if (!sync->received[t][s] && !sync->plan.by_shard[t][s].empty() && n_missing++ < 20)
        missing.push_back(mf.tensors[t].name + " (rank " + std::to_string(mf.tensors[t].shards[s].rank) + ")");
  if (n_missing) {
    std::string msg = where + ": Commit before every shard arrived; " + std::to_string(n_missing) + " missing:";
    for (const auto& m : missing) msg += "\n  " + m;
    if (n_missing > missing.size()) msg += "\n  ... and " + std::to_string(n_missing - missing.size()) + " more";
    AbortLocked(*sync, msg);
    return FailedPrecondition(msg);
  }

  // Zero fills (vocab padding rows).
  if (!sync->plan.zeros.empty()) {
    std::vector<kernels::CopyOp> ops;
    std::vector<std::string> labels;
    for (const PlannedZero& z : sync->plan.zeros) {
      const Engine& e = *sync->engines[z.engine];
      const EngineParamSpec& p = e.spec.params[z.param];
      kernels::CopyOp op;
      op.dst = e.maps[z.param]->data();
      op.dst_offset = z.dst_offset;
      op.dst_ld = z.dst_ld;
      op.rows = z.rows;
      op.cols = z.cols;
      op.src_dtype = op.dst_dtype = static_cast<uint8_t>(p.dtype);
      op.zero_fill = 1;
      std::string label = "zero fill of " + e.id + " param " + p.name;
      if (!OpInBounds(op, 0, e.maps[z.param]->size() / DTypeSize(p.dtype))) {
        Status st = Internal(where + ": planned " + label + " falls outside the param");
        AbortLocked(*sync, st.message());
        return st;
      }
      ops.push_back(op);
      labels.push_back(std::move(label));
    }
    sync->writers++;
    lk.unlock();
    auto ran = executor_->RunLabeled(ops, labels);
    lk.lock();
    sync->writers--;
    if (ran.ok()) sync->bytes_written += ran.value();
    if (!ran.ok()) AbortLocked(*sync, ran.status().WithContext(where).message());
    ReleaseIfIdleLocked(*sync);
    if (sync->state == SyncState::kAborted) return aborted();
  }

  EmitLocked(*sync, EngineEvent::Kind::kCommitted);
  for (const auto& e : sync->engines) sync->pending_acks.insert(e->id);
  auto deadline = Clock::now() + opts_.ack_timeout;
  bool done = cv_.wait_until(lk, deadline,
                             [&] { return sync->pending_acks.empty() || Terminal(sync->state); });
  if (sync->state == SyncState::kAborted) return aborted();
  if (!done) {
    std::string who;
    for (const auto& e : sync->engines)
      if (sync->pending_acks.count(e->id)) who += (who.empty() ? "" : ", ") + e->Describe();
    std::ostringstream msg;
    msg << where << ": no AckVersion for version " << mf.version << " within " << opts_.ack_timeout.count() / 1000.0
        << " s from " << who;
    AbortLocked(*sync, msg.str());
    return DeadlineExceeded(msg.str());
  }
  FinishLocked(*sync, /*committed=*/true);
  return StatsLocked(*sync);
}

Status Coordinator::Abort(const Peer& caller, uint64_t sync_id, const std::string& reason) {
  TrimGuard trim{this};
  std::lock_guard lk(mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<Sync> sync, FindOwnedLocked(caller, sync_id, "abort"));
  AbortLocked(*sync, reason.empty() ? std::string("aborted (no reason given)") : reason);
  return Status::Ok();
}

Status Coordinator::AckVersion(const Peer& caller, const std::string& engine_id, uint64_t version, bool ok,
                               const std::string& error) {
  TrimGuard trim{this};
  std::lock_guard lk(mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<Engine> owned, FindOwnedEngineLocked(caller, engine_id, "acknowledge versions for"));
  Engine& e = *owned;
  auto mit = models_.find(e.spec.model);
  std::shared_ptr<Sync> sync;
  if (mit != models_.end() && mit->second.busy_sync)
    if (auto sit = syncs_.find(mit->second.busy_sync); sit != syncs_.end()) sync = sit->second;
  if (!sync || sync->state != SyncState::kCommitting || sync->manifest.version != version ||
      !sync->pending_acks.count(engine_id))
    return FailedPrecondition(e.Describe() + ": no commit of version " + std::to_string(version) +
                              " is waiting for this engine's acknowledgement");
  if (!ok) {
    AbortLocked(*sync, e.Describe() + " failed to apply version " + std::to_string(version) + ": " +
                           (error.empty() ? std::string("no error given") : error));
    return Status::Ok();
  }
  e.applied_version = version;
  sync->pending_acks.erase(engine_id);
  sync->acked.insert(engine_id);
  cv_.notify_all();
  return Status::Ok();
}

void Coordinator::TrainerStreamClosed(const Peer& caller, uint64_t sync_id, uint32_t rank, bool clean) {
  TrimGuard trim{this};
  if (clean) return;
  std::lock_guard lk(mu_);
  auto it = syncs_.find(sync_id);
  if (it == syncs_.end() || !caller.Owns(it->second->owner)) return;
  std::shared_ptr<Sync> sync = it->second;
  if (sync->state == SyncState::kStreaming || sync->state == SyncState::kPlanning)
    AbortLocked(*sync, "trainer rank " + std::to_string(rank) + " disconnected");
}

void Coordinator::AbortAll(const std::string& reason, std::chrono::milliseconds drain) {
  TrimGuard trim{this};
  std::unique_lock lk(mu_);
  shutting_down_ = true;
  std::vector<std::shared_ptr<Sync>> live;
  for (const auto& [id, s] : syncs_) live.push_back(s);
  for (const auto& s : live) AbortLocked(*s, reason);
  cv_.notify_all();
  // Aborted is sent once a sync's running copies have finished; wait for that
  // (bounded) so engines hear it before the caller closes their streams.
  cv_.wait_for(lk, drain, [&] {
    for (const auto& s : live)
      if (s->writers > 0) return false;
    return true;
  });
}

StatusSnapshot Coordinator::GetStatus() const {
  std::lock_guard lk(mu_);
  StatusSnapshot s;
  s.uptime_seconds = Seconds(Clock::now() - started_);
  std::map<std::string, std::set<uint32_t>> replicas;
  for (const auto& [id, e] : engines_) {
    EngineInfo i;
    i.engine_id = id;
    i.model = e->spec.model;
    i.architecture = e->spec.architecture;
    i.replica_id = e->spec.replica_id;
    i.tp_rank = e->spec.tp_rank;
    i.tp_size = e->spec.tp_size;
    i.params = static_cast<uint32_t>(e->spec.params.size());
    i.bytes = e->bytes;
    i.applied_version = e->applied_version;
    i.label = e->label;
    i.owner = e->owner;
    s.engines.push_back(std::move(i));
    replicas[e->spec.model].insert(e->spec.replica_id);
  }
  for (const auto& [name, m] : models_) {
    ModelInfo i;
    i.model = name;
    i.architecture = m.architecture;
    i.replicas = static_cast<uint32_t>(replicas[name].size());
    i.engine_ranks = m.engine_count;
    i.committed_version = m.committed_version;
    s.models.push_back(std::move(i));
  }
  for (const auto& [id, sync] : syncs_)
    if (!Terminal(sync->state)) s.current_syncs.push_back(StatsLocked(*sync));
  s.last_sync = last_sync_;
  s.syncs_committed = syncs_committed_;
  s.syncs_aborted = syncs_aborted_;
  return s;
}

}  // namespace ws::server
