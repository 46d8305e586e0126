#include "daemon/sync/sync_session.h"

#include <cstdio>
#include <cstdlib>
#include <optional>

#include "daemon/core/text.h"

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

SyncSession::SyncSession(uint64_t id, std::string owner, SourceManifest manifest,
                         std::vector<std::shared_ptr<Engine>> engines)
    : id_(id), owner_(std::move(owner)), manifest_(std::move(manifest)), engines_(std::move(engines)) {}

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

Result<SyncPlan> SyncSession::Plan(std::vector<TensorDtypes>* dtypes) {
  std::vector<PlanEngine> pe;
  pe.reserve(engines_.size());
  for (const auto& e : engines_) pe.push_back(PlanEngine{e->id, e->spec, e->layout});
  if (manifest_.negotiate_dtypes) {
    *dtypes = NegotiateDTypes(manifest_, pe);
    for (size_t t = 0; t < dtypes->size(); ++t) manifest_.tensors[t].dtype = (*dtypes)[t].wire;
  }
  return BuildPlan(manifest_, pe);
}

void SyncSession::StartStreaming(SyncPlan plan) {
  if (state_ != SyncState::kPlanning) Panic(Name() + ": StartStreaming in state " + SyncStateName(state_));
  const SourceManifest& mf = manifest_;
  plan_ = std::move(plan);
  plan_.by_shard.resize(mf.tensors.size());
  received_.resize(mf.tensors.size());
  for (uint32_t t = 0; t < mf.tensors.size(); ++t) {
    plan_.by_shard[t].resize(mf.tensors[t].shards.size());
    tensor_index_.emplace(mf.tensors[t].name, t);
    received_[t].assign(mf.tensors[t].shards.size(), 0);
  }
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

Result<std::vector<ClaimedShard>> SyncSession::ClaimShards(
    uint32_t rank, const std::vector<std::pair<std::string, MemoryRef>>& shards, const std::string& where) {
  const SourceManifest& mf = manifest_;
  std::vector<ClaimedShard> claimed;
  std::vector<std::string> errors;
  std::set<std::pair<uint32_t, uint32_t>> taken;
  for (const auto& [name, ref] : shards) {
    auto ti = tensor_index_.find(name);
    if (ti == tensor_index_.end()) {
      errors.push_back("tensor " + name + " is not in the manifest");
      continue;
    }
    const SourceTensor& t = mf.tensors[ti->second];
    std::optional<uint32_t> pick;
    bool seen = false;
    for (uint32_t s = 0; s < t.shards.size(); ++s) {
      if (t.shards[s].rank != rank || ShardElements(t, t.shards[s]) == 0) continue;
      seen = true;
      if (!received_[ti->second][s] && !taken.count({ti->second, s})) {
        pick = s;
        break;
      }
    }
    std::string what = "tensor " + name + " (rank " + std::to_string(rank) + ")";
    if (!pick) {
      errors.push_back(seen ? what + " was already received"
                            : "tensor " + name + " has no shard for rank " + std::to_string(rank) + " in the manifest");
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
    claimed.push_back(ClaimedShard{ti->second, *pick, &ref, what});
  }
  if (!errors.empty()) {
    ErrorList listed;  // the first few; a layer may hold thousands of bad shards
    for (auto& e : errors) listed.Add(std::move(e));
    return InvalidArgument(where + ":" + listed.Join("\n  ", /*lead=*/true));
  }
  for (const auto& c : claimed) received_[c.tensor][c.shard] = 1;
  return claimed;
}

Result<BoundOps> SyncSession::BindLayer(const std::vector<ClaimedShard>& claimed,
                                        const std::vector<std::shared_ptr<Mapping>>& src,
                                        const std::string& where) const {
  BoundOps out;
  for (size_t i = 0; i < claimed.size(); ++i) {
    const SourceTensor& t = manifest_.tensors[claimed[i].tensor];
    for (uint32_t ci : plan_.by_shard[claimed[i].tensor][claimed[i].shard]) {
      const PlannedCopy& c = plan_.copies[ci];
      const Engine& e = *engines_[c.engine];
      if (!e.local()) continue;  // packed and sent to its node (BindPack)
      const EngineParamSpec& p = e.spec.params[c.param];
      kernels::CopyOp op;
      op.src_offset = c.src_offset;
      op.src_ld = c.src_ld;
      op.dst_offset = c.dst_offset;
      op.dst_ld = c.dst_ld;
      op.rows = c.rows;
      op.cols = c.cols;
      op.src_dtype = static_cast<uint8_t>(t.dtype);
      op.dst_dtype = static_cast<uint8_t>(p.dtype);
      op.transpose = c.transpose ? 1 : 0;
      WS_RETURN_IF_ERROR(BindOp(op, src[i].get(), *e.maps[c.param], claimed[i].what + " -> " + e.id + " param " + p.name,
                                where, &out));
      if (!p.staged) out.in_place_engines.insert(c.engine);
    }
  }
  return out;
}

// ---------------------------------------------------------------- across nodes

void SyncSession::SetLeader(std::string self, std::string leader) {
  self_ = std::move(self);
  leader_ = std::move(leader);
}

void SyncSession::SetPack(cluster::PackPlan pack) { pack_ = std::move(pack); }

std::vector<std::string> SyncSession::RemoteNodes() const {
  std::set<std::string> nodes;
  for (const auto& e : engines_)
    if (!e->local()) nodes.insert(e->node);
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
  for (size_t k = 0; k < chunks.size(); ++k) {
    const cluster::PackChunk& ch = np.chunks.at(chunks[k]);
    const size_t i = source.at({ch.tensor, ch.shard});
    const SourceTensor& t = manifest_.tensors[ch.tensor];
    for (const cluster::PackSegment& s : ch.segments) {
      const uint64_t esize = DTypeSize(s.dtype);
      kernels::CopyOp op;
      op.src_offset = s.src_offset;
      op.src_ld = s.src_ld;
      op.dst_offset = static_cast<int64_t>((offsets[k] + s.offset) / esize);
      op.dst_ld = s.cols;
      op.rows = s.rows;
      op.cols = s.cols;
      op.src_dtype = static_cast<uint8_t>(t.dtype);
      op.dst_dtype = static_cast<uint8_t>(s.dtype);
      op.transpose = s.transpose ? 1 : 0;
      WS_RETURN_IF_ERROR(BindOp(op, src[i].get(), staging,
                                claimed[i].what + " -> node " + node + " chunk " + std::to_string(chunks[k]), where,
                                &out));
    }
  }
  return out;
}

const cluster::NodePack* SyncSession::MyPack() const {
  if (leader_.empty()) return nullptr;
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
  for (size_t k = 0; k < chunks.size(); ++k) {
    for (const cluster::PackSegment& s : np->chunks.at(chunks[k]).segments) {
      const uint64_t esize = DTypeSize(s.dtype);
      for (uint32_t ci : s.copies) {
        const PlannedCopy& c = plan_.copies[ci];
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
        WS_RETURN_IF_ERROR(BindOp(op, &buffer, *e.maps[c.param],
                                  "chunk " + std::to_string(chunks[k]) + " of tensor " +
                                      manifest_.tensors[c.tensor].name + " -> " + e.id + " param " + p.name,
                                  where, &out));
        if (!p.staged) out.in_place_engines.insert(c.engine);
      }
    }
  }
  return out;
}

std::string SyncSession::MissingChunks() const {
  size_t n = 0, first = 0;
  for (size_t c = 0; c < chunks_received_.size(); ++c)
    if (!chunks_received_[c] && n++ == 0) first = c;
  if (n == 0) return "";
  const cluster::PackChunk& ch = MyPack()->chunks[first];
  return Name() + ": Commit before every chunk arrived on node " + self_ + "; " + std::to_string(n) +
         " missing, the first of tensor " + manifest_.tensors[ch.tensor].name + " (rank " +
         std::to_string(manifest_.tensors[ch.tensor].shards[ch.shard].rank) + ")";
}

// ---------------------------------------------------------------- commit

std::string SyncSession::MissingShards() const {
  const SourceManifest& mf = manifest_;
  std::vector<std::string> missing;
  size_t n_missing = 0;
  for (uint32_t t = 0; t < mf.tensors.size(); ++t)
    for (uint32_t s = 0; s < mf.tensors[t].shards.size(); ++s)
      if (!received_[t][s] && !plan_.by_shard[t][s].empty() && n_missing++ < 20)
        missing.push_back(mf.tensors[t].name + " (rank " + std::to_string(mf.tensors[t].shards[s].rank) + ")");
  if (!n_missing) return "";
  std::string msg = Name() + ": Commit before every shard arrived; " + std::to_string(n_missing) + " missing:";
  for (const auto& m : missing) msg += "\n  " + m;
  if (n_missing > missing.size()) msg += "\n  ... and " + std::to_string(n_missing - missing.size()) + " more";
  return msg;
}

Result<BoundOps> SyncSession::BindZeroFills() const {
  BoundOps out;
  for (const PlannedZero& z : plan_.zeros) {
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
    WS_RETURN_IF_ERROR(BindOp(op, nullptr, *e.maps[z.param], "zero fill of " + e.id + " param " + p.name, Name(), &out));
    if (!p.staged) out.in_place_engines.insert(z.engine);
  }
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
  s.model = manifest_.model;
  s.version = manifest_.version;
  s.state = SyncStateName(state_);
  s.bytes_written = bytes_written;
  s.bytes_read = bytes_read;
  s.seconds = Seconds((terminal() ? end_ : Clock::now()) - begin_);
  s.gbps = s.seconds > 0 ? static_cast<double>(s.bytes_written) / s.seconds / 1e9 : 0;
  s.error = error_;
  s.engines = static_cast<uint32_t>(engines_.size());
  s.world_size = manifest_.world_size;
  return s;
}

}  // namespace ws::server
