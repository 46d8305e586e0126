// NCCL transport (only in builds with CUDA; the implementation lives in
// ws_cuda, daemon/transport/cuda/nccl_transport.cc).
//
// Implemented: an RAII communicator (non-blocking ncclCommInitRankConfig on
// the device named by UUID, ncclCommDestroy on destruction), and blocking
// send/recv of raw byte ranges of device memory, singly or as one NCCL group
// (so pairwise exchanges cannot deadlock). Joining and every exchange have a
// deadline (`timeout`): a peer that never shows up, an NCCL error, or a
// failed send/recv inside a group aborts the communicator (ncclCommAbort, so
// nothing of a partial group keeps running) and the transport refuses
// further use; make a new one.
// Used by syncs across nodes through PeerComm (daemon/transport/peer_comm.h,
// cuda/nccl_peer_comm.cc: two ranks, one per node), which carries the
// unique id in the peer RPC and caches the communicators.
// Not implemented here: exchanging the unique id (the caller carries it out
// of band), casts/layout on receive (bytes arrive as sent; run an Executor on
// the received buffer), abort from another thread, host memory.
//
// Thread-safety: one thread at a time per NcclTransport (NCCL communicators
// are not thread-safe); different instances are independent.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "daemon/core/status.h"

namespace ws {

class NcclTransport final {
 public:
  // ncclGetUniqueId as bytes (128); rank 0 makes it, every rank passes it to Create.
  static Result<std::string> NewUniqueId();
  // Joins a communicator of `nranks` ranks as `rank` on the device with this
  // UUID. Blocks until every rank has joined; DeadlineExceeded (communicator
  // aborted) after `timeout`, which also bounds each Exchange.
  static Result<std::unique_ptr<NcclTransport>> Create(const std::string& unique_id, int nranks, int rank,
                                                       const std::string& device_uuid,
                                                       std::chrono::milliseconds timeout = std::chrono::seconds(120));
  ~NcclTransport();
  NcclTransport(const NcclTransport&) = delete;
  NcclTransport& operator=(const NcclTransport&) = delete;

  int rank() const;
  int nranks() const;

  struct P2P {
    bool send = true;
    int peer = 0;
    void* ptr = nullptr;  // device memory on this communicator's device
    uint64_t bytes = 0;
    std::string what;     // tensor name for errors
  };
  // Runs all sends/receives as one group, to completion or the deadline.
  Status Exchange(const std::vector<P2P>& ops);
  Status Send(const void* ptr, uint64_t bytes, int peer, const std::string& what);
  Status Recv(void* ptr, uint64_t bytes, int peer, const std::string& what);

 private:
  struct Impl;
  explicit NcclTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ws
