// What the coordinator needs of the other nodes for syncs that span nodes
// (docs/architecture.md "Syncs across nodes"): the peer daemons' engines,
// the control calls of a sync on each node, and moving packed chunks. The
// daemon implements it over the peer gRPC RPCs and UCX
// (daemon/server/grpc_cluster_link.h); unit tests with fakes. A coordinator
// without one (or without up peers) plans and copies on its node only.
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "daemon/core/manifest.h"
#include "daemon/core/status.h"
#include "daemon/mem/memory.h"
#include "daemon/transport/peer_comm.h"

namespace ws::server {

// An engine rank as another node describes it (no memory).
struct RemoteEngine {
  std::string node;
  std::string engine_id;
  EngineRankSpec spec;
  // Where its parameters live: cuda_ipc with the device's UUID when all of
  // them are memory of one GPU this node can name, host_shm otherwise. Decides
  // whether chunks for it may travel GPU to GPU (PeerEngine.device_uuid).
  MemoryKind memory = MemoryKind::kHostShm;
  std::string device_uuid;
};

// What every participating node needs to derive the leader's plan and packing.
struct RemoteStart {
  std::string leader;
  uint64_t sync_id = 0;
  std::string owner;                   // principal of the BeginSync caller (may push layers on any node)
  std::vector<std::string> rank_nodes; // node of each trainer rank; empty: all on the leader
  SourceManifest manifest;             // wire dtypes, negotiate_dtypes unset
  std::vector<RemoteEngine> engines;   // every engine of every node, in plan order
  uint64_t chunk_bytes = 0;
  uint64_t copy_ops = 0;
  uint64_t bytes_planned = 0;
};

// A packed chunk (cluster::PackChunk) in memory: sent by its source node, or
// a buffer a node receives it into.
struct ChunkBuffer {
  uint32_t chunk = 0;
  void* data = nullptr;
  uint64_t bytes = 0;
};

// Sync data moved to / from one peer (device_sent / device_received: the
// part that went GPU to GPU, over NCCL).
struct PeerBytes {
  uint64_t sent = 0, received = 0;
  uint64_t device_sent = 0, device_received = 0;
};

// A window of chunks that goes GPU to GPU: the devices at both ends and the
// communicator the sender uses (PeerReceiveRequest.transport and the fields
// after it). The sender fills `transport` and the devices; `unique_id` and
// `generation` are the link's (set by the sending link, read by the
// receiving one).
struct DeviceTransfer {
  std::string transport;        // the ChunkTransport that carries it ("nccl")
  std::string sender_device;    // UUID of the GPU the chunks are staged on at the sender
  std::string receiver_device;  // UUID of the GPU they are received into
  std::string unique_id;        // non-empty: the sender made a new communicator; join it
  uint64_t generation = 0;      // the sender's communicator generation
};

// A window's chunks as one group of sends (or receives) on a PeerComm;
// `total` gets their bytes.
inline std::vector<PeerComm::P2P> ChunkExchange(bool send, const std::vector<ChunkBuffer>& chunks, uint64_t* total) {
  std::vector<PeerComm::P2P> ops;
  ops.reserve(chunks.size());
  *total = 0;
  for (const ChunkBuffer& ch : chunks) {
    ops.push_back(PeerComm::P2P{send, ch.data, ch.bytes, "chunk " + std::to_string(ch.chunk)});
    *total += ch.bytes;
  }
  return ops;
}

class ClusterLink {
 public:
  virtual ~ClusterLink() = default;
  virtual const std::string& self() const = 0;
  // Peers whose last probe succeeded, by node name.
  virtual std::vector<std::string> UpPeers() const = 0;
  // The prober has seen `node` down (not merely unknown); `why` gets its last error.
  virtual bool Down(const std::string& node, std::string* why) const = 0;
  // Bound on the packed bytes held for one peer at a time.
  virtual uint64_t staging_bytes() const = 0;

  // ---- leader side
  // `node`'s engine ranks of `model` (empty: it has none); learns its data
  // endpoint.
  virtual Result<std::vector<RemoteEngine>> Prepare(const std::string& node, const std::string& model) = 0;
  virtual Status Start(const std::string& node, const RemoteStart& start) = 0;
  // Runs the node's commit: returns once every engine there acknowledged
  // and its trainer ranks' shards all arrived.
  virtual Status Commit(const std::string& node, uint64_t sync_id) = 0;
  // Tells the nodes the sync is aborted; returns at once (best effort, in
  // the background). Also sent by a node taking part to the leader, when
  // the sync failed there.
  virtual void AbortAsync(std::vector<std::string> nodes, uint64_t sync_id, std::string reason) = 0;

  // ---- any node holding sources (the leader, or a node its ranks push to)
  // Sends `chunks` of the sync led by `leader` to `node` while it receives
  // and scatters them; returns once it has, with the engine bytes it wrote
  // (or the first error, naming the node).
  virtual Result<uint64_t> Send(const std::string& node, const std::string& leader, uint64_t sync_id,
                                const std::vector<ChunkBuffer>& chunks) = 0;

  // ---- any node with engines
  // Receives exactly `chunks` (each its `bytes`) sent by node `from` for the sync.
  virtual Status Receive(const std::string& from, uint64_t sync_id, const std::vector<ChunkBuffer>& chunks) = 0;

  // ---- chunks between GPUs (docs/architecture.md "Syncs across nodes")
  // The transport that carries chunks on `route` (same_node = false), by
  // capability; "ucx" (host staging) is the one every link has. A link
  // without a device transport answers "ucx" for every route.
  virtual Result<std::string> ChunkTransport(const Route& route) const {
    (void)route;
    return std::string("ucx");
  }
  // As Send, for chunks staged in device memory (ChunkBuffer::data on the
  // GPU `t.sender_device`) that `node` receives into `t.receiver_device`.
  virtual Result<uint64_t> SendDevice(const std::string& node, const std::string& leader, uint64_t sync_id,
                                      const std::vector<ChunkBuffer>& chunks, const DeviceTransfer& t) {
    (void)leader, (void)sync_id, (void)chunks;
    return Unimplemented("this daemon has no " + t.transport + " transport for chunks to node " + node);
  }
  // As Receive, into device memory of `t.receiver_device`.
  virtual Status ReceiveDevice(const std::string& from, uint64_t sync_id, const std::vector<ChunkBuffer>& chunks,
                               const DeviceTransfer& t) {
    (void)sync_id, (void)chunks;
    return Unimplemented("this daemon has no " + t.transport + " transport for chunks from node " + from);
  }
};

}  // namespace ws::server
