// Point-to-point communicators between a GPU of this daemon and a GPU of
// another node's daemon, for the packed chunks of syncs across nodes whose
// both ends are device memory (docs/architecture.md "Syncs across nodes").
//
//  - PeerComm: a two-rank communicator (rank 0: the node sending chunks,
//    rank 1: the node receiving them) that runs a window's sends or receives
//    as one group, to completion or its deadline; any failure or deadline
//    aborts it (ncclCommAbort for NCCL) and it refuses further use.
//  - PeerCommFactory: makes unique ids and joins communicators. The NCCL
//    implementation is MakeNcclPeerCommFactory() (CUDA builds:
//    daemon/transport/cuda/nccl_peer_comm.cc; null elsewhere:
//    no_nccl_peer_comm.cc); unit tests use an in-process fake over host
//    memory (tests/unit/testing/fake_peer_comm.h).
//  - PeerCommCache: one communicator per (peer node, local device, remote
//    device, direction), created once and reused by every later window and
//    sync; a communicator that failed is dropped, and the next window
//    rebuilds it with a fresh unique id (a new generation). One per
//    direction, not one per pair: the sender always makes it (no race when
//    two nodes start sending each other at once), and each direction's
//    windows are serialised on their own (one shared communicator would make
//    a node's send wait for its receive while the peer's does the reverse).
//  - ChunkTransports: which transport carries a window of chunks across
//    nodes, chosen by capability (Route: source kind, destination kind,
//    same_node = false), as the TransportRegistry does for local copies.
//
// The unique id travels in the peer gRPC (PeerReceiveRequest), so only
// authenticated peers can join a communicator of this daemon.
//
// Thread-safety: PeerComm: one thread at a time (the cache serialises each
// entry). PeerCommFactory, PeerCommCache and ChunkTransports: every method
// may be called from any thread.
#pragma once

#include <chrono>
#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "daemon/core/status.h"
#include "daemon/core/thread_annotations.h"
#include "daemon/mem/memory.h"
#include "daemon/transport/transport.h"

namespace ws {

class PeerComm {
 public:
  struct P2P {
    bool send = true;
    void* ptr = nullptr;  // memory of the communicator's device (host memory for the fake)
    uint64_t bytes = 0;
    std::string what;     // "chunk 7", for errors
  };
  virtual ~PeerComm() = default;
  // Runs every op with the other rank as one group (matched in order with
  // the other rank's ops of the opposite direction), to completion or the
  // deadline. Any failure aborts the communicator; later calls are refused.
  virtual Status Exchange(const std::vector<P2P>& ops) = 0;
};

class PeerCommFactory {
 public:
  virtual ~PeerCommFactory() = default;
  virtual const char* name() const = 0;  // "nccl"
  // An opaque id that rank 0 makes and sends the other rank.
  virtual Result<std::string> NewUniqueId() = 0;
  // Joins the two-rank communicator `unique_id` as `rank` on the device
  // named by `device_uuid`; DeadlineExceeded (and nothing left running) when
  // the other rank does not join within `timeout`, which also bounds each
  // Exchange.
  virtual Result<std::unique_ptr<PeerComm>> Join(const std::string& unique_id, int rank,
                                                 const std::string& device_uuid,
                                                 std::chrono::milliseconds timeout) = 0;
};

// The NCCL factory in CUDA builds; null in builds without CUDA.
std::unique_ptr<PeerCommFactory> MakeNcclPeerCommFactory();

// Which communicator: the other node and the devices at both ends.
struct CommKey {
  std::string peer;
  std::string local_device;   // UUID
  std::string remote_device;  // UUID
  auto operator<=>(const CommKey&) const = default;
  std::string ToString() const;  // "node b (GPU-1 here, GPU-2 there)"
};

class PeerCommCache {
 public:
  struct Entry;
  // What a window needs to use a communicator: the entry and, when the
  // communicator is new on the sending side, the unique id to send with the
  // window (rank 1 joins with it).
  struct Lease {
    std::shared_ptr<Entry> entry;
    std::string new_unique_id;  // non-empty: send it; the other node joins
    uint64_t generation = 0;
  };
  struct Stats {
    uint64_t created = 0;  // communicators joined
    uint64_t reused = 0;   // exchanges on a communicator made earlier
    uint64_t dropped = 0;  // communicators aborted and dropped
    uint64_t bytes_sent = 0, bytes_received = 0;
    size_t live = 0;
  };

  // `factory` must outlive the cache; `timeout` bounds each join and exchange.
  PeerCommCache(PeerCommFactory* factory, std::chrono::milliseconds timeout);
  ~PeerCommCache();
  PeerCommCache(const PeerCommCache&) = delete;
  PeerCommCache& operator=(const PeerCommCache&) = delete;

  const char* name() const;
  // Sending side (rank 0): the live communicator of `key`, or a new entry
  // with a fresh unique id and the next generation.
  Result<Lease> ForSend(const CommKey& key);
  // Receiving side (rank 1). With a `unique_id`, the sender made a new
  // communicator: any older one of `key` is dropped and a new entry of
  // `generation` made. Without, the live entry of `key` must be of
  // `generation`; FailedPrecondition otherwise (the sender drops its entry
  // and the next window rebuilds both).
  Result<Lease> ForReceive(const CommKey& key, const std::string& unique_id, uint64_t generation);
  // Runs `ops` on the lease's communicator, joining it first when needed
  // (rank 0 for ForSend leases, rank 1 for ForReceive). On any failure the
  // communicator is aborted and its entry dropped.
  Status Exchange(const Lease& lease, const std::vector<PeerComm::P2P>& ops);
  // Drops `key`'s sending entry if it is still of `generation` (a window
  // failed outside the exchange, e.g. the other node refused it).
  void Drop(const CommKey& key, uint64_t generation);
  Stats stats() const;

 private:
  void DropEntry(const std::shared_ptr<Entry>& e);

  PeerCommFactory* const factory_;
  const std::chrono::milliseconds timeout_;
  mutable Mutex mu_;
  // By key and rank (0: this node sends on it, 1: it receives).
  std::map<std::pair<CommKey, int>, std::shared_ptr<Entry>> entries_ WS_GUARDED_BY(mu_);
  uint64_t next_generation_ WS_GUARDED_BY(mu_) = 1;
  Stats stats_ WS_GUARDED_BY(mu_);
};

// The transports that carry packed chunks across nodes, in order of
// preference, each with the routes it serves (same_node = false).
class ChunkTransports {
 public:
  // Adds a transport by name; only before the object is shared.
  void Add(std::string name, TransportCaps caps);
  // The first transport serving `route`; FailedPrecondition naming the route
  // and the transports there are when none does.
  Result<std::string> Pick(const Route& route) const;
  std::string ToString() const;  // "nccl {cuda_ipc -> cuda_ipc across nodes}, ucx {...}"

 private:
  std::vector<std::pair<std::string, TransportCaps>> transports_;
};

// The routes of the host-staged transport (UCX): any memory kind at either
// end, packed into and scattered from host staging buffers.
TransportCaps HostStagedCaps();
// The routes of a device-to-device transport (NCCL): CUDA memory at both ends.
TransportCaps DeviceCaps();

}  // namespace ws
