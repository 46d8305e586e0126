// The daemon's domain logic: engine registrations and weight syncs. No gRPC
// and no protobuf here; daemon/server/service.cc converts requests into these
// calls, and the unit tests drive it directly.
//
// Lifecycle of a sync: BeginSync (plan, nothing written; engines hear
// Started) -> PushLayer* (bytes land in engine memory layer by layer; writes
// into an engine's in-place params wait for its AckPaused when it declared
// acks_pause) -> Commit (zero fills, Committed to
// every engine, wait for every engine's AckVersion) -> committed. Any error
// on an in-flight sync aborts it: every engine of the model hears Aborted.
//
// The coordinator owns an EngineRegistry (daemon/sync/engine_registry.h:
// registrations, mapped memory, layouts) and the SyncSessions in flight
// (daemon/sync/sync_session.h: one sync's state machine and its copy
// binding), and runs the housekeeping thread.
//
// Thread-safety: every public method may be called from any thread. One mutex
// (mu_) guards all state, the registry's and the sessions' included; it is
// never held while bytes are copied, while
// memory is mapped, or while a plan is built. EventSink::Deliver is called
// with mu_ held (this keeps Started/Committed/Aborted in order per engine),
// so sinks must only enqueue. Engine memory is written only by the pushes and
// the commit of the model's one in-flight sync; an aborted sync keeps its
// model busy until its last running copy has finished, and only then are
// engines told Aborted, so an engine that hears Aborted knows the daemon has
// stopped writing into its memory. The memory domain's cache is trimmed
// (outside mu_) after an engine leaves or a sync aborts; trainer objects stay
// cached across committed syncs.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "daemon/core/clock.h"
#include "daemon/core/layout.h"
#include "daemon/core/limits.h"
#include "daemon/core/manifest.h"
#include "daemon/core/planner.h"
#include "daemon/core/status.h"
#include "daemon/core/thread_annotations.h"
#include "daemon/dataplane/executor.h"
#include "daemon/transport/transport.h"
#include "daemon/mem/memory.h"
#include "daemon/server/observer.h"
#include "daemon/sync/cluster_link.h"
#include "daemon/sync/device_staging.h"
#include "daemon/sync/engine_registry.h"
#include "daemon/sync/events.h"
#include "daemon/sync/peer.h"
#include "daemon/sync/sync_session.h"

namespace ws::server {

struct CoordinatorOptions {
  std::chrono::milliseconds ack_timeout{60000};  // Commit's wait for every engine's AckVersion
  // A sync that makes no progress (BeginSync, a layer landing) for this long
  // before Commit is aborted and its model freed, whether or not the
  // trainer's streams are still open: a trainer that died or hung between
  // BeginSync and its layers would otherwise hold the model. Time spent
  // copying a layer does not count. 0 = never.
  std::chrono::milliseconds progress_timeout{30000};
  // The clock progress_timeout is measured in; null: the steady clock
  // (tests inject a fake one). Must outlive the Coordinator.
  const Clock* clock = nullptr;
  // How often the housekeeping thread checks idle syncs and unmaps shm
  // objects whose owners unlinked them (MemoryDomain::TrimStale).
  std::chrono::milliseconds housekeeping_interval{1000};
  // Per-peer quotas (a peer = one principal, see Peer): engine ranks it has
  // registered and syncs it has in flight. Refusals name the limit.
  uint32_t max_engines_per_peer = 4096;
  uint32_t max_syncs_per_peer = 64;
  // Request limits: JSON parsing and layout resolution here, request sizes in
  // the gRPC layer (which reads them through limits()).
  Limits limits;
  // Told of every finished sync and every housekeeping pass; must outlive
  // the Coordinator.
  std::vector<CoordinatorObserver*> observers;
  // Syncs across nodes: the peer daemons (null = this node only). BeginSync
  // plans over the engines of every up peer too; must outlive the Coordinator.
  ClusterLink* cluster = nullptr;
  // Packed chunks are at most this big (and at most the link's staging bound).
  uint64_t max_chunk_bytes = 4u << 20;
  // Device staging for chunks that go GPU to GPU between nodes (the link's
  // device transport, NCCL); null: every chunk is staged in host memory.
  // Must outlive the Coordinator.
  DeviceStaging* device_staging = nullptr;
};

struct BeginSyncResult {
  uint64_t sync_id = 0;
  uint32_t engines = 0;
  uint64_t copy_ops = 0;
  uint64_t bytes_planned = 0;
  // With manifest.negotiate_dtypes: one entry per manifest tensor, in order;
  // empty when both the manifest and its plan were reused (the trainer has
  // them from the sync that sent the manifest).
  std::vector<TensorDtypes> dtypes;
  bool plan_reused = false;      // the model's last validated plan, unchanged
  bool manifest_reused = false;  // the manifest kept under manifest.fingerprint
};

struct LayerResult {
  std::string layer;
  uint64_t bytes_written = 0;
  double seconds = 0;
};

struct EngineInfo {
  std::string engine_id;
  std::string model;
  std::string architecture;
  uint32_t replica_id = 0;
  uint32_t tp_rank = 0;
  uint32_t tp_size = 0;
  uint32_t params = 0;
  uint64_t bytes = 0;
  uint64_t applied_version = 0;
  std::string label;
  std::string owner;  // principal of the peer that registered it
  uint32_t staged_params = 0;
  uint64_t staged_bytes = 0;
  bool acks_pause = false;
};

struct ModelInfo {
  std::string model;
  std::string architecture;
  uint32_t replicas = 0;
  uint32_t engine_ranks = 0;
  uint64_t committed_version = 0;
};

struct StatusSnapshot {
  double uptime_seconds = 0;
  std::vector<EngineInfo> engines;
  std::vector<ModelInfo> models;
  std::vector<SyncStats> current_syncs;
  std::optional<SyncStats> last_sync;
  uint64_t syncs_committed = 0;
  uint64_t syncs_aborted = 0;
};

class Coordinator {
 public:
  // `domain` must outlive the Coordinator. Bound copies go to the transport
  // `transports` picks for their route.
  Coordinator(std::shared_ptr<const LayoutRegistry> layouts, MemoryDomain* domain,
              std::shared_ptr<const TransportRegistry> transports, CoordinatorOptions opts = {});
  // One local transport over `executor` (which must outlive the Coordinator)
  // for every same-node route.
  Coordinator(std::shared_ptr<const LayoutRegistry> layouts, MemoryDomain* domain, Executor* executor,
              CoordinatorOptions opts = {});
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  // Resolves the rank's layout, validates its params against it and against
  // `memory` (one ref per spec.params entry, numel*dtype bytes each), maps every
  // param for the registration's lifetime. Returns the engine id. `sink` must
  // stay valid until UnregisterEngine(id) returns.
  //
  // Every method takes the calling peer. Engines, models and syncs belong to
  // the principal that created them (a model to the principal of its first
  // engine); only that principal or an admin peer may act on them. Memory is
  // mapped for the caller (Peer::ToAccessor), and a parameter's memory may not
  // overlap any other registered parameter's (of any engine or model) unless
  // it is the same range declared as a tied copy (EngineParamSpec::tied_to).
  Result<std::string> RegisterEngine(const Peer& caller, EngineRankSpec spec, std::vector<MemoryRef> memory,
                                     EventSink* sink, std::string label = "");
  // Drops the registration (and its mappings once no running copy uses them);
  // aborts an in-flight sync of its model.
  Status UnregisterEngine(const Peer& caller, const std::string& engine_id);

  // Plans a sync over every engine rank of manifest.model. Nothing is written.
  // With manifest.negotiate_dtypes each tensor's dtype is its source dtype:
  // the wire dtype is chosen (NegotiateDTypes), planned and returned.
  // Each model's last manifest and plan are kept: manifest.reuse_manifest
  // takes the manifest kept under manifest.fingerprint (NotFound when none
  // is), and a sync of the same manifest over the same engine registrations
  // reuses the validated plan; anything else plans and validates afresh.
  Result<BeginSyncResult> BeginSync(const Peer& caller, SourceManifest manifest);
  // Maps and validates every shard of one layer, then copies them into the
  // engines (blocking). Any error aborts the sync.
  Result<LayerResult> PushLayer(const Peer& caller, uint64_t sync_id, uint32_t rank, const std::string& layer,
                                const LayerShards& shards);
  Result<LayerResult> PushLayer(const Peer& caller, uint64_t sync_id, uint32_t rank, const std::string& layer,
                                const std::vector<std::pair<std::string, MemoryRef>>& shards) {
    LayerShards l;
    l.named = shards;
    return PushLayer(caller, sync_id, rank, layer, l);
  }
  // Zero fills, Committed to every engine, waits for every AckVersion.
  Result<SyncStats> Commit(const Peer& caller, uint64_t sync_id);
  // Aborts an in-flight sync; engines hear Aborted with `reason` as given.
  Status Abort(const Peer& caller, uint64_t sync_id, const std::string& reason);
  Status AckVersion(const Peer& caller, const std::string& engine_id, uint64_t version, bool ok,
                    const std::string& error);
  // After `started`: the engine paused; in-place writes into it may begin.
  Status AckPaused(const Peer& caller, const std::string& engine_id, uint64_t sync_id);
  // A trainer rank's Push stream ended; an unclean end before Commit aborts.
  // Ignored unless `caller` owns the sync.
  void TrainerStreamClosed(const Peer& caller, uint64_t sync_id, uint32_t rank, bool clean);
  // Aborts every in-flight sync and refuses new registrations and syncs.
  void AbortAll(const std::string& reason,
                std::chrono::milliseconds drain = std::chrono::milliseconds(0));

  // ---- syncs across nodes, on a node the leader (the daemon that got
  // BeginSync, node `leader`) involves; called by the peer RPCs. Trainer
  // ranks placed on this node (BeginSync rank_nodes) push their layers here
  // with PushLayer (sync id = the leader's) once PeerStart accepted it.
  // This node's complete engine ranks of `model` (none: not participating).
  Result<std::vector<RemoteEngine>> PeerPrepare(const std::string& model) const;
  // Plans the leader's sync again from `start` (checked against its copy and
  // byte counts) and streams: this node's engines hear Started.
  Status PeerStart(RemoteStart start);
  // Receives `chunks` of the sync led by `leader` from node `from` (the
  // leader or another node holding sources; ClusterLink::Receive) and
  // scatters them into this node's engines; returns the engine bytes
  // written. Also runs on the leader, for chunks from other nodes' ranks.
  // With `device` (PeerReceiveRequest.transport set), the chunks come GPU to
  // GPU: refused unless every engine param they scatter into is memory of
  // the GPU `device->receiver_device` here.
  Result<uint64_t> PeerReceive(const std::string& leader, const std::string& from, uint64_t sync_id,
                               const std::vector<uint32_t>& chunks, const DeviceTransfer* device = nullptr);
  // Every shard of this node's trainer ranks and every chunk arrived: zero
  // fills, Committed, waits for the engines' acks.
  Result<uint64_t> PeerCommit(const std::string& leader, uint64_t sync_id);
  // Aborts the sync here (no-op when it is not in flight). From the leader
  // on a node taking part; from a node taking part on the leader, which then
  // aborts it on every node.
  Status PeerAbort(const std::string& from, uint64_t sync_id, const std::string& reason);

  StatusSnapshot GetStatus() const;
  const Limits& limits() const { return opts_.limits; }

 private:
  // Declared first in a method, so it runs last: trims the memory domain's
  // cache (outside mu_, after the method's own references are gone) when an
  // engine left or a sync aborted, so their shm objects get unmapped; and
  // (MemoryDomain::TrimCuda) when any sync finished, so trainer IPC handles
  // are closed after every commit or abort.
  struct TrimGuard {
    Coordinator* c;
    ~TrimGuard();
  };
  // What is kept of a finished sync, for messages to late callers.
  struct FinishedSync {
    SyncState state = SyncState::kCommitted;
    std::string error;
    std::string owner;
  };

  // RegisterEngine: shutdown, then the registry's admission checks.
  Status AdmitLocked(const Peer& caller, const std::string& model) const WS_REQUIRES(mu_);
  // BeginSync: rank_nodes is empty or names one node per rank, each this
  // node ("" too) or an up peer; cleared when every rank is on this node.
  Status CheckRankNodes(uint32_t world_size, std::vector<std::string>* rank_nodes) const;
  // BeginSync across nodes: every up peer's engines of `model` (layouts resolved here).
  Result<std::vector<std::shared_ptr<Engine>>> RemoteEngines(const std::string& model) WS_EXCLUDES(mu_);
  // An engine of another node as planned here.
  Result<std::shared_ptr<Engine>> RemoteEngineOf(const RemoteEngine& r) const;
  // BeginSync across nodes: packs the plan per node and starts the sync on
  // every other node with engines; on a refusal aborts those started.
  Status StartRemote(SyncSession& sync, const ReadyPlan& ready) WS_EXCLUDES(mu_);
  // PushLayer across nodes: packs `claimed` for every other node and sends
  // it; returns the engine bytes the nodes wrote.
  Result<uint64_t> SendRemote(SyncSession& sync, const std::vector<ClaimedShard>& claimed,
                              const std::vector<std::shared_ptr<Mapping>>& src, const std::string& where)
      WS_EXCLUDES(mu_);
  // How `node`'s chunks of `claimed` travel: groups of chunks in order, each
  // host-staged (transport empty) or GPU to GPU (a device transport and the
  // devices at both ends), chosen by the link's ChunkTransport for each
  // chunk's route (its shard's memory, its scatter targets' memory).
  struct ChunkPath {
    DeviceTransfer device;  // transport "" = host staging (UCX)
    std::vector<uint32_t> chunks;
  };
  Result<std::vector<ChunkPath>> ChunkPaths(const SyncSession& sync, const std::string& node,
                                            const std::vector<ClaimedShard>& claimed,
                                            const std::vector<std::shared_ptr<Mapping>>& src,
                                            const std::vector<uint32_t>& chunks) const;
  // PeerReceive GPU to GPU: every engine param the chunks scatter into is
  // memory of `device.receiver_device`; InvalidArgument naming one otherwise.
  Status CheckDeviceTargets(const SyncSession& sync, const std::vector<uint32_t>& chunks,
                            const DeviceTransfer& device, const std::string& where) const;
  // This node's engine as other nodes see it (its memory kind and device).
  RemoteEngine Describe(const Engine& e, const std::string& node) const;
  // Participant: the sync `sync_id` led by `leader`, live.
  Result<std::shared_ptr<SyncSession>> FindLedLocked(const std::string& leader, uint64_t sync_id) WS_REQUIRES(mu_);
  // BeginSync: every check against the model, then a planning session that
  // holds it (the model's local engines, then `remote`: other nodes' engines).
  Result<std::shared_ptr<SyncSession>> ReserveSyncLocked(const Peer& caller,
                                                         std::shared_ptr<const IndexedManifest> manifest,
                                                         uint64_t version,
                                                         std::vector<std::shared_ptr<Engine>> remote) WS_REQUIRES(mu_);
  // BeginSync: streaming with `plan` (which is then kept for the model when
  // the sync is single-node and led here), or the session dropped (engines
  // heard nothing).
  Result<BeginSyncResult> StartSyncLocked(const std::shared_ptr<SyncSession>& sync,
                                          Result<std::shared_ptr<const ReadyPlan>> plan, bool plan_reused,
                                          bool manifest_reused) WS_REQUIRES(mu_);
  // Forgets the kept manifest and plan of a model that no longer exists.
  void DropKeptIfGoneLocked(const std::string& model) WS_REQUIRES(mu_);
  // PushLayer: state checks, then claims the layer's shards and counts a writer.
  Result<std::vector<ClaimedShard>> ClaimLayerLocked(SyncSession& sync, uint32_t rank, const LayerShards& shards,
                                                     const std::string& where) WS_REQUIRES(mu_);
  // PushLayer: ends a write begun by ClaimLayerLocked; a failure aborts the sync.
  // With `ran` (and st ok), first counts its ops, the bytes they read and the
  // `written` destination bytes into the sync.
  Status EndWrite(SyncSession& sync, Status st, const BoundOps* ran = nullptr, uint64_t written = 0)
      WS_EXCLUDES(mu_);
  // Commit: runs the plan's zero fills with mu_ released.
  Status ZeroFillLocked(MutexLock& lk, SyncSession& sync) WS_REQUIRES(mu_);
  // Before in-place writes into `engines`: waits until each that acknowledges
  // pauses has done so (bounded by progress_timeout, else ack_timeout); on
  // timeout aborts the sync naming the engines.
  Status AwaitPausedLocked(MutexLock& lk, SyncSession& sync, const std::set<uint32_t>& engines,
                           const std::string& where) WS_REQUIRES(mu_);
  // Commit: Committed to every engine, then waits for every AckVersion.
  Status AwaitAcksLocked(MutexLock& lk, SyncSession& sync) WS_REQUIRES(mu_);

  void AbortLocked(SyncSession& sync, const std::string& reason) WS_REQUIRES(mu_);
  void FinishLocked(SyncSession& sync, bool committed, const std::string& reason = "") WS_REQUIRES(mu_);
  void ReleaseIfIdleLocked(SyncSession& sync) WS_REQUIRES(mu_);
  void EmitLocked(const SyncSession& sync, EngineEvent::Kind kind, const std::string& reason = "") WS_REQUIRES(mu_);
  Result<std::shared_ptr<SyncSession>> FindLiveLocked(uint64_t sync_id) WS_REQUIRES(mu_);
  // FindLiveLocked, then PermissionDenied unless `caller` owns the sync.
  Result<std::shared_ptr<SyncSession>> FindOwnedLocked(const Peer& caller, uint64_t sync_id, const char* action)
      WS_REQUIRES(mu_);

  const std::shared_ptr<const LayoutRegistry> layouts_;
  MemoryDomain* const domain_;
  const std::shared_ptr<const TransportRegistry> transports_;
  const CoordinatorOptions opts_;
  const Clock& clock_;  // opts_.clock or the steady clock
  const std::chrono::steady_clock::time_point started_;

  void HousekeepingLoop() WS_EXCLUDES(mu_);
  std::condition_variable housekeeping_cv_;  // wakes the loop early on shutdown
  std::thread housekeeping_;                 // started last in the constructor, joined first

  mutable Mutex mu_;
  std::condition_variable cv_;  // writers drained, acks arrived, syncs aborted
  bool stop_housekeeping_ WS_GUARDED_BY(mu_) = false;
  bool shutting_down_ WS_GUARDED_BY(mu_) = false;
  bool trim_pending_ WS_GUARDED_BY(mu_) = false;
  // A sync planned anew: the next Commit (or Abort) hands the heap its
  // streaming freed back to the system too (ReleaseFreeHeap).
  bool heap_trim_pending_ WS_GUARDED_BY(mu_) = false;
  bool trim_cuda_pending_ WS_GUARDED_BY(mu_) = false;
  uint64_t next_sync_id_ WS_GUARDED_BY(mu_);
  EngineRegistry registry_ WS_GUARDED_BY(mu_);
  std::map<uint64_t, std::shared_ptr<SyncSession>> syncs_ WS_GUARDED_BY(mu_);  // in flight (incl. aborted, draining)
  std::map<uint64_t, FinishedSync> finished_ WS_GUARDED_BY(mu_);              // the most recent ones
  std::optional<SyncStats> last_sync_ WS_GUARDED_BY(mu_);
  // Each model's last planned manifest and plan, for syncs that reuse them.
  struct KeptPlan {
    std::shared_ptr<const IndexedManifest> manifest;
    std::shared_ptr<const ReadyPlan> plan;
  };
  std::map<std::string, KeptPlan> kept_ WS_GUARDED_BY(mu_);
  uint64_t syncs_committed_ WS_GUARDED_BY(mu_) = 0;
  uint64_t syncs_aborted_ WS_GUARDED_BY(mu_) = 0;
};

}  // namespace ws::server
