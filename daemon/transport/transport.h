// Transports: how bytes get from a trainer shard to an engine parameter.
// Each declares the routes it serves (source memory kind, destination memory
// kind, same node or not: Route, daemon/mem/memory.h); the coordinator hands
// bound ops to a TransportRegistry, which picks the first registered
// transport serving each op's route. A transport for other nodes plugs in by
// being registered (daemon/main.cc), without touching the coordinator.
// Implemented today:
//   local: both ends mapped in this process (host shm, CUDA IPC); copies
//          run through an Executor with the full CopyOp semantics (cast,
//          transpose, slicing) straight into the destination.
// Packed chunks of syncs across nodes move between daemons by a chunk
// transport picked the same way, by route (same_node = false):
// ChunkTransports in peer_comm.h (UCX with host staging, NCCL GPU to GPU).
//
// Thread-safety: name()/caps() are const and safe anywhere; Copy() and the
// registry's Copy() may be called concurrently (transports are
// thread-safe); Add() only before the registry is shared.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "daemon/core/status.h"
#include "daemon/dataplane/bind.h"
#include "daemon/dataplane/executor.h"
#include "daemon/mem/memory.h"

namespace ws {

// What a transport can do: the routes it serves.
struct TransportCaps {
  std::vector<Route> routes;
  bool Serves(const Route& r) const;
  std::string ToString() const;  // "{host_shm -> host_shm on this node, ...}"
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  virtual TransportCaps caps() const = 0;
  // Runs `ops` (every op on a route caps() serves) to completion; returns the
  // destination bytes written.
  virtual Result<uint64_t> Copy(const BoundOps& ops) = 0;
};

// In-process copies through an Executor. `device_memory`: the executor also
// runs ops touching CUDA IPC memory (the data plane could start its device
// executor).
class LocalTransport final : public Transport {
 public:
  // `executor` must outlive the transport.
  LocalTransport(Executor* executor, bool device_memory) : executor_(executor), device_memory_(device_memory) {}

  const char* name() const override { return "local"; }
  TransportCaps caps() const override;
  Result<uint64_t> Copy(const BoundOps& ops) override { return executor_->RunNamed(ops.ops, ops.name); }

 private:
  Executor* const executor_;
  const bool device_memory_;
};

class TransportRegistry {
 public:
  void Add(std::shared_ptr<Transport> t) { transports_.push_back(std::move(t)); }
  // The first transport that serves `route`; FailedPrecondition naming the
  // route and the transports there are when none does.
  Result<Transport*> Pick(const Route& route) const;
  // Runs every op of `ops` on the transport its route picks (ops.routes;
  // ops without a route are same-node host copies), one Copy per transport;
  // returns the destination bytes written. Refused before any byte moves
  // when an op's route has no transport, naming the op.
  Result<uint64_t> Copy(const BoundOps& ops) const;

 private:
  std::vector<std::shared_ptr<Transport>> transports_;
};

}  // namespace ws
