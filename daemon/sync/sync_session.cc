#include "daemon/sync/sync_session.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <optional>

#include "daemon/core/text.h"
#include "daemon/dataplane/coalesce.h"
#include "daemon/sync/shard_chains.h"
#include "daemon/sync/shard_groups.h"

namespace ws::server {

namespace {

// A broken invariant of the state machine: a daemon bug, not bad input.
[[noreturn]] void Panic(const std::string& what) {
  std::fprintf(stderr, "weightsyncd: invariant violated: %s\n", what.c_str());
  std::abort();
}

double Seconds(SyncSession::Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

const char* SyncStateName(SyncState s) {
  switch (s) {
    case SyncState::kPlanning: return "planning";
    case SyncState::kStreaming: return "streaming";
    case SyncState::kCommitting: return "committing";
    case SyncState::kCommitted: return "committed";
    case SyncState::kAborted: return "aborted";
  }
  return "?";
}

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

std::shared_ptr<const IndexedManifest> IndexManifest(SourceManifest manifest, std::string fingerprint) {
  auto m = std::make_shared<IndexedManifest>();
  m->manifest = std::move(manifest);
  m->fingerprint = std::move(fingerprint);
  m->index.reserve(m->manifest.tensors.size());
  for (uint32_t t = 0; t < m->manifest.tensors.size(); ++t) m->index.emplace(m->manifest.tensors[t].name, t);
  return m;
}

bool SameManifest(const SourceManifest& a, const SourceManifest& b) {
  if (a.model != b.model || a.world_size != b.world_size || a.negotiate_dtypes != b.negotiate_dtypes ||
      a.tensors.size() != b.tensors.size())
    return false;
  for (size_t t = 0; t < a.tensors.size(); ++t) {
    const SourceTensor &x = a.tensors[t], &y = b.tensors[t];
    if (x.name != y.name || x.shape != y.shape || x.dtype != y.dtype || x.shards.size() != y.shards.size()) return false;
    for (size_t s = 0; s < x.shards.size(); ++s) {
      const ShardSpec &p = x.shards[s], &q = y.shards[s];
      if (p.rank != q.rank || p.dim != q.dim || p.start != q.start || p.length != q.length) return false;
    }
  }
  return true;
}

bool ReadyPlan::Fits(const std::vector<std::shared_ptr<Engine>>& now) const {
  if (now.size() != engines.size()) return false;
  for (size_t i = 0; i < now.size(); ++i)
    if (engines[i].lock() != now[i]) return false;  // an expired one never equals a live registration
  return true;
}

Result<std::shared_ptr<const ReadyPlan>> MakeReadyPlan(const SourceManifest& manifest,
                                                       const std::vector<std::shared_ptr<Engine>>& engines) {
  // The planner reads the engines' own specs and layouts (immutable once
  // registered): no copies.
  std::vector<PlanEngineView> pe;
  pe.reserve(engines.size());
  for (const auto& e : engines) pe.push_back(PlanEngineView{&e->id, &e->spec, &e->layout});
  auto ready = std::make_shared<ReadyPlan>();
  Result<SyncPlan> plan = Status::Ok();
  if (manifest.negotiate_dtypes) {
    ready->dtypes = NegotiateDTypes(manifest, pe);
    std::vector<DType> wire(ready->dtypes.size());  // planned in the wire dtypes
    for (size_t t = 0; t < ready->dtypes.size(); ++t) wire[t] = ready->dtypes[t].wire;
    plan = BuildPlan(manifest, pe, &wire);
  } else {
    plan = BuildPlan(manifest, pe);
  }
  if (!plan.ok()) return plan.status();
  ready->plan = std::move(plan).value();
  ready->wire.reserve(manifest.tensors.size());
  for (size_t t = 0; t < manifest.tensors.size(); ++t)
    ready->wire.push_back(manifest.negotiate_dtypes ? ready->dtypes[t].wire : manifest.tensors[t].dtype);
  for (const auto& e : engines) ready->engines.push_back(e);
  ready->shard_group = GroupShards(manifest, ready->plan, ready->wire);
  ready->chains = ChainShards(manifest, ready->plan, ready->shard_group);
  return std::shared_ptr<const ReadyPlan>(std::move(ready));
}

SyncSession::SyncSession(uint64_t id, std::string owner, uint64_t version,
                         std::shared_ptr<const IndexedManifest> manifest, std::vector<std::shared_ptr<Engine>> engines)
    : id_(id),
      owner_(std::move(owner)),
      version_(version),
      manifest_(std::move(manifest)),
      engines_(std::move(engines)) {}

// ---------------------------------------------------------------- planning

Status SyncSession::CheckEnginesBacked() const {
  for (const auto& e : engines_) {
    // One stat per object: the param reaching furthest into it decides.
    std::map<const void*, size_t> furthest;
    auto end = [&](size_t i) { return static_cast<const char*>(e->maps[i]->data()) + e->maps[i]->size(); };
    for (size_t i = 0; i < e->maps.size(); ++i) {
      auto [it, inserted] = furthest.emplace(e->maps[i]->object(), i);
      if (!inserted && end(i) > end(it->second)) it->second = i;
    }
    for (const auto& [obj, i] : furthest)
      if (Status st = e->maps[i]->CheckBacked(); !st.ok())
        return FailedPrecondition(e->Describe() + " param " + e->spec.params[i].name + ": " + st.message());
  }
  return Status::Ok();
}

void SyncSession::StartStreaming(std::shared_ptr<const ReadyPlan> plan) {
  if (state_ != SyncState::kPlanning) Panic(Name() + ": StartStreaming in state " + SyncStateName(state_));
  plan_ = std::move(plan);
  received_.assign(plan_->plan.shard_base.back(), 0);
  if (const cluster::NodePack* mine = MyPack()) chunks_received_.assign(mine->chunks.size(), 0);
  for (uint32_t e = 0; e < engines_.size(); ++e) {
    if (!engines_[e]->local()) continue;  // another node's daemon runs its pause barrier
    const EngineRankSpec& spec = engines_[e]->spec;
    bool in_place = false;
    for (const auto& p : spec.params) in_place = in_place || !p.staged;
    if (spec.acks_pause && in_place) awaiting_pause_.insert(e);
  }
  state_ = SyncState::kStreaming;
}

// ---------------------------------------------------------------- transitions

void SyncSession::StartCommitting() {
  if (state_ != SyncState::kStreaming) Panic(Name() + ": StartCommitting in state " + SyncStateName(state_));
  state_ = SyncState::kCommitting;
}

void SyncSession::Finish(bool committed, const std::string& reason) {
  if (IsTerminal(state_)) Panic(Name() + ": finished twice");
  state_ = committed ? SyncState::kCommitted : SyncState::kAborted;
  if (!committed) error_ = Truncate(reason, kMaxReasonBytes);  // kept, logged and sent to every engine
  end_ = Clock::now();
}

// ---------------------------------------------------------------- streaming

std::string SyncSession::ShardName(uint32_t tensor, uint32_t shard) const {
  const SourceTensor& t = manifest().tensors[tensor];
  return "tensor " + t.name + " (rank " + std::to_string(t.shards[shard].rank) + ")";
}

Result<std::vector<ClaimedShard>> SyncSession::ClaimShards(uint32_t rank, const LayerShards& layer,
                                                           const std::string& where) {
  const SourceManifest& mf = manifest();
  const std::vector<uint32_t>& base = plan_->plan.shard_base;
  std::vector<ClaimedShard> claimed;
  claimed.reserve(layer.named.size() + layer.index.size());
  std::vector<std::string> errors;
  // Claims this rank's next unreceived shard of tensor t; `name` makes the
  // tensor's name for messages (only on errors).
  auto claim = [&](uint32_t t, const MemoryRef* object, uint64_t offset, uint64_t length, bool indexed,
                   const auto& name) {
    const SourceTensor& st = mf.tensors[t];
    const DType wire = plan_->wire[t];
    std::optional<uint32_t> pick;
    bool seen = false;
    for (uint32_t s = 0; s < st.shards.size(); ++s) {
      if (st.shards[s].rank != rank || ShardElements(st, st.shards[s]) == 0) continue;
      seen = true;
      if (!received_[base[t] + s]) {
        pick = s;
        break;
      }
    }
    auto what = [&] { return "tensor " + name() + " (rank " + std::to_string(rank) + ")"; };
    if (!pick) {
      errors.push_back(seen ? what() + " was already received"
                            : "tensor " + name() + " has no shard for rank " + std::to_string(rank) + " in the manifest");
      return;
    }
    const uint64_t want = ElemBytes(ShardElements(st, st.shards[*pick]), wire);
    if (offset % DTypeSize(wire) != 0) {
      errors.push_back(what() + ": memory offset " + std::to_string(offset) + " is not a multiple of the " +
                       DTypeName(wire) + " element size " + std::to_string(DTypeSize(wire)));
      return;
    }
    if (!indexed && length != want) {
      errors.push_back(what() + ": memory length " + std::to_string(length) + " bytes does not match the shard (" +
                       std::to_string(want) + " bytes of " + DTypeName(wire) + ")");
      return;
    }
    received_[base[t] + *pick] = 1;  // undone below when the layer is refused
    claimed.push_back(ClaimedShard{t, *pick, object, offset, want});
  };
  for (const auto& named : layer.named) {
    const std::string& name = named.first;  // not a structured binding: clang 14 cannot capture those
    const MemoryRef& ref = named.second;
    auto ti = manifest_->index.find(name);
    if (ti == manifest_->index.end()) {
      errors.push_back("tensor " + name + " is not in the manifest");
      continue;
    }
    claim(ti->second, &ref, ref.offset, ref.length, false, [&]() -> const std::string& { return name; });
  }
  for (size_t i = 0; i < layer.index.size(); ++i) {
    const uint32_t t = layer.index[i];
    if (t >= mf.tensors.size()) {
      errors.push_back("tensor index " + std::to_string(t) + " is not below the manifest's " +
                       std::to_string(mf.tensors.size()) + " tensors");
      continue;
    }
    claim(t, &layer.object, layer.offset[i], 0, true, [&]() -> const std::string& { return mf.tensors[t].name; });
  }
  if (!errors.empty()) {
    for (const auto& c : claimed) received_[base[c.tensor] + c.shard] = 0;
    ErrorList listed;  // the first few; a layer may hold thousands of bad shards
    for (auto& e : errors) listed.Add(std::move(e));
    return InvalidArgument(where + ":" + listed.Join("\n  ", /*lead=*/true));
  }
  return claimed;
}

std::string SyncSession::CopyName(uint32_t copy) const {
  const PlannedCopy& c = plan_->plan.copies[copy];
  const Engine& e = *engines_[c.engine];
  return ShardName(c.tensor, c.shard) + " -> " + e.id + " param " + e.spec.params[c.param].name;
}

Result<BoundOps> SyncSession::BindLayer(const std::vector<ClaimedShard>& claimed,
                                        const std::vector<std::shared_ptr<Mapping>>& src, const std::string& where,
                                        BindPath path) const {
  const SyncPlan& plan = plan_->plan;
  const ShardChains& chains = plan_->chains;
  // Claimed shards by (group, memory object, offset): a group's shards are
  // adjacent, in the order they lie in the trainer's memory.
  struct Key {
    uint32_t group;
    const MemoryRef* object;
    uint64_t offset;
    uint32_t index;
  };
  std::vector<Key> order(claimed.size());
  for (size_t i = 0; i < claimed.size(); ++i) {
    const uint32_t f = plan.shard_base[claimed[i].tensor] + claimed[i].shard;
    order[i] = Key{plan_->shard_group[f], claimed[i].object, claimed[i].offset, static_cast<uint32_t>(i)};
  }
  std::sort(order.begin(), order.end(), [](const Key& x, const Key& y) {
    if (x.group != y.group) return x.group < y.group;
    if (x.object != y.object) return std::less<const MemoryRef*>()(x.object, y.object);
    return x.offset != y.offset ? x.offset < y.offset : x.index < y.index;
  });
  // Plan copies [first, last] (of `n` shards) make op i; first == last when
  // it is a single copy.
  struct Group {
    uint32_t first, last, n;
  };
  auto groups = std::make_shared<std::vector<Group>>();
  BoundOps out;
  uint32_t last_in_place = UINT32_MAX;  // in_place_engines.insert once per run of one engine's ops
  // Binds `op` (a merged op through the whole source mapping, or one copy
  // through its shard's slice) for plan copies `g`.
  auto bind = [&](const kernels::CopyOp& op, const Mapping* op_src, const Mapping& op_dst, const Group& g) -> Status {
    WS_RETURN_IF_ERROR(
        BindOp(op, op_src, op_dst, [this, &g] { return GroupName(g.first, g.last, g.n); }, where, &out));
    groups->push_back(g);
    const PlannedCopy& c = plan.copies[g.first];
    if (!engines_[c.engine]->spec.params[c.param].staged && c.engine != last_in_place) {
      out.in_place_engines.insert(c.engine);
      last_in_place = c.engine;
    }
    return Status::Ok();
  };
  // Plan copy `ci` of claimed shard `i` as an op on `data` (its slice's).
  auto make_op = [&](uint32_t ci, uint32_t i, const void* data) {
    const PlannedCopy& c = plan.copies[ci];
    const Engine& eng = *engines_[c.engine];
    kernels::CopyOp op = PlannedOp(c);
    op.src = data;
    op.dst = eng.maps[c.param]->data();
    op.src_dtype = static_cast<uint8_t>(plan_->wire[claimed[i].tensor]);
    op.dst_dtype = static_cast<uint8_t>(eng.spec.params[c.param].dtype);
    return Canonical(op);
  };
  // The walk's pending op: `run` addresses the source through the whole
  // mapping the layer's shards are slices of (so shards at constant strides
  // in it can merge); a run of one op binds as `single`, through its own
  // shard's slice.
  kernels::CopyOp run, single;
  Group g{};
  const Mapping* run_src = nullptr;
  const Mapping* single_src = nullptr;
  const Mapping* run_dst = nullptr;
  bool pending = false;
  auto flush = [&]() -> Status {
    if (!pending) return Status::Ok();
    pending = false;
    return g.n == 1 ? bind(single, single_src, *run_dst, g) : bind(Canonical(run), run_src, *run_dst, g);
  };
  // Per shard of a group, once: its first copy, its slice and where that
  // lies in the whole mapping (in source elements; -1: not addressable so).
  struct Shard {
    uint32_t index, copies;
    const Mapping* slice;
    const void* slice_data;
    const Mapping* whole;
    const void* whole_data;
    int64_t at;
  };
  std::vector<Shard> shards;
  for (size_t a = 0; a < order.size();) {
    size_t e = a + 1;  // the group's shards are order[a, e)
    while (e < order.size() && order[e].group == order[a].group) ++e;
    const uint32_t grp = order[a].group;
    const ClaimedShard& head = claimed[order[a].index];
    auto [hb, he] = plan.CopiesOf(head.tensor, head.shard);
    const uint32_t n_copies = he - hb;
    shards.clear();
    const uint32_t es = kernels::ElemSize(static_cast<uint8_t>(plan_->wire[head.tensor]));
    for (size_t m = a; m < e; ++m) {
      const uint32_t i = order[m].index;
      const Mapping* const slice = src[i].get();
      const auto [whole, at] = slice->Whole();
      const void* const whole_data = whole->data();
      const bool ok = at % es == 0 && reinterpret_cast<uintptr_t>(whole_data) % es == 0;
      shards.push_back(Shard{i, plan.CopiesOf(claimed[i].tensor, claimed[i].shard).first, slice, slice->data(), whole,
                             whole_data, ok ? static_cast<int64_t>(at / es) : -1});
    }
    a = e;
    // Chains: the shards are consecutive members of the group (in the
    // chains' order) in one mapping at a constant source stride. Then the k-th
    // copies of each plan-time run among them make one op, checked per
    // shard here instead of per copy.
    const auto n = static_cast<uint32_t>(shards.size());
    const uint32_t p0 = chains.pos[plan.shard_base[head.tensor] + head.shard];
    const int64_t stride = n > 1 ? shards[1].at - shards[0].at : 0;
    auto chained = [&]() -> bool {
      if (path != BindPath::kAuto || shards[0].at < 0 || stride < 0) return false;
      for (uint32_t q = 0; q < n; ++q) {
        const Shard& sh = shards[q];
        const ClaimedShard& c = claimed[sh.index];
        if (sh.at < 0 || sh.whole != shards[0].whole || chains.pos[plan.shard_base[c.tensor] + c.shard] != p0 + q ||
            sh.at != shards[0].at + static_cast<int64_t>(q) * stride)
          return false;
      }
      return true;
    };
    if (n > 1 && chained()) {
      ++out.groups_chained;
      WS_RETURN_IF_ERROR(flush());
      // shards[q] is member p0 + q: its k-th copy is shards[q].copies + k.
      for (uint32_t k = 0; k < n_copies; ++k) {
        const PlannedCopy& c0 = plan.copies[shards[0].copies + k];
        const Engine& eng = *engines_[c0.engine];
        if (!eng.local()) continue;  // packed and sent to its node (BindPack)
        const Mapping& dst_map = *eng.maps[c0.param];
        Status st = Status::Ok();
        chains.ForEachRun(grp, k, p0, p0 + n, [&](uint32_t x, uint32_t y) {
          if (!st.ok()) return;
          const Shard& sh = shards[x - p0];
          const uint32_t first = sh.copies + k;
          if (y - x == 1) {
            st = bind(make_op(first, sh.index, sh.slice_data), sh.slice, dst_map, Group{first, first, 1});
            return;
          }
          const uint32_t last = shards[y - 1 - p0].copies + k;
          kernels::CopyOp op = make_op(first, sh.index, sh.whole_data);
          op.src_offset += sh.at;
          op.count = static_cast<int32_t>(y - x);
          op.src_batch_stride = stride;
          op.dst_batch_stride = plan.copies[shards[x + 1 - p0].copies + k].dst_offset - plan.copies[first].dst_offset;
          st = bind(Canonical(op), sh.whole, dst_map, Group{first, last, y - x});
        });
        WS_RETURN_IF_ERROR(st);
      }
      continue;
    }
    // The walk: the k-th copy of every shard of the group, merged where
    // AppendToBatch finds the next batch of the pending op.
    if (n > 1) ++out.groups_walked;
    for (uint32_t k = 0; k < n_copies; ++k) {
      for (const Shard& sh : shards) {
        const uint32_t ci = sh.copies + k;
        const PlannedCopy& c = plan.copies[ci];
        const Engine& eng = *engines_[c.engine];
        if (!eng.local()) continue;  // packed and sent to its node (BindPack)
        const Mapping* const dst_map = eng.maps[c.param].get();
        const kernels::CopyOp op = make_op(ci, sh.index, sh.slice_data);
        // Through the whole mapping when the slice starts at a whole element of it.
        kernels::CopyOp via = op;
        const Mapping* src_map = sh.slice;
        if (sh.at >= 0) {
          src_map = sh.whole;
          via.src = sh.whole_data;
          via.src_offset += sh.at;
        }
        // Same mappings (BindOp checks the merged op against them) and the
        // next batch at constant strides.
        if (pending && src_map == run_src && dst_map == run_dst && AppendToBatch(&run, via)) {
          g.last = ci;
          ++g.n;
          continue;
        }
        WS_RETURN_IF_ERROR(flush());
        run = via;
        single = op;
        g = Group{ci, ci, 1};
        run_src = src_map;
        single_src = sh.slice;
        run_dst = dst_map;
        pending = true;
      }
    }
  }
  WS_RETURN_IF_ERROR(flush());
  out.name = [this, groups](size_t i) {
    const Group& g = (*groups)[i];
    return GroupName(g.first, g.last, g.n);
  };
  return out;
}

std::string SyncSession::GroupName(uint32_t first, uint32_t last, uint32_t n) const {
  if (n <= 1) return CopyName(first);
  const PlannedCopy &a = plan_->plan.copies[first], &b = plan_->plan.copies[last];
  const Engine& e = *engines_[a.engine];
  const SourceTensor& ta = manifest().tensors[a.tensor];
  return "tensors " + ta.name + " .. " + manifest().tensors[b.tensor].name + " (" + std::to_string(n) +
         " shards, rank " + std::to_string(ta.shards[a.shard].rank) + ") -> " + e.id + " param " +
         e.spec.params[a.param].name;
}

// ---------------------------------------------------------------- across nodes

void SyncSession::SetLeader(std::string self, std::string leader) {
  self_ = std::move(self);
  leader_ = std::move(leader);
}

void SyncSession::SetPack(cluster::PackPlan pack) { pack_ = std::move(pack); }

void SyncSession::SetRankNodes(std::vector<std::string> rank_nodes) { rank_nodes_ = std::move(rank_nodes); }

const std::string& SyncSession::RankNode(uint32_t rank) const {
  if (rank_nodes_.empty()) return leader_.empty() ? self_ : leader_;
  return rank_nodes_.at(rank);
}

std::vector<std::string> SyncSession::ShardNodes(const SyncPlan& plan) const {
  std::vector<std::string> out(plan.shard_base.empty() ? 0 : plan.shard_base.back());
  const SourceManifest& mf = manifest();
  for (uint32_t t = 0; t < mf.tensors.size(); ++t)
    for (uint32_t s = 0; s < mf.tensors[t].shards.size(); ++s)
      out.at(plan.shard_base[t] + s) = RankNode(mf.tensors[t].shards[s].rank);
  return out;
}

std::vector<std::string> SyncSession::RemoteNodes() const {
  std::set<std::string> nodes;
  for (const auto& e : engines_)
    if (!e->local()) nodes.insert(e->node);
  for (const auto& n : rank_nodes_)
    if (n != self_) nodes.insert(n);
  if (!leader_.empty()) nodes.insert(leader_);
  return {nodes.begin(), nodes.end()};
}

std::vector<std::string> SyncSession::EngineNodes(const std::string& self) const {
  std::vector<std::string> out;
  out.reserve(engines_.size());
  for (const auto& e : engines_) out.push_back(e->local() ? self : e->node);
  return out;
}

std::vector<uint32_t> SyncSession::ChunksOf(const std::string& node, const std::vector<ClaimedShard>& claimed) const {
  std::vector<uint32_t> out;
  auto it = pack_.nodes.find(node);
  if (it == pack_.nodes.end()) return out;
  for (const auto& c : claimed)
    if (auto b = it->second.by_shard.find({c.tensor, c.shard}); b != it->second.by_shard.end())
      out.insert(out.end(), b->second.begin(), b->second.end());
  return out;
}

Result<BoundOps> SyncSession::BindPack(const std::string& node, const std::vector<ClaimedShard>& claimed,
                                       const std::vector<std::shared_ptr<Mapping>>& src,
                                       const std::vector<uint32_t>& chunks, const Mapping& staging,
                                       const std::vector<uint64_t>& offsets, const std::string& where) const {
  const cluster::NodePack& np = pack_.nodes.at(node);
  std::map<std::pair<uint32_t, uint32_t>, size_t> source;  // (tensor, shard) -> claimed index
  for (size_t i = 0; i < claimed.size(); ++i) source[{claimed[i].tensor, claimed[i].shard}] = i;
  BoundOps out;
  auto name = [this, node](const cluster::PackChunk& ch, uint32_t chunk) {
    return ShardName(ch.tensor, ch.shard) + " -> node " + node + " chunk " + std::to_string(chunk);
  };
  auto index = std::make_shared<std::vector<uint32_t>>();  // chunk of each op, for names
  for (size_t k = 0; k < chunks.size(); ++k) {
    const cluster::PackChunk& ch = np.chunks.at(chunks[k]);
    const size_t i = source.at({ch.tensor, ch.shard});
    const uint8_t sdt = static_cast<uint8_t>(plan_->wire[ch.tensor]);
    for (const cluster::PackSegment& s : ch.segments) {
      const uint64_t esize = DTypeSize(s.dtype);
      kernels::CopyOp op;
      op.src_offset = s.src_offset;
      op.src_ld = s.src_ld;
      op.dst_offset = static_cast<int64_t>((offsets[k] + s.offset) / esize);
      op.dst_ld = s.cols;
      op.rows = s.rows;
      op.cols = s.cols;
      op.src_dtype = sdt;
      op.dst_dtype = static_cast<uint8_t>(s.dtype);
      op.transpose = s.transpose ? 1 : 0;
      WS_RETURN_IF_ERROR(BindOp(op, src[i].get(), staging, [&] { return name(ch, chunks[k]); }, where, &out));
      index->push_back(chunks[k]);
    }
  }
  out.name = [np = &np, name, index](size_t i) { return name(np->chunks[(*index)[i]], (*index)[i]); };
  return out;
}

const cluster::NodePack* SyncSession::MyPack() const {
  if (self_.empty()) return nullptr;
  auto it = pack_.nodes.find(self_);
  return it == pack_.nodes.end() ? nullptr : &it->second;
}

Status SyncSession::ClaimChunks(const std::vector<uint32_t>& chunks) {
  std::set<uint32_t> seen;
  for (uint32_t c : chunks) {
    if (c >= chunks_received_.size())
      return InvalidArgument(Name() + ": chunk " + std::to_string(c) + " is not in the plan of node " + self_ + " (" +
                             std::to_string(chunks_received_.size()) + " chunks)");
    if (chunks_received_[c] || !seen.insert(c).second)
      return InvalidArgument(Name() + ": chunk " + std::to_string(c) + " was already received");
  }
  for (uint32_t c : chunks) chunks_received_[c] = 1;
  return Status::Ok();
}

Result<BoundOps> SyncSession::BindScatter(const std::vector<uint32_t>& chunks, const Mapping& buffer,
                                          const std::vector<uint64_t>& offsets, const std::string& where) const {
  const cluster::NodePack* np = MyPack();
  BoundOps out;
  if (np == nullptr) return out;
  auto name = [this](uint32_t chunk, uint32_t copy) {
    const PlannedCopy& c = plan_->plan.copies[copy];
    const Engine& e = *engines_[c.engine];
    return "chunk " + std::to_string(chunk) + " of tensor " + manifest().tensors[c.tensor].name + " -> " + e.id +
           " param " + e.spec.params[c.param].name;
  };
  auto index = std::make_shared<std::vector<std::pair<uint32_t, uint32_t>>>();  // (chunk, plan copy) of each op
  for (size_t k = 0; k < chunks.size(); ++k) {
    for (const cluster::PackSegment& s : np->chunks.at(chunks[k]).segments) {
      const uint64_t esize = DTypeSize(s.dtype);
      for (uint32_t ci : s.copies) {
        const PlannedCopy& c = plan_->plan.copies[ci];
        const Engine& e = *engines_[c.engine];
        if (!e.local()) Panic(Name() + ": chunk " + std::to_string(chunks[k]) + " scatters into " + e.Describe());
        const EngineParamSpec& p = e.spec.params[c.param];
        kernels::CopyOp op;
        op.src_offset = static_cast<int64_t>((offsets[k] + s.offset) / esize);
        op.src_ld = s.cols;
        op.dst_offset = c.dst_offset + s.row0 * c.dst_ld;
        op.dst_ld = c.dst_ld;
        op.rows = s.rows;
        op.cols = s.cols;
        op.src_dtype = op.dst_dtype = static_cast<uint8_t>(s.dtype);
        WS_RETURN_IF_ERROR(BindOp(op, &buffer, *e.maps[c.param], [&] { return name(chunks[k], ci); }, where, &out));
        index->emplace_back(chunks[k], ci);
        if (!p.staged) out.in_place_engines.insert(c.engine);
      }
    }
  }
  out.name = [name, index](size_t i) { return name((*index)[i].first, (*index)[i].second); };
  return out;
}

std::string SyncSession::MissingChunks() const {
  size_t n = 0, first = 0;
  for (size_t c = 0; c < chunks_received_.size(); ++c)
    if (!chunks_received_[c] && n++ == 0) first = c;
  if (n == 0) return "";
  const cluster::PackChunk& ch = MyPack()->chunks[first];
  return Name() + ": Commit before every chunk arrived on node " + self_ + "; " + std::to_string(n) +
         " missing, the first of " + ShardName(ch.tensor, ch.shard);
}

// ---------------------------------------------------------------- commit

std::string SyncSession::MissingShards() const {
  const SourceManifest& mf = manifest();
  const SyncPlan& plan = plan_->plan;
  std::vector<std::string> missing;
  size_t n_missing = 0;
  for (uint32_t t = 0; t < mf.tensors.size(); ++t)
    for (uint32_t s = 0; s < mf.tensors[t].shards.size(); ++s)
      if (!received_[plan.shard_base[t] + s] && plan.CopiesOf(t, s).first != plan.CopiesOf(t, s).second &&
          RankHere(mf.tensors[t].shards[s].rank) && n_missing++ < 20)
        missing.push_back(mf.tensors[t].name + " (rank " + std::to_string(mf.tensors[t].shards[s].rank) + ")");
  if (!n_missing) return "";
  std::string msg = Name() + ": Commit before every shard arrived; " + std::to_string(n_missing) + " missing:";
  for (const auto& m : missing) msg += "\n  " + m;
  if (n_missing > missing.size()) msg += "\n  ... and " + std::to_string(n_missing - missing.size()) + " more";
  return msg;
}

namespace {
std::string ZeroName(const Engine& e, const EngineParamSpec& p) { return "zero fill of " + e.id + " param " + p.name; }
}  // namespace

Result<BoundOps> SyncSession::BindZeroFills() const {
  BoundOps out;
  auto index = std::make_shared<std::vector<uint32_t>>();  // plan zero fill of each op, for names
  const std::vector<PlannedZero>& zeros = plan_->plan.zeros;
  for (uint32_t zi = 0; zi < zeros.size(); ++zi) {
    const PlannedZero& z = zeros[zi];
    const Engine& e = *engines_[z.engine];
    if (!e.local()) continue;  // its node fills it
    const EngineParamSpec& p = e.spec.params[z.param];
    kernels::CopyOp op;
    op.dst_offset = z.dst_offset;
    op.dst_ld = z.dst_ld;
    op.rows = z.rows;
    op.cols = z.cols;
    op.src_dtype = op.dst_dtype = static_cast<uint8_t>(p.dtype);
    op.zero_fill = 1;
    WS_RETURN_IF_ERROR(BindOp(op, nullptr, *e.maps[z.param], [&] { return ZeroName(e, p); }, Name(), &out));
    index->push_back(zi);
    if (!p.staged) out.in_place_engines.insert(z.engine);
  }
  out.name = [this, index](size_t i) {
    const PlannedZero& z = plan_->plan.zeros[(*index)[i]];
    return ZeroName(*engines_[z.engine], engines_[z.engine]->spec.params[z.param]);
  };
  return out;
}

// ---------------------------------------------------------------- pause barrier

bool SyncSession::MarkPaused(const std::string& engine_id) {
  for (uint32_t e = 0; e < engines_.size(); ++e)
    if (engines_[e]->id == engine_id) {
      awaiting_pause_.erase(e);
      return true;
    }
  return false;
}

std::string SyncSession::Unpaused(const std::set<uint32_t>& engines) const {
  std::string who;
  for (uint32_t e : engines)
    if (awaiting_pause_.count(e)) who += (who.empty() ? "" : ", ") + engines_[e]->Describe();
  return who;
}

SyncStats SyncSession::Stats() const {
  SyncStats s;
  s.sync_id = id_;
  s.model = model();
  s.version = version_;
  s.state = SyncStateName(state_);
  s.bytes_written = bytes_written;
  s.bytes_read = bytes_read;
  s.seconds = Seconds((terminal() ? end_ : Clock::now()) - begin_);
  s.gbps = s.seconds > 0 ? static_cast<double>(s.bytes_written) / s.seconds / 1e9 : 0;
  s.error = error_;
  s.engines = static_cast<uint32_t>(engines_.size());
  s.world_size = manifest().world_size;
  return s;
}

}  // namespace ws::server
