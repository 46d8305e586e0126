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
    }
  }
  return out;
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
    const EngineParamSpec& p = e.spec.params[z.param];
    kernels::CopyOp op;
    op.dst_offset = z.dst_offset;
    op.dst_ld = z.dst_ld;
    op.rows = z.rows;
    op.cols = z.cols;
    op.src_dtype = op.dst_dtype = static_cast<uint8_t>(p.dtype);
    op.zero_fill = 1;
    WS_RETURN_IF_ERROR(BindOp(op, nullptr, *e.maps[z.param], "zero fill of " + e.id + " param " + p.name, Name(), &out));
  }
  return out;
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
