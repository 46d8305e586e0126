#include "daemon/server/coordinator.h"

#include <algorithm>
#include <ctime>
#include <optional>
#include <future>
#include <random>
#include <sstream>
#include <tuple>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "daemon/cluster/windows.h"
#include "daemon/sync/host_buffer.h"
#include "daemon/core/text.h"

namespace ws::server {

namespace {

// Hands the heap's free pages back to the system. glibc keeps what a
// registration (layout resolution) or a first sync (the manifest request,
// planning tables) freed, hundreds of MB for a MoE model, as resident memory
// of the daemon until something reuses it.
void ReleaseFreeHeap() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// CPU seconds the calling thread has used (an RPC runs on one thread).
double ThreadCpuSeconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

std::string RandomHex(int digits) {
  std::random_device rd;
  std::mt19937_64 g((static_cast<uint64_t>(rd()) << 32) ^ rd());
  static const char* kHex = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < digits; ++i) s.push_back(kHex[g() & 15]);
  return s;
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

// Maps a layer's shards: one Map per memory object, of the range its shards
// span, and a slice of it per shard. When that fails, shard by shard, so the
// error names the offending one.
Result<std::vector<std::shared_ptr<Mapping>>> MapShards(MemoryDomain& domain, const SyncSession& sync,
                                                        const std::vector<ClaimedShard>& claimed,
                                                        const Accessor& access) {
  struct Span {
    MemoryRef ref;  // the covering range
    size_t first = 0;
    bool ok = true;
    std::shared_ptr<Mapping> mapped;
  };
  std::vector<Span> spans;
  std::map<const MemoryRef*, size_t> by_object;  // indexed shards share one object
  std::map<std::tuple<MemoryKind, std::string, std::string, std::string>, size_t> by_name;
  std::vector<size_t> of(claimed.size());
  for (size_t i = 0; i < claimed.size(); ++i) {
    const ClaimedShard& c = claimed[i];
    const MemoryRef& r = *c.object;
    size_t k;
    if (auto it = by_object.find(&r); it != by_object.end()) {
      k = it->second;
    } else {
      auto [jt, fresh] = by_name.try_emplace({r.kind, r.name, r.cuda_handle, r.device_uuid}, spans.size());
      if (fresh) {
        spans.push_back(Span{r, i, true, nullptr});
        spans.back().ref.offset = c.offset;
        spans.back().ref.length = 0;
      }
      k = jt->second;
      by_object.emplace(&r, k);
    }
    of[i] = k;
    Span& sp = spans[k];
    uint64_t end;
    if (__builtin_add_overflow(c.offset, c.length, &end)) {
      sp.ok = false;
      continue;
    }
    const uint64_t lo = std::min(sp.ref.offset, c.offset), hi = std::max(sp.ref.offset + sp.ref.length, end);
    sp.ref.offset = lo;
    sp.ref.length = hi - lo;
  }
  for (Span& sp : spans) {
    if (!sp.ok) continue;
    auto m = domain.Map(sp.ref, sync.ShardName(claimed[sp.first].tensor, claimed[sp.first].shard), access);
    if (m.ok()) sp.mapped = std::move(m).value();
  }
  std::vector<std::shared_ptr<Mapping>> out(claimed.size());
  // The slices of each mapped span in one allocation (a layer message may
  // carry thousands of shards of one object).
  std::vector<size_t> start(spans.size() + 1, 0), by_span(claimed.size());  // claimed indices grouped by span
  for (size_t i = 0; i < claimed.size(); ++i) ++start[of[i] + 1];
  for (size_t k = 0; k < spans.size(); ++k) start[k + 1] += start[k];
  {
    std::vector<size_t> next(start.begin(), start.end() - 1);
    for (size_t i = 0; i < claimed.size(); ++i) by_span[next[of[i]]++] = i;
  }
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (size_t k = 0; k < spans.size(); ++k) {
    if (!spans[k].mapped) continue;
    ranges.clear();
    for (size_t n = start[k]; n < start[k + 1]; ++n) {
      const ClaimedShard& c = claimed[by_span[n]];
      ranges.emplace_back(c.offset - spans[k].ref.offset, c.length);
    }
    std::vector<std::shared_ptr<Mapping>> slices = SliceMappings(spans[k].mapped, ranges);
    for (size_t n = start[k]; n < start[k + 1]; ++n) out[by_span[n]] = std::move(slices[n - start[k]]);
  }
  for (size_t i = 0; i < claimed.size(); ++i) {
    if (out[i]) continue;
    MemoryRef ref = *claimed[i].object;
    ref.offset = claimed[i].offset;
    ref.length = claimed[i].length;
    WS_ASSIGN_OR_RETURN(out[i], domain.Map(ref, sync.ShardName(claimed[i].tensor, claimed[i].shard), access));
  }
  return out;
}

Status AbortedError(const SyncSession& sync) { return Aborted(sync.Name() + " was aborted: " + sync.error()); }

RegistryOptions ToRegistryOptions(const CoordinatorOptions& o) {
  RegistryOptions r;
  r.max_engines_per_peer = o.max_engines_per_peer;
  r.limits = o.limits;
  return r;
}

std::shared_ptr<const TransportRegistry> LocalTransports(Executor* executor) {
  auto reg = std::make_shared<TransportRegistry>();
  reg->Add(std::make_shared<LocalTransport>(executor, /*device_memory=*/true));
  return reg;
}

}  // namespace

Coordinator::Coordinator(std::shared_ptr<const LayoutRegistry> layouts, MemoryDomain* domain, Executor* executor,
                         CoordinatorOptions opts)
    : Coordinator(std::move(layouts), domain, LocalTransports(executor), opts) {}

Coordinator::Coordinator(std::shared_ptr<const LayoutRegistry> layouts, MemoryDomain* domain,
                         std::shared_ptr<const TransportRegistry> transports, CoordinatorOptions opts)
    : layouts_(std::move(layouts)),
      domain_(domain),
      transports_(std::move(transports)),
      opts_(opts),
      clock_(opts.clock != nullptr ? *opts.clock : SteadyClock()),
      started_(Clock::now()),
      // Sync ids grow across daemon restarts, so a trainer that still holds an
      // id from before a restart gets NotFound rather than someone else's sync.
      next_sync_id_(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                              std::chrono::system_clock::now().time_since_epoch())
                                              .count())),
      registry_(ToRegistryOptions(opts), RandomHex(8)) {
  housekeeping_ = std::thread([this] { HousekeepingLoop(); });
}

Coordinator::~Coordinator() {
  {
    MutexLock lk(&mu_);
    stop_housekeeping_ = true;
  }
  housekeeping_cv_.notify_all();
  if (housekeeping_.joinable()) housekeeping_.join();
}

void Coordinator::HousekeepingLoop() {
  MutexLock lk(&mu_);
  while (!lk.WaitFor(housekeeping_cv_, opts_.housekeeping_interval, [&] {
    mu_.AssertHeld();
    return stop_housekeeping_;
  })) {
    for (auto* o : opts_.observers) o->Housekeeping();
    if (opts_.progress_timeout.count() > 0) {
      const auto now = clock_.Now();
      std::vector<std::shared_ptr<SyncSession>> idle;
      for (const auto& [id, s] : syncs_)
        if ((s->state() == SyncState::kPlanning || s->state() == SyncState::kStreaming) && s->writers == 0 &&
            now - s->last_activity > opts_.progress_timeout)
          idle.push_back(s);
      for (const auto& s : idle) {
        AbortLocked(*s, fmt::format("no trainer activity for {:.1f} s before Commit (trainer gone or stuck?); "
                                    "see --sync-progress-timeout",
                                    opts_.progress_timeout.count() / 1000.0));
        trim_pending_ = true;
      }
    }
    if (opts_.cluster != nullptr) {
      // A participating node the prober sees down aborts the sync (leader),
      // as does a leader seen down (participant).
      std::vector<std::pair<std::shared_ptr<SyncSession>, std::string>> lost;
      for (const auto& [id, s] : syncs_) {
        if (s->terminal() || s->state() == SyncState::kPlanning) continue;
        std::vector<std::string> nodes = s->leader().empty() ? s->RemoteNodes() : std::vector<std::string>{s->leader()};
        for (const auto& n : nodes) {
          std::string why;
          if (opts_.cluster->Down(n, &why)) {
            lost.emplace_back(s, "node " + n + " is down (peer probe: " + why + ")");
            break;
          }
        }
      }
      for (const auto& [s, why] : lost) AbortLocked(*s, why);
      if (!lost.empty()) trim_pending_ = true;
    }
    const bool trim = trim_pending_, trim_cuda = trim_cuda_pending_;
    trim_pending_ = trim_cuda_pending_ = false;
    lk.Unlock();
    if (trim) domain_->Trim();
    if (trim_cuda) domain_->TrimCuda();
    domain_->TrimStale();
    lk.Lock();
  }
}

Coordinator::TrimGuard::~TrimGuard() {
  bool trim, trim_cuda, trim_heap;
  {
    MutexLock lk(&c->mu_);
    trim = c->trim_pending_;
    trim_cuda = c->trim_cuda_pending_;
    trim_heap = c->heap_trim_pending_;
    c->trim_pending_ = c->trim_cuda_pending_ = c->heap_trim_pending_ = false;
  }
  if (trim) c->domain_->Trim();
  if (trim_cuda) c->domain_->TrimCuda();
  if (trim_heap) ReleaseFreeHeap();
}

// ---------------------------------------------------------------- engines

Status Coordinator::AdmitLocked(const Peer& caller, const std::string& model) const {
  if (shutting_down_) return Unavailable("the daemon is shutting down");
  return registry_.Admit(caller, model);
}

Result<std::string> Coordinator::RegisterEngine(const Peer& caller, EngineRankSpec spec,
                                                std::vector<MemoryRef> memory, EventSink* sink, std::string label) {
  TrimGuard trim{this};  // a refusal after mapping lets the domain drop those objects
  const auto t0 = Clock::now();
  const double cpu0 = ThreadCpuSeconds();
  WS_ASSIGN_OR_RETURN(nlohmann::json cfg, CheckEngineSpec(spec, memory.size(), opts_.limits));
  {
    // Cheap refusals first, before resolving and mapping; re-checked below.
    MutexLock lk(&mu_);
    WS_RETURN_IF_ERROR(AdmitLocked(caller, spec.model));
  }
  WS_ASSIGN_OR_RETURN(RankLayout layout, ResolveEngineLayout(*layouts_, spec, opts_.limits));
  uint64_t bytes = 0;
  auto maps = MapEngineParams(*domain_, spec, memory, caller, &bytes);
  if (!maps.ok()) {
    MutexLock lk(&mu_);
    trim_pending_ = true;
    return maps.status();
  }

  auto e = std::make_shared<Engine>();
  e->label = std::move(label);
  e->layout = std::move(layout);
  e->maps = std::move(maps).value();
  for (const auto& m : e->maps) e->extents.push_back(m->extent());
  e->bytes = bytes;
  e->sink = sink;
  e->spec.params = spec.params;  // for messages of the isolation check; replaced by the whole spec in Add

  MutexLock lk(&mu_);
  Status admitted = AdmitLocked(caller, spec.model);
  auto id = admitted.ok() ? registry_.Add(caller, e, std::move(spec), std::move(cfg)) : Result<std::string>(admitted);
  if (!id.ok()) {
    trim_pending_ = true;
    return id.status();
  }
  spdlog::info("engine registered: {} params={} bytes={} layout={} by {} in {:.3f}s ({:.3f}s CPU)", e->Describe(),
               e->spec.params.size(), e->bytes, e->layout.rule_file, caller.Describe(), Seconds(Clock::now() - t0),
               ThreadCpuSeconds() - cpu0);
  lk.Unlock();
  ReleaseFreeHeap();
  return id;
}

Status Coordinator::UnregisterEngine(const Peer& caller, const std::string& engine_id) {
  TrimGuard trim{this};
  MutexLock lk(&mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<Engine> e, registry_.FindOwned(caller, engine_id, "unregister"));
  e->sink = nullptr;
  registry_.Remove(*e);
  trim_pending_ = true;
  std::shared_ptr<SyncSession> sync;
  if (Model* m = registry_.FindModel(e->spec.model)) {
    // An engine that already acknowledged the version being committed has
    // applied it: its leaving does not undo the commit for the others.
    if (auto sit = syncs_.find(m->busy_sync); sit != syncs_.end() && !sit->second->terminal() &&
                                             !(sit->second->state() == SyncState::kCommitting &&
                                               sit->second->acked.count(e->id)))
      sync = sit->second;
    else if (m->engine_count == 0 && m->busy_sync == 0)
      registry_.ReleaseModel(e->spec.model, 0);  // drops it: no engines, no sync
  }
  // Aborting releases the model (and drops it when it has no engines left).
  if (sync) AbortLocked(*sync, e->Describe() + " unregistered");
  DropKeptIfGoneLocked(e->spec.model);
  spdlog::info("engine unregistered: {}", e->Describe());
  return Status::Ok();
}

// ---------------------------------------------------------------- sync bookkeeping

void Coordinator::EmitLocked(const SyncSession& sync, EngineEvent::Kind kind, const std::string& reason) {
  EngineEvent ev;
  ev.kind = kind;
  ev.sync_id = sync.id();
  ev.version = sync.version();
  ev.reason = reason;
  for (const auto& e : sync.engines())
    if (e->sink) e->sink->Deliver(ev);
}

void Coordinator::FinishLocked(SyncSession& sync, bool committed, const std::string& reason) {
  sync.Finish(committed, reason);
  SyncStats st = sync.Stats();
  if (!committed && opts_.cluster != nullptr && sync.leader().empty()) {
    std::vector<std::string> nodes = sync.RemoteNodes();
    if (!nodes.empty()) opts_.cluster->AbortAsync(std::move(nodes), sync.id(), sync.error());
  } else if (!committed && opts_.cluster != nullptr && !sync.abort_from_peer) {
    // Failed here (a push of a rank of this node, a receive, the idle
    // timeout): the leader aborts it on every node.
    opts_.cluster->AbortAsync({sync.leader()}, sync.id(), sync.error());
  }
  if (committed) {
    ++syncs_committed_;
    if (Model* m = registry_.FindModel(sync.model())) m->committed_version = sync.version();
  } else {
    ++syncs_aborted_;
  }
  last_sync_ = st;
  for (auto* o : opts_.observers) o->SyncFinished(st, committed);
  finished_[sync.id()] = FinishedSync{sync.state(), sync.error(), sync.owner()};
  while (finished_.size() > 64) finished_.erase(finished_.begin());
  // The one summary line per sync.
  auto line = fmt::format(
      "sync {} model={} version={} engines={} world_size={} bytes={} copy_ops_run={} groups_chained={} "
      "groups_walked={} seconds={:.3f} gbps={:.3f} outcome={}",
      sync.id(), st.model, st.version, st.engines, st.world_size, st.bytes_written, sync.ops_run, sync.groups_chained,
      sync.groups_walked, st.seconds, st.gbps, st.state);
  if (committed)
    spdlog::info("{}", line);
  else
    spdlog::warn("{} error={}", line, LogQuote(st.error));
  ReleaseIfIdleLocked(sync);
  cv_.notify_all();
}

void Coordinator::AbortLocked(SyncSession& sync, const std::string& reason) {
  if (sync.terminal()) return;
  FinishLocked(sync, /*committed=*/false, reason);
}

// A finished sync gives its model back once nothing writes engine memory any
// more; only then do engines hear Aborted.
void Coordinator::ReleaseIfIdleLocked(SyncSession& sync) {
  if (!sync.terminal() || sync.writers > 0) return;
  const bool aborted = sync.state() == SyncState::kAborted;
  if (aborted) trim_pending_ = true;
  trim_cuda_pending_ = true;  // the trainer may free its memory now
  if (aborted && sync.started_sent && !sync.aborted_sent) {
    sync.aborted_sent = true;
    EmitLocked(sync, EngineEvent::Kind::kAborted, sync.error());
  }
  registry_.ReleaseModel(sync.model(), sync.id());
  DropKeptIfGoneLocked(sync.model());
  const uint64_t id = sync.id();
  syncs_.erase(id);  // may destroy `sync` unless the caller holds a reference
  cv_.notify_all();
}

Result<std::shared_ptr<SyncSession>> Coordinator::FindOwnedLocked(const Peer& caller, uint64_t sync_id,
                                                                  const char* action) {
  // Ownership first: a peer learns nothing about other principals' syncs.
  std::string owner;
  if (auto it = syncs_.find(sync_id); it != syncs_.end()) owner = it->second->owner();
  else if (auto f = finished_.find(sync_id); f != finished_.end()) owner = f->second.owner;
  if (!owner.empty() && !caller.Owns(owner))
    return PermissionDenied("sync " + std::to_string(sync_id) + " belongs to " + owner + "; " + caller.Describe() +
                            " (" + caller.principal + ") may not " + action + " it");
  return FindLiveLocked(sync_id);
}

Result<std::shared_ptr<SyncSession>> Coordinator::FindLiveLocked(uint64_t sync_id) {
  const std::string name = "sync " + std::to_string(sync_id);
  if (auto it = syncs_.find(sync_id); it != syncs_.end()) {
    if (!it->second->terminal()) return it->second;
    return AbortedError(*it->second);  // still draining its copies
  }
  if (auto f = finished_.find(sync_id); f != finished_.end()) {
    if (f->second.state == SyncState::kAborted) return Aborted(name + " was aborted: " + f->second.error);
    return FailedPrecondition(name + " is already committed");
  }
  return NotFound(name + " is not in flight on this daemon");
}

// ---------------------------------------------------------------- BeginSync

void Coordinator::DropKeptIfGoneLocked(const std::string& model) {
  if (!registry_.FindModel(model)) kept_.erase(model);
}

Result<std::shared_ptr<SyncSession>> Coordinator::ReserveSyncLocked(const Peer& caller,
                                                                    std::shared_ptr<const IndexedManifest> manifest,
                                                                    uint64_t version,
                                                                    std::vector<std::shared_ptr<Engine>> remote) {
  if (shutting_down_) return Unavailable("the daemon is shutting down");
  const std::string& model = manifest->manifest.model;
  Model* m = registry_.FindModel(model);
  const bool local = m != nullptr && m->engine_count > 0;
  if (!local && remote.empty())
    return FailedPrecondition("no engines registered for model " + model +
                              (opts_.cluster != nullptr ? " on this node or any up peer" : ""));
  if (local) {
    if (!caller.Owns(m->owner))
      return PermissionDenied("model " + m->name + " belongs to " + m->owner + "; " + caller.Describe() + " (" +
                              caller.principal + ") may not sync it");
    if (version <= m->committed_version)
      return FailedPrecondition("model " + m->name + ": version " + std::to_string(version) +
                                " is not above the committed version " + std::to_string(m->committed_version) +
                                "; versions must strictly increase");
  }
  uint32_t mine = 0;
  for (const auto& [id, s] : syncs_) mine += s->owner() == caller.principal ? 1 : 0;
  if (mine >= opts_.max_syncs_per_peer)
    return ResourceExhausted(caller.Describe() + " (" + caller.principal + ") already has " + std::to_string(mine) +
                             " syncs in flight (limit max_syncs_per_peer = " +
                             std::to_string(opts_.max_syncs_per_peer) + ")");
  if (local && m->busy_sync) {
    auto sit = syncs_.find(m->busy_sync);
    std::string what = sit != syncs_.end() && sit->second->terminal()
                           ? " is still finishing its copies after an abort"
                           : " is in flight";
    return FailedPrecondition("model " + m->name + ": sync " + std::to_string(m->busy_sync) + what +
                              "; one sync per model at a time");
  }
  std::vector<std::shared_ptr<Engine>> engines;
  if (local) {
    WS_ASSIGN_OR_RETURN(engines, registry_.CompleteEngines(*m));
  }
  for (auto& e : remote) engines.push_back(std::move(e));
  auto sync =
      std::make_shared<SyncSession>(next_sync_id_++, caller.principal, version, std::move(manifest), std::move(engines));
  sync->last_activity = clock_.Now();
  if (local) m->busy_sync = sync->id();
  syncs_[sync->id()] = sync;
  return sync;
}

Result<std::shared_ptr<Engine>> Coordinator::RemoteEngineOf(const RemoteEngine& r) const {
  auto e = std::make_shared<Engine>();
  e->id = r.engine_id;
  e->node = r.node;
  e->remote_memory = r.memory;
  e->remote_device = r.memory == MemoryKind::kCudaIpc ? r.device_uuid : "";
  e->spec = r.spec;
  auto layout = ResolveEngineLayout(*layouts_, r.spec, opts_.limits);
  if (!layout.ok())
    return layout.status().WithContext("node " + r.node + " engine " + r.engine_id + " (" + DescribeRank(r.spec) + ")");
  e->layout = std::move(layout).value();
  for (const auto& p : r.spec.params) e->bytes += ElemBytes(static_cast<uint64_t>(NumElements(p.shape)), p.dtype);
  return e;
}

Status Coordinator::CheckRankNodes(uint32_t world_size, std::vector<std::string>* rank_nodes) const {
  if (rank_nodes->empty()) return Status::Ok();
  if (rank_nodes->size() != world_size)
    return InvalidArgument("rank_nodes names " + std::to_string(rank_nodes->size()) + " nodes for world_size " +
                           std::to_string(world_size) + "; one per rank, or none");
  const std::string self = opts_.cluster != nullptr ? opts_.cluster->self() : "";
  std::set<std::string> up;
  if (opts_.cluster != nullptr)
    for (auto& n : opts_.cluster->UpPeers()) up.insert(std::move(n));
  bool all_here = true;
  for (size_t r = 0; r < rank_nodes->size(); ++r) {
    std::string& n = (*rank_nodes)[r];
    if (n.empty()) n = self;  // "" = this daemon
    if (n == self) continue;
    all_here = false;
    if (opts_.cluster == nullptr)
      return FailedPrecondition("trainer rank " + std::to_string(r) + " pushes to node " + n +
                                ", but this daemon has no peers (--peer)");
    if (!up.count(n))
      return Unavailable("trainer rank " + std::to_string(r) + " pushes to node " + n + ", which is not an up peer of node " +
                         self + " (see status)");
  }
  if (all_here) rank_nodes->clear();  // today's single-daemon trainer
  return Status::Ok();
}

Result<std::vector<std::shared_ptr<Engine>>> Coordinator::RemoteEngines(const std::string& model) {
  std::vector<std::shared_ptr<Engine>> out;
  for (const std::string& node : opts_.cluster->UpPeers()) {
    auto got = opts_.cluster->Prepare(node, model);
    if (!got.ok() && got.status().code() == Code::kUnimplemented) {
      spdlog::debug("node {} takes part in no sync across nodes (older daemon): {}", node, got.status().message());
      continue;
    }
    if (!got.ok()) return got.status().WithContext("preparing the sync");
    for (const RemoteEngine& r : *got) {
      if (r.node != node || r.spec.model != model)
        return FailedPrecondition("node " + node + " answered with engine " + r.engine_id + " of node " + r.node +
                                  ", model " + r.spec.model);
      WS_ASSIGN_OR_RETURN(auto e, RemoteEngineOf(r));
      out.push_back(std::move(e));
    }
  }
  return out;
}

Status Coordinator::StartRemote(SyncSession& sync, const ReadyPlan& ready) {
  const SyncPlan& plan = ready.plan;
  const std::string& self = opts_.cluster->self();
  std::vector<std::vector<DType>> dtypes;
  RemoteStart rs;
  rs.leader = self;
  rs.sync_id = sync.id();
  rs.owner = sync.owner();
  rs.rank_nodes = sync.rank_nodes();
  rs.manifest = sync.manifest();
  rs.manifest.version = sync.version();  // a reused manifest carries the version it was first sent with
  rs.manifest.fingerprint.clear();
  rs.manifest.reuse_manifest = false;
  for (size_t t = 0; t < rs.manifest.tensors.size(); ++t) rs.manifest.tensors[t].dtype = ready.wire[t];
  rs.manifest.negotiate_dtypes = false;  // the tensors carry the wire dtypes now
  rs.chunk_bytes = std::max<uint64_t>(1, std::min(opts_.max_chunk_bytes, opts_.cluster->staging_bytes()));
  rs.copy_ops = plan.copies.size();
  rs.bytes_planned = plan.bytes_written;
  const std::vector<std::string> nodes = sync.EngineNodes(self);
  for (size_t i = 0; i < sync.engines().size(); ++i) {
    const Engine& e = *sync.engines()[i];
    std::vector<DType> d;
    for (const auto& p : e.spec.params) d.push_back(p.dtype);
    dtypes.push_back(std::move(d));
    rs.engines.push_back(Describe(e, nodes[i]));
  }
  sync.SetPack(cluster::BuildPackPlan(plan, nodes, dtypes, sync.ShardNodes(plan), rs.chunk_bytes));
  std::vector<std::string> started;
  for (const std::string& node : sync.RemoteNodes()) {
    if (Status st = opts_.cluster->Start(node, rs); !st.ok()) {
      if (!started.empty())
        opts_.cluster->AbortAsync(started, sync.id(), "node " + node + " refused the sync: " + st.message());
      return st.WithContext("starting the sync");
    }
    started.push_back(node);
  }
  for (const auto& [node, np] : sync.pack().nodes)
    spdlog::debug("sync {}: node {} gets {} chunks, {} bytes ({} payload) for {} engine bytes", sync.id(), node,
                  np.chunks.size(), np.bytes, np.payload_bytes, np.scatter_bytes);
  return Status::Ok();
}

Result<BeginSyncResult> Coordinator::StartSyncLocked(const std::shared_ptr<SyncSession>& sync,
                                                     Result<std::shared_ptr<const ReadyPlan>> plan, bool plan_reused,
                                                     bool manifest_reused) {
  const SourceManifest& mf = sync->manifest();
  if (sync->state() == SyncState::kAborted) return AbortedError(*sync);  // an engine left while planning
  if (!plan.ok()) {
    // Refused: it never started, nothing was written, engines heard nothing.
    registry_.ReleaseModel(mf.model, sync->id());
    syncs_.erase(sync->id());
    cv_.notify_all();
    Status st = plan.status().WithContext("model " + mf.model + " version " + std::to_string(sync->version()));
    spdlog::warn("BeginSync refused: {}", LogQuote(st.message()));
    return st;
  }
  std::shared_ptr<const ReadyPlan> ready = std::move(plan).value();
  // Plans over other nodes' engines are not kept: those engines are remade at
  // every BeginSync, so such a plan could never be reused (and a participant
  // keeps nothing: its manifest carries the leader's wire dtypes).
  if (sync->leader().empty())
    kept_[mf.model] = KeptPlan{sync->indexed_manifest(), sync->RemoteNodes().empty() ? ready : nullptr};
  sync->StartStreaming(ready);
  sync->started_sent = true;
  EmitLocked(*sync, EngineEvent::Kind::kStarted);
  spdlog::debug("sync {} begun: model={} version={} engines={} world_size={} copy_ops={} bytes_planned={} "
                "plan_reused={} manifest_reused={}",
                sync->id(), mf.model, sync->version(), sync->engines().size(), mf.world_size,
                sync->plan().copies.size(), sync->plan().bytes_written, plan_reused, manifest_reused);
  BeginSyncResult r;
  r.sync_id = sync->id();
  r.engines = static_cast<uint32_t>(sync->engines().size());
  r.copy_ops = sync->plan().copies.size();
  r.bytes_planned = sync->plan().bytes_written;
  if (!(plan_reused && manifest_reused)) r.dtypes = ready->dtypes;
  r.plan_reused = plan_reused;
  r.manifest_reused = manifest_reused;
  return r;
}

Result<BeginSyncResult> Coordinator::BeginSync(const Peer& caller, SourceManifest manifest) {
  if (manifest.model.empty()) return InvalidArgument("model is empty");
  if (manifest.world_size == 0) return InvalidArgument("world_size must be at least 1");
  if (manifest.version == 0) return InvalidArgument("version must be at least 1");
  if (manifest.reuse_manifest && manifest.fingerprint.empty())
    return InvalidArgument("reuse_manifest needs a manifest_fingerprint");
  if (manifest.reuse_manifest && !manifest.tensors.empty())
    return InvalidArgument("reuse_manifest is set, but the request carries " + std::to_string(manifest.tensors.size()) +
                           " tensors; send either the manifest or its fingerprint with reuse_manifest");
  std::vector<std::string> rank_nodes = std::move(manifest.rank_nodes);
  manifest.rank_nodes.clear();  // per sync: not part of the manifest kept for reuse
  WS_RETURN_IF_ERROR(CheckRankNodes(manifest.world_size, &rank_nodes));
  const uint64_t version = manifest.version;
  const bool reuse = manifest.reuse_manifest, negotiate = manifest.negotiate_dtypes;
  const uint32_t world_size = manifest.world_size;
  const std::string model = manifest.model, fingerprint = manifest.fingerprint;
  // Across nodes: the engines of every up peer too (asked without the lock).
  std::vector<std::shared_ptr<Engine>> remote;
  if (opts_.cluster != nullptr) {
    WS_ASSIGN_OR_RETURN(remote, RemoteEngines(model));
  }
  // A manifest sent in full is indexed before taking the lock.
  std::shared_ptr<const IndexedManifest> sent;
  if (!reuse) sent = IndexManifest(std::move(manifest), fingerprint);
  std::shared_ptr<SyncSession> sync;
  std::shared_ptr<const ReadyPlan> plan;
  bool manifest_reused = false;
  {
    MutexLock lk(&mu_);
    KeptPlan kept;
    if (auto it = kept_.find(model); it != kept_.end()) kept = it->second;
    std::shared_ptr<const IndexedManifest> use = sent;
    if (reuse) {
      const bool match = kept.manifest && kept.manifest->fingerprint == fingerprint &&
                         kept.manifest->manifest.world_size == world_size &&
                         kept.manifest->manifest.negotiate_dtypes == negotiate;
      if (!match)
        return NotFound("model " + model + ": no manifest is kept under fingerprint " + Truncate(fingerprint, 64) +
                        " with world_size " + std::to_string(world_size) +
                        " (first sync, daemon restart, or another manifest since); send the manifest in full");
      use = kept.manifest;
      manifest_reused = true;
    } else if (kept.manifest && SameManifest(kept.manifest->manifest, sent->manifest) &&
               kept.manifest->fingerprint == sent->fingerprint) {
      use = kept.manifest;  // the same manifest again: its plan may be reused
    }
    WS_ASSIGN_OR_RETURN(sync, ReserveSyncLocked(caller, use, version, std::move(remote)));
    if (opts_.cluster != nullptr) {
      sync->SetLeader(opts_.cluster->self(), "");
      sync->SetRankNodes(std::move(rank_nodes));
    }
    // Plans are reused for single-node syncs only (see StartSyncLocked).
    if (kept.plan && kept.manifest == use && sync->RemoteNodes().empty() && kept.plan->Fits(sync->engines()))
      plan = kept.plan;
  }
  // Plan without the lock. Engine specs and layouts are immutable after
  // registration; until the sync streams, only this thread reads the plan.
  const bool plan_reused = plan != nullptr;
  Status backed = sync->CheckEnginesBacked();
  Result<std::shared_ptr<const ReadyPlan>> ready =
      !backed.ok() ? Result<std::shared_ptr<const ReadyPlan>>(backed)
      : plan_reused ? Result<std::shared_ptr<const ReadyPlan>>(plan)
                    : MakeReadyPlan(sync->manifest(), sync->engines());
  if (ready.ok() && !sync->RemoteNodes().empty())
    if (Status st = StartRemote(*sync, **ready); !st.ok()) ready = st;
  std::optional<Result<BeginSyncResult>> r;
  {
    MutexLock lk(&mu_);
    r.emplace(StartSyncLocked(sync, std::move(ready), plan_reused, manifest_reused));
    if (!plan_reused) heap_trim_pending_ = true;
  }
  if (!plan_reused) ReleaseFreeHeap();  // planning's tables, and the plan this one replaced
  return std::move(*r);
}

// ---------------------------------------------------------------- PushLayer

Result<std::vector<ClaimedShard>> Coordinator::ClaimLayerLocked(SyncSession& sync, uint32_t rank,
                                                                const LayerShards& shards, const std::string& where) {
  auto fail = [&](Status st) {
    mu_.AssertHeld();
    AbortLocked(sync, st.message());
    return st;
  };
  if (sync.state() == SyncState::kCommitting)  // refuse, but the commit stands
    return FailedPrecondition(where + ": arrived after Commit; no more layers are accepted");
  if (sync.state() != SyncState::kStreaming)
    return fail(FailedPrecondition(where + ": arrived after Commit; no more layers are accepted"));
  sync.last_activity = clock_.Now();
  const uint32_t world_size = sync.manifest().world_size;
  if (rank >= world_size)
    return fail(InvalidArgument(where + ": rank is not below world_size " + std::to_string(world_size)));
  if (!sync.RankHere(rank))
    return fail(InvalidArgument(where + ": trainer rank " + std::to_string(rank) + " pushes to node " +
                                sync.RankNode(rank) + "'s daemon (BeginSync rank_nodes), not to node " +
                                sync.self_node() + "'s"));
  auto claimed = sync.ClaimShards(rank, shards, where);
  if (!claimed.ok()) return fail(claimed.status());
  sync.writers++;
  return claimed;
}

Status Coordinator::EndWrite(SyncSession& sync, Status st, const BoundOps* ran, uint64_t written) {
  MutexLock lk(&mu_);
  if (ran != nullptr && st.ok()) {
    sync.bytes_written += written;
    sync.bytes_read += ran->bytes_read;
    sync.ops_run += ran->ops.size();
    sync.groups_chained += ran->groups_chained;
    sync.groups_walked += ran->groups_walked;
  }
  sync.writers--;
  sync.last_activity = clock_.Now();
  if (!st.ok()) AbortLocked(sync, st.message());
  ReleaseIfIdleLocked(sync);
  cv_.notify_all();
  if (st.ok() && sync.state() == SyncState::kAborted) return AbortedError(sync);
  return st;
}

Result<LayerResult> Coordinator::PushLayer(const Peer& caller, uint64_t sync_id, uint32_t rank,
                                           const std::string& layer, const LayerShards& shards) {
  TrimGuard trim{this};
  const std::string where = "sync " + std::to_string(sync_id) + " rank " + std::to_string(rank) + " layer \"" +
                            layer + "\"";
  std::shared_ptr<SyncSession> sync;
  std::vector<ClaimedShard> claimed;
  {
    MutexLock lk(&mu_);
    WS_ASSIGN_OR_RETURN(sync, FindOwnedLocked(caller, sync_id, "push layers to"));
    WS_ASSIGN_OR_RETURN(claimed, ClaimLayerLocked(*sync, rank, shards, where));
  }

  // Map every shard of the layer (as the caller) before any byte moves.
  auto src = MapShards(*domain_, *sync, claimed, caller.ToAccessor());
  if (!src.ok()) return EndWrite(*sync, src.status().WithContext(where));
  auto bound = sync->BindLayer(claimed, *src, where);
  if (!bound.ok()) return EndWrite(*sync, bound.status());
  {
    MutexLock lk(&mu_);
    Status paused = sync->state() == SyncState::kAborted
                        ? AbortedError(*sync)  // aborted while we mapped: write nothing
                        : AwaitPausedLocked(lk, *sync, bound->in_place_engines, where);
    if (!paused.ok()) {
      sync->writers--;
      ReleaseIfIdleLocked(*sync);
      return paused;
    }
  }
  auto t0 = Clock::now();
  auto ran = transports_->Copy(*bound);
  if (ran.ok() && !sync->pack().nodes.empty()) {  // other nodes' engines: packed and sent
    auto sent = SendRemote(*sync, claimed, *src, where);
    ran = sent.ok() ? Result<uint64_t>(*ran + *sent) : Result<uint64_t>(sent.status());
  }
  double secs = Seconds(Clock::now() - t0);
  if (!ran.ok()) return EndWrite(*sync, ran.status().WithContext(where));
  WS_RETURN_IF_ERROR(EndWrite(*sync, Status::Ok(), &*bound, ran.value()));
  spdlog::trace("{}: {} shards, {} bytes in {:.4f}s", where, claimed.size(), ran.value(), secs);
  return LayerResult{layer, ran.value(), secs};
}

Result<std::vector<Coordinator::ChunkPath>> Coordinator::ChunkPaths(
    const SyncSession& sync, const std::string& node, const std::vector<ClaimedShard>& claimed,
    const std::vector<std::shared_ptr<Mapping>>& src, const std::vector<uint32_t>& chunks) const {
  const cluster::NodePack& np = sync.pack().nodes.at(node);
  std::map<std::pair<uint32_t, uint32_t>, size_t> source;  // (tensor, shard) -> claimed index
  for (size_t i = 0; i < claimed.size(); ++i) source[{claimed[i].tensor, claimed[i].shard}] = i;
  std::vector<ChunkPath> out;
  std::map<std::tuple<std::string, std::string, std::string>, size_t> index;  // (transport, devices) -> out
  std::map<int, std::string> uuids;  // source device ordinal -> UUID ("" = none)
  for (uint32_t c : chunks) {
    const cluster::PackChunk& ch = np.chunks[c];
    const Mapping& m = *src[source.at({ch.tensor, ch.shard})];
    // Its scatter targets: one device of that node, or host staging.
    std::string dst_device;
    bool device_dst = true;
    for (const cluster::PackSegment& seg : ch.segments)
      for (uint32_t ci : seg.copies) {
        const Engine& e = *sync.engines()[sync.plan().copies[ci].engine];
        if (e.remote_memory != MemoryKind::kCudaIpc || e.remote_device.empty() ||
            (!dst_device.empty() && dst_device != e.remote_device))
          device_dst = false;
        dst_device = e.remote_device;
      }
    DeviceTransfer t;
    const Route route{m.kind(), device_dst ? MemoryKind::kCudaIpc : MemoryKind::kHostShm, /*same_node=*/false};
    WS_ASSIGN_OR_RETURN(std::string transport, opts_.cluster->ChunkTransport(route));
    if (transport != "ucx" && opts_.device_staging != nullptr && m.kind() == MemoryKind::kCudaIpc && device_dst) {
      auto [it, fresh] = uuids.try_emplace(m.device());
      if (fresh) {
        auto u = opts_.device_staging->DeviceUuid(m.device());
        if (u.ok()) it->second = *u;
      }
      if (!it->second.empty()) {
        t.transport = transport;
        t.sender_device = it->second;
        t.receiver_device = dst_device;
      }
    }
    auto [at, added] = index.try_emplace({t.transport, t.sender_device, t.receiver_device}, out.size());
    if (added) out.push_back(ChunkPath{t, {}});
    out[at->second].chunks.push_back(c);
  }
  return out;
}

Result<uint64_t> Coordinator::SendRemote(SyncSession& sync, const std::vector<ClaimedShard>& claimed,
                                         const std::vector<std::shared_ptr<Mapping>>& src, const std::string& where) {
  const uint64_t staging = opts_.cluster->staging_bytes();
  const std::string& leader = sync.leader().empty() ? sync.self_node() : sync.leader();
  uint64_t written = 0;
  for (const auto& entry : sync.pack().nodes) {
    const std::string& node = entry.first;  // named, not bound: the lambdas below capture them
    const cluster::NodePack& np = entry.second;
    const std::vector<uint32_t> chunks = sync.ChunksOf(node, claimed);
    if (chunks.empty()) continue;
    std::vector<uint64_t> chunk_bytes(np.chunks.size());
    for (size_t c = 0; c < np.chunks.size(); ++c) chunk_bytes[c] = np.chunks[c].bytes;
    WS_ASSIGN_OR_RETURN(std::vector<ChunkPath> paths, ChunkPaths(sync, node, claimed, src, chunks));
    for (const ChunkPath& path : paths) {
      const bool device = !path.device.transport.empty();
      // Windows of whole chunks of at most half the staging bound, so window
      // k+1 is packed while window k is in flight (a chunk is never larger
      // than the bound, unless one row is; then windows go one at a time).
      const std::vector<cluster::Window> windows =
          cluster::SplitWindows(path.chunks, chunk_bytes, std::max<uint64_t>(1, staging / 2));
      std::shared_ptr<Mapping> slot[2];
      auto pack = [&](size_t k, int s) -> Status {
        {
          MutexLock lk(&mu_);
          if (sync.terminal()) return AbortedError(sync);  // sends nothing for a sync the nodes dropped
        }
        const cluster::Window& w = windows[k];
        slot[s].reset();
        if (device) {
          WS_ASSIGN_OR_RETURN(slot[s], opts_.device_staging->Allocate(path.device.sender_device, w.bytes));
        } else {
          WS_ASSIGN_OR_RETURN(std::shared_ptr<HostBuffer> buf, HostBuffer::Create(w.bytes));
          slot[s] = std::move(buf);
        }
        WS_ASSIGN_OR_RETURN(BoundOps ops, sync.BindPack(node, claimed, src, w.chunks, *slot[s], w.offsets, where));
        return transports_->Copy(ops).status();
      };
      auto send = [&](size_t k, int s) -> Status {
        const cluster::Window& w = windows[k];
        std::vector<ChunkBuffer> out;
        for (size_t i = 0; i < w.chunks.size(); ++i)
          out.push_back(ChunkBuffer{w.chunks[i], static_cast<char*>(slot[s]->data()) + w.offsets[i],
                                    np.chunks[w.chunks[i]].bytes});
        auto sent = device ? opts_.cluster->SendDevice(node, leader, sync.id(), out, path.device)
                           : opts_.cluster->Send(node, leader, sync.id(), out);
        if (!sent.ok()) return sent.status();
        written += *sent;
        return Status::Ok();
      };
      WS_RETURN_IF_ERROR(cluster::RunWindows(windows, staging, pack, send));
    }
  }
  return written;
}

// ---------------------------------------------------------------- Commit

Status Coordinator::AwaitPausedLocked(MutexLock& lk, SyncSession& sync, const std::set<uint32_t>& engines,
                                      const std::string& where) {
  auto all_paused = [&] {
    mu_.AssertHeld();
    return sync.terminal() || sync.Unpaused(engines).empty();
  };
  if (all_paused() && !sync.terminal()) return Status::Ok();
  const auto timeout = opts_.progress_timeout.count() > 0 ? opts_.progress_timeout : opts_.ack_timeout;
  bool done = lk.WaitUntil(cv_, Clock::now() + timeout, all_paused);
  if (sync.state() == SyncState::kAborted) return AbortedError(sync);
  if (done) return Status::Ok();
  std::string msg = fmt::format("{}: no AckPaused within {:.1f} s of started from {}: in-place writes into an engine "
                                "wait until it paused",
                                where, timeout.count() / 1000.0, sync.Unpaused(engines));
  AbortLocked(sync, msg);
  return DeadlineExceeded(msg);
}

Status Coordinator::ZeroFillLocked(MutexLock& lk, SyncSession& sync) {
  if (sync.plan().zeros.empty()) return Status::Ok();
  auto bound = sync.BindZeroFills();
  if (!bound.ok()) {
    AbortLocked(sync, bound.status().message());
    return bound.status();
  }
  sync.writers++;
  if (Status paused = AwaitPausedLocked(lk, sync, bound->in_place_engines, sync.Name() + " zero fills");
      !paused.ok()) {
    sync.writers--;
    ReleaseIfIdleLocked(sync);
    return paused;
  }
  mu_.Unlock();
  auto ran = transports_->Copy(*bound);
  mu_.Lock();
  sync.writers--;
  if (ran.ok()) sync.bytes_written += ran.value();
  if (!ran.ok()) AbortLocked(sync, ran.status().WithContext(sync.Name()).message());
  ReleaseIfIdleLocked(sync);
  if (sync.state() == SyncState::kAborted) return AbortedError(sync);
  return Status::Ok();
}

Status Coordinator::AwaitAcksLocked(MutexLock& lk, SyncSession& sync) {
  EmitLocked(sync, EngineEvent::Kind::kCommitted);
  for (const auto& e : sync.engines())
    if (e->local()) sync.pending_acks.insert(e->id);  // other nodes wait for theirs (PeerCommit)
  auto deadline = Clock::now() + opts_.ack_timeout;
  bool done = lk.WaitUntil(cv_, deadline, [&] {
    mu_.AssertHeld();
    return sync.pending_acks.empty() || sync.terminal();
  });
  if (sync.state() == SyncState::kAborted) return AbortedError(sync);
  if (done) return Status::Ok();
  std::string who;
  for (const auto& e : sync.engines())
    if (sync.pending_acks.count(e->id)) who += (who.empty() ? "" : ", ") + e->Describe();
  std::ostringstream msg;
  msg << sync.Name() << ": no AckVersion for version " << sync.version() << " within "
      << opts_.ack_timeout.count() / 1000.0 << " s from " << who;
  AbortLocked(sync, msg.str());
  return DeadlineExceeded(msg.str());
}

Result<SyncStats> Coordinator::Commit(const Peer& caller, uint64_t sync_id) {
  TrimGuard trim{this};
  MutexLock lk(&mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<SyncSession> sync, FindOwnedLocked(caller, sync_id, "commit"));
  if (sync->state() != SyncState::kStreaming)
    return FailedPrecondition(sync->Name() + " is " + SyncStateName(sync->state()) +
                              "; Commit is accepted once, while streaming");
  sync->StartCommitting();
  lk.Wait(cv_, [&] {
    mu_.AssertHeld();
    return sync->writers == 0 || sync->terminal();
  });
  if (sync->state() == SyncState::kAborted) return AbortedError(*sync);
  if (std::string missing = sync->MissingShards(); !missing.empty()) {
    AbortLocked(*sync, missing);
    return FailedPrecondition(missing);
  }
  // Other nodes commit their engines meanwhile; each returns once all its
  // engines acknowledged and its trainer ranks' shards all arrived. A node
  // that fails aborts the sync at once (this node stops waiting for acks).
  std::vector<std::pair<std::string, std::future<Status>>> remote;
  for (const std::string& node : sync->RemoteNodes())
    remote.emplace_back(node, std::async(std::launch::async, [this, node, sync] {
                          Status st = opts_.cluster->Commit(node, sync->id());
                          if (!st.ok()) {
                            MutexLock l(&mu_);
                            AbortLocked(*sync, st.WithContext(sync->Name()).message());
                          }
                          return st;
                        }));
  Status local = ZeroFillLocked(lk, *sync);  // vocab padding rows
  if (local.ok()) local = AwaitAcksLocked(lk, *sync);
  if (!remote.empty()) {
    std::vector<Status> got;
    lk.Unlock();
    for (auto& [node, f] : remote) got.push_back(f.get());
    lk.Lock();
    for (const Status& st : got)
      if (!st.ok()) return st.WithContext(sync->Name());  // the failing node's own reason
  }
  if (!local.ok()) return local;
  if (sync->terminal()) return AbortedError(*sync);
  FinishLocked(*sync, /*committed=*/true);
  return sync->Stats();
}

// ---------------------------------------------------------------- the rest

Status Coordinator::Abort(const Peer& caller, uint64_t sync_id, const std::string& reason) {
  TrimGuard trim{this};
  MutexLock lk(&mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<SyncSession> sync, FindOwnedLocked(caller, sync_id, "abort"));
  AbortLocked(*sync, reason.empty() ? std::string("aborted (no reason given)") : reason);
  return Status::Ok();
}

Status Coordinator::AckVersion(const Peer& caller, const std::string& engine_id, uint64_t version, bool ok,
                               const std::string& error) {
  TrimGuard trim{this};
  MutexLock lk(&mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<Engine> owned,
                      registry_.FindOwned(caller, engine_id, "acknowledge versions for"));
  Engine& e = *owned;
  std::shared_ptr<SyncSession> sync;
  if (Model* m = registry_.FindModel(e.spec.model); m && m->busy_sync)
    if (auto sit = syncs_.find(m->busy_sync); sit != syncs_.end()) sync = sit->second;
  if (!sync || sync->state() != SyncState::kCommitting || sync->version() != version ||
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

Status Coordinator::AckPaused(const Peer& caller, const std::string& engine_id, uint64_t sync_id) {
  MutexLock lk(&mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<Engine> owned, registry_.FindOwned(caller, engine_id, "acknowledge pauses for"));
  auto it = syncs_.find(sync_id);
  if (it == syncs_.end() || it->second->terminal() || !it->second->MarkPaused(engine_id))
    return FailedPrecondition(owned->Describe() + ": sync " + std::to_string(sync_id) +
                              " is not in flight with this engine; nothing waits for its pause");
  cv_.notify_all();
  return Status::Ok();
}

void Coordinator::TrainerStreamClosed(const Peer& caller, uint64_t sync_id, uint32_t rank, bool clean) {
  TrimGuard trim{this};
  if (clean) return;
  MutexLock lk(&mu_);
  auto it = syncs_.find(sync_id);
  if (it == syncs_.end() || !caller.Owns(it->second->owner())) return;
  std::shared_ptr<SyncSession> sync = it->second;
  if (sync->state() == SyncState::kStreaming || sync->state() == SyncState::kPlanning)
    AbortLocked(*sync, "trainer rank " + std::to_string(rank) + " disconnected");
}

void Coordinator::AbortAll(const std::string& reason, std::chrono::milliseconds drain) {
  TrimGuard trim{this};
  MutexLock lk(&mu_);
  shutting_down_ = true;
  std::vector<std::shared_ptr<SyncSession>> live;
  for (const auto& [id, s] : syncs_) live.push_back(s);
  for (const auto& s : live) AbortLocked(*s, reason);
  cv_.notify_all();
  // Aborted is sent once a sync's running copies have finished; wait for that
  // (bounded) so engines hear it before the caller closes their streams.
  lk.WaitFor(cv_, drain, [&] {
    mu_.AssertHeld();
    for (const auto& s : live)
      if (s->writers > 0) return false;
    return true;
  });
}

// ---------------------------------------------------------------- across nodes (participant)

Result<std::vector<RemoteEngine>> Coordinator::PeerPrepare(const std::string& model) const {
  if (opts_.cluster == nullptr) return FailedPrecondition("this daemon has no peers (--peer): it joins no sync across nodes");
  MutexLock lk(&mu_);
  std::vector<RemoteEngine> out;
  auto it = registry_.models().find(model);
  if (it == registry_.models().end() || it->second.engine_count == 0) return out;
  WS_ASSIGN_OR_RETURN(std::vector<std::shared_ptr<Engine>> engines, registry_.CompleteEngines(it->second));
  for (const auto& e : engines) out.push_back(Describe(*e, opts_.cluster->self()));
  return out;
}

RemoteEngine Coordinator::Describe(const Engine& e, const std::string& node) const {
  RemoteEngine r;
  r.node = node;
  r.engine_id = e.id;
  r.spec = e.spec;
  if (!e.local()) {
    r.memory = e.remote_memory;
    r.device_uuid = e.remote_device;
    return r;
  }
  // GPU to GPU only when every param is memory of one device this daemon can name.
  if (opts_.device_staging == nullptr || e.maps.empty()) return r;
  const int dev = e.maps.front()->device();
  for (const auto& m : e.maps)
    if (m->kind() != MemoryKind::kCudaIpc || m->device() != dev) return r;
  auto uuid = opts_.device_staging->DeviceUuid(dev);
  if (!uuid.ok()) return r;
  r.memory = MemoryKind::kCudaIpc;
  r.device_uuid = *uuid;
  return r;
}

Result<std::shared_ptr<SyncSession>> Coordinator::FindLedLocked(const std::string& leader, uint64_t sync_id) {
  WS_ASSIGN_OR_RETURN(std::shared_ptr<SyncSession> sync, FindLiveLocked(sync_id));
  const std::string& led_by = sync->leader().empty() ? sync->self_node() : sync->leader();
  if (led_by != leader) return PermissionDenied(sync->Name() + " is not led by node " + leader + " on this daemon");
  return sync;
}

Status Coordinator::PeerStart(RemoteStart rs) {
  TrimGuard trim{this};
  if (opts_.cluster == nullptr) return FailedPrecondition("this daemon has no peers (--peer): it joins no sync across nodes");
  const std::string self = opts_.cluster->self();
  const std::string model = rs.manifest.model;
  // The other nodes' engines, planned here too (layouts resolved without the lock).
  std::vector<std::shared_ptr<Engine>> others(rs.engines.size());
  for (size_t i = 0; i < rs.engines.size(); ++i)
    if (rs.engines[i].node != self) {
      WS_ASSIGN_OR_RETURN(others[i], RemoteEngineOf(rs.engines[i]));
    }
  std::shared_ptr<SyncSession> sync;
  {
    MutexLock lk(&mu_);
    if (shutting_down_) return Unavailable("the daemon is shutting down");
    Model* m = registry_.FindModel(model);
    if (m != nullptr && m->engine_count == 0) m = nullptr;
    // A node with no engine of the model takes part when trainer ranks push to it.
    bool ranks_here = false;
    for (const auto& n : rs.rank_nodes) ranks_here = ranks_here || n == self;
    if (m == nullptr && !ranks_here) return FailedPrecondition("no engines of model " + model + " here any more");
    if (m != nullptr && rs.manifest.version <= m->committed_version)
      return FailedPrecondition("model " + model + ": version " + std::to_string(rs.manifest.version) +
                                " is not above the committed version " + std::to_string(m->committed_version));
    if (m != nullptr && m->busy_sync)
      return FailedPrecondition("model " + model + ": sync " + std::to_string(m->busy_sync) +
                                " is in flight here; one sync per model at a time");
    if (syncs_.count(rs.sync_id) || finished_.count(rs.sync_id))
      return AlreadyExists("sync " + std::to_string(rs.sync_id) + " is known here already");
    std::vector<std::shared_ptr<Engine>> locals;
    if (m != nullptr) {
      WS_ASSIGN_OR_RETURN(locals, registry_.CompleteEngines(*m));
    }
    std::map<std::string, std::shared_ptr<Engine>> by_id;
    for (const auto& e : locals) by_id[e->id] = e;
    std::vector<std::shared_ptr<Engine>> engines;
    size_t used = 0;
    for (size_t i = 0; i < rs.engines.size(); ++i) {
      if (rs.engines[i].node != self) {
        engines.push_back(others[i]);
        continue;
      }
      auto it = by_id.find(rs.engines[i].engine_id);
      if (it == by_id.end())
        return FailedPrecondition("engine " + rs.engines[i].engine_id + " is no longer registered here");
      engines.push_back(it->second);
      ++used;
    }
    if (used != locals.size())
      return FailedPrecondition("model " + model + ": " + std::to_string(locals.size()) +
                                " engine ranks are registered here, the leader planned " + std::to_string(used));
    sync = std::make_shared<SyncSession>(rs.sync_id, !rs.owner.empty() ? rs.owner : m != nullptr ? m->owner : "",
                                         rs.manifest.version, IndexManifest(rs.manifest, ""), std::move(engines));
    sync->last_activity = clock_.Now();
    sync->SetLeader(self, rs.leader);
    sync->SetRankNodes(rs.rank_nodes);
    if (m != nullptr) m->busy_sync = sync->id();
    syncs_[sync->id()] = sync;
  }
  Status backed = sync->CheckEnginesBacked();
  Result<std::shared_ptr<const ReadyPlan>> plan =
      backed.ok() ? MakeReadyPlan(sync->manifest(), sync->engines()) : Result<std::shared_ptr<const ReadyPlan>>(backed);
  if (plan.ok() && ((*plan)->plan.copies.size() != rs.copy_ops || (*plan)->plan.bytes_written != rs.bytes_planned))
    plan = Internal("the plan made here (" + std::to_string((*plan)->plan.copies.size()) + " copies, " +
                    std::to_string((*plan)->plan.bytes_written) + " bytes) differs from the leader's (" +
                    std::to_string(rs.copy_ops) + " copies, " + std::to_string(rs.bytes_planned) + " bytes)");
  if (plan.ok()) {
    const std::vector<std::string> nodes = sync->EngineNodes(self);
    std::vector<std::vector<DType>> param_dtypes;
    for (const auto& e : sync->engines()) {
      std::vector<DType> d;
      for (const auto& p : e->spec.params) d.push_back(p.dtype);
      param_dtypes.push_back(std::move(d));
    }
    sync->SetPack(cluster::BuildPackPlan((*plan)->plan, nodes, param_dtypes, sync->ShardNodes((*plan)->plan),
                                         rs.chunk_bytes));
  }
  MutexLock lk(&mu_);
  return StartSyncLocked(sync, std::move(plan), /*plan_reused=*/false, /*manifest_reused=*/false).status();
}

Result<uint64_t> Coordinator::PeerReceive(const std::string& leader, const std::string& from, uint64_t sync_id,
                                          const std::vector<uint32_t>& chunks, const DeviceTransfer* device) {
  TrimGuard trim{this};
  if (opts_.cluster == nullptr) return FailedPrecondition("this daemon has no peers (--peer): it joins no sync across nodes");
  const std::string where = "sync " + std::to_string(sync_id) + " from node " + from;
  std::shared_ptr<SyncSession> sync;
  std::vector<uint64_t> offsets;
  uint64_t total = 0;
  std::vector<ChunkBuffer> in;
  {
    MutexLock lk(&mu_);
    WS_ASSIGN_OR_RETURN(sync, FindLedLocked(leader, sync_id));
    if (sync->state() != SyncState::kStreaming)
      return FailedPrecondition(where + ": chunks arrived while " + SyncStateName(sync->state()));
    const cluster::NodePack* mine = sync->MyPack();
    for (uint32_t c : chunks)
      if (mine != nullptr && c < mine->chunks.size() && mine->chunks[c].source != from) {
        Status st = InvalidArgument(where + ": chunk " + std::to_string(c) + " is planned from node " +
                                    mine->chunks[c].source);
        AbortLocked(*sync, st.message());
        return st;
      }
    if (Status st = sync->ClaimChunks(chunks); !st.ok()) {
      AbortLocked(*sync, st.message());
      return st;
    }
    sync->writers++;
    sync->last_activity = clock_.Now();
    const cluster::NodePack* np = sync->MyPack();
    for (uint32_t c : chunks) {
      total = (total + 63) / 64 * 64;
      offsets.push_back(total);
      in.push_back(ChunkBuffer{c, nullptr, np->chunks[c].bytes});
      total += np->chunks[c].bytes;
    }
  }
  if (total > std::max(opts_.cluster->staging_bytes(), in.empty() ? 0 : in.front().bytes))
    return EndWrite(*sync, ResourceExhausted(where + ": " + std::to_string(total) +
                                             " bytes at once exceed this node's staging bound of " +
                                             std::to_string(opts_.cluster->staging_bytes()) + " bytes per peer"));
  std::shared_ptr<Mapping> buf;
  if (device != nullptr) {
    // GPU to GPU: the sender chose it from the engines' memory this node
    // reported; every target must still be memory of that device here.
    if (Status st = CheckDeviceTargets(*sync, chunks, *device, where); !st.ok()) return EndWrite(*sync, st);
    auto d = opts_.device_staging->Allocate(device->receiver_device, total);
    if (!d.ok()) return EndWrite(*sync, d.status().WithContext(where));
    buf = std::move(d).value();
  } else {
    auto h = HostBuffer::Create(total);
    if (!h.ok()) return EndWrite(*sync, h.status());
    buf = std::move(h).value();
  }
  for (size_t i = 0; i < in.size(); ++i) in[i].data = static_cast<char*>(buf->data()) + offsets[i];
  Status got = device != nullptr ? opts_.cluster->ReceiveDevice(from, sync_id, in, *device)
                                 : opts_.cluster->Receive(from, sync_id, in);
  if (!got.ok()) return EndWrite(*sync, got.WithContext(where));
  auto bound = sync->BindScatter(chunks, *buf, offsets, where);
  if (!bound.ok()) return EndWrite(*sync, bound.status());
  {
    MutexLock lk(&mu_);
    Status paused = sync->state() == SyncState::kAborted ? AbortedError(*sync)
                                                         : AwaitPausedLocked(lk, *sync, bound->in_place_engines, where);
    if (!paused.ok()) {
      sync->writers--;
      ReleaseIfIdleLocked(*sync);
      return paused;
    }
  }
  auto ran = transports_->Copy(*bound);
  if (!ran.ok()) return EndWrite(*sync, ran.status().WithContext(where));
  WS_RETURN_IF_ERROR(EndWrite(*sync, Status::Ok(), &*bound, ran.value()));
  return ran.value();
}

Status Coordinator::CheckDeviceTargets(const SyncSession& sync, const std::vector<uint32_t>& chunks,
                                       const DeviceTransfer& device, const std::string& where) const {
  if (opts_.device_staging == nullptr)
    return FailedPrecondition(where + ": chunks sent GPU to GPU (" + device.transport +
                              "), but this daemon stages no device memory");
  const cluster::NodePack* np = sync.MyPack();
  if (np == nullptr) return Status::Ok();
  std::map<int, std::string> uuids;
  for (uint32_t c : chunks)
    for (const cluster::PackSegment& seg : np->chunks.at(c).segments)
      for (uint32_t ci : seg.copies) {
        const PlannedCopy& pc = sync.plan().copies[ci];
        const Engine& e = *sync.engines()[pc.engine];
        const Mapping& m = *e.maps[pc.param];
        std::string uuid;
        if (m.kind() == MemoryKind::kCudaIpc) {
          auto [it, fresh] = uuids.try_emplace(m.device());
          if (fresh) {
            auto u = opts_.device_staging->DeviceUuid(m.device());
            if (u.ok()) it->second = *u;
          }
          uuid = it->second;
        }
        if (uuid.empty() || uuid != device.receiver_device)
          return InvalidArgument(where + ": chunk " + std::to_string(c) + " was sent GPU to GPU for device " +
                                 device.receiver_device + ", but it scatters into " + e.id + " param " +
                                 e.spec.params[pc.param].name + " in " + MemoryKindName(m.kind()) +
                                 (uuid.empty() ? "" : " on " + uuid));
      }
  return Status::Ok();
}

Result<uint64_t> Coordinator::PeerCommit(const std::string& leader, uint64_t sync_id) {
  TrimGuard trim{this};
  MutexLock lk(&mu_);
  WS_ASSIGN_OR_RETURN(std::shared_ptr<SyncSession> sync, FindLedLocked(leader, sync_id));
  if (sync->state() != SyncState::kStreaming)
    return FailedPrecondition(sync->Name() + " is " + SyncStateName(sync->state()) + "; Commit is accepted once");
  sync->StartCommitting();
  lk.Wait(cv_, [&] {
    mu_.AssertHeld();
    return sync->writers == 0 || sync->terminal();
  });
  if (sync->state() == SyncState::kAborted) return AbortedError(*sync);
  std::string missing = sync->MissingShards();  // of this node's trainer ranks
  if (missing.empty()) missing = sync->MissingChunks();
  if (!missing.empty()) {
    missing = "node " + opts_.cluster->self() + ": " + missing;
    sync->abort_from_peer = true;  // the leader hears it as this call's error
    AbortLocked(*sync, missing);
    return FailedPrecondition(missing);
  }
  WS_RETURN_IF_ERROR(ZeroFillLocked(lk, *sync));
  WS_RETURN_IF_ERROR(AwaitAcksLocked(lk, *sync));
  FinishLocked(*sync, /*committed=*/true);
  return sync->bytes_written;
}

Status Coordinator::PeerAbort(const std::string& from, uint64_t sync_id, const std::string& reason) {
  TrimGuard trim{this};
  MutexLock lk(&mu_);
  auto it = syncs_.find(sync_id);
  if (it == syncs_.end() || it->second->terminal()) return Status::Ok();
  SyncSession& sync = *it->second;
  if (!sync.leader().empty()) {
    // A node taking part hears it from its leader only.
    if (sync.leader() != from)
      return PermissionDenied(sync.Name() + " is not led by node " + from + " on this daemon");
    sync.abort_from_peer = true;
    AbortLocked(sync, "aborted by the leader, node " + from + ": " + reason);
    return Status::Ok();
  }
  // The leader: a node taking part failed it; every other node hears it.
  const std::vector<std::string> nodes = sync.RemoteNodes();
  if (std::find(nodes.begin(), nodes.end(), from) == nodes.end())
    return PermissionDenied(sync.Name() + " has no part on node " + from);
  AbortLocked(sync, "node " + from + ": " + reason);
  return Status::Ok();
}

StatusSnapshot Coordinator::GetStatus() const {
  MutexLock lk(&mu_);
  StatusSnapshot s;
  s.uptime_seconds = Seconds(Clock::now() - started_);
  std::map<std::string, std::set<uint32_t>> replicas;
  for (const auto& [id, e] : registry_.engines()) {
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
    for (size_t p = 0; p < e->spec.params.size(); ++p)
      if (e->spec.params[p].staged) {
        i.staged_params++;
        i.staged_bytes += e->maps[p]->size();
      }
    i.acks_pause = e->spec.acks_pause;
    i.label = e->label;
    i.owner = e->owner;
    s.engines.push_back(std::move(i));
    replicas[e->spec.model].insert(e->spec.replica_id);
  }
  for (const auto& [name, m] : registry_.models()) {
    ModelInfo i;
    i.model = name;
    i.architecture = m.architecture;
    i.replicas = static_cast<uint32_t>(replicas[name].size());
    i.engine_ranks = m.engine_count;
    i.committed_version = m.committed_version;
    s.models.push_back(std::move(i));
  }
  for (const auto& [id, sync] : syncs_)
    if (!sync->terminal()) s.current_syncs.push_back(sync->Stats());
  s.last_sync = last_sync_;
  s.syncs_committed = syncs_committed_;
  s.syncs_aborted = syncs_aborted_;
  return s;
}

}  // namespace ws::server
