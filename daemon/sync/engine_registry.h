// Engine registrations: what each engine rank registered (spec, resolved
// layout, mapped parameter memory), the models they form, and per-principal
// quotas. The stateless steps of a registration (spec checks, layout
// resolution, mapping memory) are free functions that run without any lock;
// EngineRegistry holds the shared state.
//
// Thread-safety: EngineRegistry is not synchronized itself; its owner (the
// Coordinator) guards it with its mutex. Engine specs, layouts and mappings
// are immutable once an engine is added, so holders of a shared_ptr<Engine>
// may read them without that lock; `sink` and `applied_version` are changed
// under it.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "daemon/core/layout.h"
#include "daemon/core/limits.h"
#include "daemon/core/manifest.h"
#include "daemon/core/status.h"
#include "daemon/mem/memory.h"
#include "daemon/sync/events.h"
#include "daemon/sync/peer.h"

namespace ws::server {

struct Engine {
  std::string id;
  // "" = registered with this daemon. Otherwise the peer node whose daemon
  // holds it (a sync across nodes plans it here): no memory, no sink.
  std::string node;
  // An engine of another node: where its parameters live there
  // (RemoteEngine::memory, device_uuid).
  MemoryKind remote_memory = MemoryKind::kHostShm;
  std::string remote_device;
  std::string owner;  // principal of the peer that registered it
  std::string label;
  EngineRankSpec spec;
  RankLayout layout;
  std::vector<std::shared_ptr<Mapping>> maps;  // one per spec.params entry
  std::vector<MemoryExtent> extents;           // maps[i]->extent()
  std::vector<uint32_t> extent_order;          // indices of extents sorted by (object, begin); set by Add
  uint64_t bytes = 0;
  EventSink* sink = nullptr;  // null once unregistered
  uint64_t applied_version = 0;

  bool local() const { return node.empty(); }
  std::string Describe() const;
};

struct Model {
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

// "model M replica R tp_rank T": the prefix of registration messages.
std::string DescribeRank(const EngineRankSpec& spec);

// Field checks of a registration request; returns the parsed hf_config_json.
Result<nlohmann::json> CheckEngineSpec(const EngineRankSpec& spec, size_t memory_refs, const Limits& limits);

// The rank's layout: the architecture's rule file plus explicit per-param
// mappings, validated against the spec.
Result<RankLayout> ResolveEngineLayout(const LayoutRegistry& layouts, const EngineRankSpec& spec,
                                       const Limits& limits);

// Maps every param writable for `caller` (exactly numel * dtype size bytes,
// aligned to the element size) and reserves its pages. Sets *bytes to the total.
Result<std::vector<std::shared_ptr<Mapping>>> MapEngineParams(MemoryDomain& domain, const EngineRankSpec& spec,
                                                              const std::vector<MemoryRef>& memory,
                                                              const Peer& caller, uint64_t* bytes);

// Bytes of `elems` elements of `dt`, saturating at UINT64_MAX.
uint64_t ElemBytes(uint64_t elems, DType dt);

struct RegistryOptions {
  uint32_t max_engines_per_peer = 4096;
  Limits limits;
};

class EngineRegistry {
 public:
  EngineRegistry(RegistryOptions opts, std::string boot_id);
  EngineRegistry(const EngineRegistry&) = delete;
  EngineRegistry& operator=(const EngineRegistry&) = delete;

  // Cheap refusals of a registration: ownership of the model, a sync in
  // flight, the caller's quota. Checked before and again after mapping.
  Status Admit(const Peer& caller, const std::string& model) const;
  // Checks `e` (memory mapped, spec.params set) against the registered
  // engines and its model, then adds it under a new id. Admit first.
  Result<std::string> Add(const Peer& caller, std::shared_ptr<Engine> e, EngineRankSpec spec, nlohmann::json config);
  // PermissionDenied unless `caller` owns the engine.
  Result<std::shared_ptr<Engine>> FindOwned(const Peer& caller, const std::string& engine_id,
                                            const char* action) const;
  // Drops the engine and its count against its owner; the model stays (its
  // engine_count decremented) for the caller to release.
  void Remove(const Engine& e);

  Model* FindModel(const std::string& name);
  // The sync `sync_id` no longer holds the model; drops a model without engines.
  void ReleaseModel(const std::string& name, uint64_t sync_id);
  // The model's engines ordered by (replica, tp_rank); an error naming the
  // missing tp ranks unless every replica is complete.
  Result<std::vector<std::shared_ptr<Engine>>> CompleteEngines(const Model& m) const;

  const std::map<std::string, std::shared_ptr<Engine>>& engines() const { return engines_; }
  const std::map<std::string, Model>& models() const { return models_; }

 private:
  // Refuses memory of `e` that overlaps itself (except declared ties) or any
  // registered engine's.
  Status CheckIsolation(const Engine& e, const std::string& who) const;
  Status CheckModelCompatible(const Model& model, const EngineRankSpec& spec) const;

  const RegistryOptions opts_;
  const std::string boot_id_;
  uint64_t next_engine_ = 1;
  std::map<std::string, std::shared_ptr<Engine>> engines_;
  std::map<std::string, Model> models_;
  std::map<std::string, uint32_t> engines_by_owner_;  // principal -> registered engine ranks
};

}  // namespace ws::server
