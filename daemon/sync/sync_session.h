// One weight sync: its manifest, plan and engines, which shards have
// arrived, and its state machine:
//
//   planning -> streaming -> committing -> committed
//   (any of the first three) -> aborted
//
// plus the steps that turn a layer's shards (or the plan's zero fills) into
// bounds-checked copy operations for the executor.
//
// A sync's manifest (IndexedManifest) and validated plan (ReadyPlan) are
// immutable and shared: the coordinator keeps each model's last ones and a
// sync with the same manifest and the same engines (and engine memory) reuses
// them, so a steady-state sync neither re-parses nor re-plans.
//
// Thread-safety: a SyncSession is not synchronized itself; the Coordinator
// calls its mutating methods with its mutex held. The manifest, the plan and
// the engine list are fixed once the session streams (only the planning
// thread touches them before), so the binding steps read them without that
// lock.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <functional>
#include <unordered_map>
#include <string>
#include <utility>
#include <vector>

#include "daemon/cluster/pack.h"
#include "daemon/core/manifest.h"
#include "daemon/core/planner.h"
#include "daemon/core/status.h"
#include "daemon/dataplane/bind.h"
#include "daemon/mem/memory.h"
#include "daemon/sync/engine_registry.h"
#include "daemon/sync/shard_chains.h"

namespace ws::server {

enum class SyncState { kPlanning, kStreaming, kCommitting, kCommitted, kAborted };

const char* SyncStateName(SyncState s);
inline bool IsTerminal(SyncState s) { return s == SyncState::kCommitted || s == SyncState::kAborted; }

struct SyncStats {
  uint64_t sync_id = 0;
  std::string model;
  uint64_t version = 0;
  std::string state;  // SyncStateName: planning | streaming | committing | committed | aborted
  uint64_t bytes_written = 0;
  uint64_t bytes_read = 0;
  double seconds = 0;  // begin -> end (or -> now while in flight)
  double gbps = 0;
  std::string error;
  uint32_t engines = 0;
  uint32_t world_size = 0;
};

// A manifest as received (wire dtypes not yet negotiated) with its name
// index. Its `version` is that of the sync that sent it; a session's own is
// SyncSession::version().
struct IndexedManifest {
  SourceManifest manifest;
  std::string fingerprint;  // BeginSyncRequest.manifest_fingerprint; may be empty
  std::unordered_map<std::string, uint32_t> index;  // tensor name -> first position
};
std::shared_ptr<const IndexedManifest> IndexManifest(SourceManifest manifest, std::string fingerprint);
// Same tensors, shapes, dtypes, shards, world size and negotiation flag.
bool SameManifest(const SourceManifest& a, const SourceManifest& b);

// A validated plan of one manifest for one engine set.
struct ReadyPlan {
  SyncPlan plan;
  std::vector<DType> wire;           // per tensor: the dtype its shards travel in
  std::vector<TensorDtypes> dtypes;  // with negotiate_dtypes: per tensor, as planned
  std::vector<std::weak_ptr<Engine>> engines;  // planned for exactly these registrations, in order
  std::vector<uint32_t> shard_group;  // per flat shard id: its coalescing group (shard_groups.h)
  ShardChains chains;                 // the groups' runs of constant destination stride (shard_chains.h)
  // Whether `engines` are still exactly those registrations (none joined,
  // left, or registered again with new memory).
  bool Fits(const std::vector<std::shared_ptr<Engine>>& engines) const;
};
// Negotiates dtypes (with manifest.negotiate_dtypes) and validates and builds
// the plan. Runs without any lock: engine specs and layouts are immutable.
Result<std::shared_ptr<const ReadyPlan>> MakeReadyPlan(const SourceManifest& manifest,
                                                       const std::vector<std::shared_ptr<Engine>>& engines);

// A pushed layer's shards: by tensor name, each with its own memory
// reference, and by manifest index, all in one memory object.
struct LayerShards {
  std::vector<std::pair<std::string, MemoryRef>> named;
  std::vector<uint32_t> index;
  std::vector<uint64_t> offset;  // per index entry: byte offset in `object`
  MemoryRef object;              // for the indexed shards; its offset and length are unused
};

// One shard of a pushed layer, matched against the manifest.
struct ClaimedShard {
  uint32_t tensor = 0, shard = 0;
  const MemoryRef* object = nullptr;  // the memory object (for named shards: their own reference)
  uint64_t offset = 0, length = 0;    // the shard's bytes in it
};

// Elements of one trainer shard (a contiguous range along `dim` of the
// tensor). Saturates at UINT64_MAX (no length can match it) on overflow or a
// negative extent; the planner has refused such manifests already.
uint64_t ShardElements(const SourceTensor& t, const ShardSpec& s);

// How BindLayer merges copies: kAuto uses the plan's chains (shard_chains.h)
// for a group whose shards a message holds at a constant source stride and
// walks every copy otherwise; kWalk always walks (tests compare the two).
enum class BindPath { kAuto, kWalk };

class SyncSession {
 public:
  using Clock = std::chrono::steady_clock;

  SyncSession(uint64_t id, std::string owner, uint64_t version, std::shared_ptr<const IndexedManifest> manifest,
              std::vector<std::shared_ptr<Engine>> engines);
  SyncSession(const SyncSession&) = delete;
  SyncSession& operator=(const SyncSession&) = delete;

  uint64_t id() const { return id_; }
  const std::string& owner() const { return owner_; }
  // The manifest as sent, with the negotiated dtypes in ready_plan()->wire.
  const SourceManifest& manifest() const { return manifest_->manifest; }
  const std::shared_ptr<const IndexedManifest>& indexed_manifest() const { return manifest_; }
  const std::string& model() const { return manifest_->manifest.model; }
  uint64_t version() const { return version_; }
  const std::vector<std::shared_ptr<Engine>>& engines() const { return engines_; }
  const SyncPlan& plan() const { return plan_->plan; }
  const std::shared_ptr<const ReadyPlan>& ready_plan() const { return plan_; }
  SyncState state() const { return state_; }
  bool terminal() const { return IsTerminal(state_); }
  const std::string& error() const { return error_; }
  // "sync ID"
  std::string Name() const { return "sync " + std::to_string(id_); }

  // ---- planning (no lock: only the BeginSync thread sees the session yet)
  // FailedPrecondition naming the param when an engine's memory is no longer
  // backed (a truncated shm object).
  Status CheckEnginesBacked() const;
  // planning -> streaming.
  void StartStreaming(std::shared_ptr<const ReadyPlan> plan);
  // Syncs across nodes. Before the session is shared (coordinator lock
  // held): this node's name and the node that holds the sources (leader; ""
  // = this daemon leads).
  void SetLeader(std::string self, std::string leader);
  // While planning: the packing of the copies into other nodes' engines
  // (cluster::BuildPackPlan); read only once the session streams.
  void SetPack(cluster::PackPlan pack);
  // While planning: the node each trainer rank pushes to (BeginSync
  // rank_nodes; empty: all to the leader).
  void SetRankNodes(std::vector<std::string> rank_nodes);
  const std::vector<std::string>& rank_nodes() const { return rank_nodes_; }
  // The node trainer rank `rank` pushes to; whether that is this one.
  const std::string& RankNode(uint32_t rank) const;
  bool RankHere(uint32_t rank) const { return RankNode(rank) == self_; }
  // The node of each flat shard of `plan` (its rank's), for BuildPackPlan.
  std::vector<std::string> ShardNodes(const SyncPlan& plan) const;
  const std::string& leader() const { return leader_; }
  const std::string& self_node() const { return self_; }
  const cluster::PackPlan& pack() const { return pack_; }
  // Nodes other than this one taking part (with engines or trainer ranks), sorted.
  std::vector<std::string> RemoteNodes() const;
  // Each engine's node name (this node's for local ones), for BuildPackPlan.
  std::vector<std::string> EngineNodes(const std::string& self) const;

  // ---- transitions (coordinator lock held)
  // streaming -> committing.
  void StartCommitting();
  // Any live state -> committed / aborted (with `reason` truncated as sent).
  void Finish(bool committed, const std::string& reason = "");

  // ---- streaming
  // Matches a layer's shards to unreceived manifest shards of `rank` and
  // marks them received. InvalidArgument lists what did not match. The
  // claimed shards point into `layer`.
  Result<std::vector<ClaimedShard>> ClaimShards(uint32_t rank, const LayerShards& layer, const std::string& where);
  // "tensor NAME (rank R)"
  std::string ShardName(uint32_t tensor, uint32_t shard) const;
  // The planned copies of `claimed` from `src` (one mapping per claimed
  // shard) into the engines, coalesced (the k-th copies of one shard group's
  // shards as one batched op where their offsets advance by constant
  // strides in the mapping their slices come from: shard_groups.h,
  // daemon/dataplane/coalesce.h), bound and checked against both mappings
  // (BindOp; a merged op against the whole source mapping, a single one
  // against its shard's slice). A merged op is named "tensors A .. B
  // (N shards, rank R) -> ENGINE param P". Where a group's shards are
  // consecutive members at a constant source stride, the runs come from the
  // plan's chains (per shard work); otherwise every copy is walked.
  Result<BoundOps> BindLayer(const std::vector<ClaimedShard>& claimed,
                             const std::vector<std::shared_ptr<Mapping>>& src, const std::string& where,
                             BindPath path = BindPath::kAuto) const;
  // "tensor NAME (rank R) -> ENGINE param P" for plan copy `copy`.
  std::string CopyName(uint32_t copy) const;
  // CopyName(first) for n = 1, else "tensors A .. B (N shards, rank R) ->
  // ENGINE param P" for plan copies first .. last (same engine param).
  std::string GroupName(uint32_t first, uint32_t last, uint32_t n) const;

  // ---- across nodes (leader): the packing of `claimed` for `node`. Returns
  // the chunks of those shards, in order; `place` gives each chunk's buffer
  // (as a mapping and a byte offset in it, aligned to 64). Binds the pack ops
  // (shard rectangles cast into the chunk buffers).
  std::vector<uint32_t> ChunksOf(const std::string& node, const std::vector<ClaimedShard>& claimed) const;
  Result<BoundOps> BindPack(const std::string& node, const std::vector<ClaimedShard>& claimed,
                            const std::vector<std::shared_ptr<Mapping>>& src, const std::vector<uint32_t>& chunks,
                            const Mapping& staging, const std::vector<uint64_t>& offsets,
                            const std::string& where) const;
  // ---- across nodes (a participating node): the scatter of received chunks
  // (at `offsets` into `buffer`) into this node's engines.
  const cluster::NodePack* MyPack() const;
  // Marks chunks received; InvalidArgument naming one out of range or seen before.
  Status ClaimChunks(const std::vector<uint32_t>& chunks);
  Result<BoundOps> BindScatter(const std::vector<uint32_t>& chunks, const Mapping& buffer,
                               const std::vector<uint64_t>& offsets, const std::string& where) const;
  // The message listing chunks never received; empty when none.
  std::string MissingChunks() const;

  // ---- commit
  // The message listing shards of this node's trainer ranks that never
  // arrived; empty when none.
  std::string MissingShards() const;
  Result<BoundOps> BindZeroFills() const;

  SyncStats Stats() const;

  // ---- pause barrier (coordinator lock held)
  // Engines that acknowledge `started` (acks_pause) and have in-place params:
  // writes into those params wait until the engine said it paused.
  bool NeedsPause(uint32_t engine) const { return awaiting_pause_.count(engine) > 0; }
  // Marks the engine paused; false when it is not one of this sync's engines.
  bool MarkPaused(const std::string& engine_id);
  // Those of `engines` that have not acknowledged the pause yet, described
  // ("engine ID (model M replica R tp_rank T, label)"), comma-separated;
  // empty when none.
  std::string Unpaused(const std::set<uint32_t>& engines) const;

  // Bookkeeping the Coordinator reads and writes with its lock held.
  int writers = 0;  // pushes / zero fills currently writing engine memory
  bool started_sent = false;
  bool aborted_sent = false;
  bool abort_from_peer = false;  // across nodes: the abort came from another node (not echoed back)
  std::set<std::string> pending_acks;
  std::set<std::string> acked;  // engines that applied this sync's version
  Clock::time_point last_activity = Clock::now();  // BeginSync / PushLayer, for the idle timeout
  uint64_t bytes_written = 0;
  uint64_t bytes_read = 0;
  uint64_t ops_run = 0;  // copy ops run on this node, after coalescing
  uint64_t groups_chained = 0, groups_walked = 0;  // BoundOps' counts, summed over the layers

 private:
  const uint64_t id_;
  const std::string owner_;  // principal of the BeginSync caller
  const uint64_t version_;
  const std::shared_ptr<const IndexedManifest> manifest_;
  const std::vector<std::shared_ptr<Engine>> engines_;  // keeps mappings alive while copies run
  std::shared_ptr<const ReadyPlan> plan_;
  std::vector<uint8_t> received_;  // per flat shard id (SyncPlan::shard_base)
  std::set<uint32_t> awaiting_pause_;  // set by StartStreaming, drained by MarkPaused
  std::string self_, leader_;
  cluster::PackPlan pack_;
  std::vector<std::string> rank_nodes_;
  std::vector<uint8_t> chunks_received_;  // participant: [chunk of MyPack()]
  SyncState state_ = SyncState::kPlanning;
  Clock::time_point begin_ = Clock::now();
  Clock::time_point end_;
  std::string error_;
};

}  // namespace ws::server
