// Host-memory transport over UCX (libucp, tag matching): moves byte ranges of
// host memory between daemons on different nodes over whatever UCX finds
// (TCP on plain Ethernet, RDMA verbs where the cluster has them; the
// `transports` option or UCX_TLS narrows it). No socket protocol of ours.
//
// One UcxTransport = one UCP context + worker. Its address() is an opaque
// blob handed to peers out of band (the daemons' gRPC peering); Connect()
// makes an endpoint to a peer's blob. Exchange() runs sends and receives
// together (so pairwise exchanges cannot deadlock), matching each receive by
// its 64-bit tag, to completion or a deadline. A peer that dies or a link
// that fails completes its requests with an error (endpoints use UCX's peer
// error handling); a deadline cancels every outstanding request. Either way
// the error names the peer and the op's `what`, nothing is left pending, and
// the endpoint to a failed peer, or one with a send left unfinished, is
// closed (Connect() again to retry).
//
// Buffers are the caller's: UCX reads/writes them in place (registering them
// as it sees fit); bytes per peer in flight are bounded by what the caller
// passes to one Exchange().
//
// Thread-safety: every method may be called from any thread. The worker is
// serialised by the transport's mutex; concurrent Exchange() calls take
// turns progressing it (each turn completes any caller's requests), so one
// thread may receive from a peer while another sends to a third.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "daemon/core/status.h"

namespace ws {

struct UcxOptions {
  std::string transports;  // UCX_TLS-style list ("tcp", "tcp,self", "rc,ud"); "" = UCX's choice
  std::string net_devices;  // UCX_NET_DEVICES-style list ("eth0", "mlx5_0:1"); "" = all
};

// Not a Transport (transport.h) yet: it moves raw byte ranges and serves no
// route until cross-node syncs use it.
class UcxTransport final {
 public:
  static Result<std::unique_ptr<UcxTransport>> Create(const UcxOptions& opts = {});
  ~UcxTransport();
  UcxTransport(const UcxTransport&) = delete;
  UcxTransport& operator=(const UcxTransport&) = delete;

  const char* name() const { return "ucx"; }

  // This worker's address, for peers' Connect().
  const std::string& address() const;
  // An endpoint to the worker at `address` (from its address()), known as
  // `peer` in errors. Replaces an earlier endpoint of that name.
  Status Connect(const std::string& peer, const std::string& address);
  bool connected(const std::string& peer) const;

  struct Op {
    bool send = true;
    std::string peer;   // send: the endpoint's name; receive: the expected sender (for errors only)
    uint64_t tag = 0;   // a receive matches the send with the same tag
    void* ptr = nullptr;
    uint64_t bytes = 0;
    std::string what;   // for errors: the tensor or buffer
  };
  // Posts every op, then progresses until all complete or `timeout` passes.
  // A receive must get exactly `bytes` bytes. The first failure is returned
  // (all others are cancelled and waited for first).
  Status Exchange(const std::vector<Op>& ops, std::chrono::milliseconds timeout);

 private:
  struct Impl;
  explicit UcxTransport(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ws
