// Establishes who is calling, once per RPC: the single place that turns a
// gRPC call into a Peer (daemon/sync/peer.h).
//
//  - unix socket: the daemon accepts connections itself (unix_listener.h),
//    reads SO_PEERCRED (uid, gid, pid vouched for by the kernel) and records
//    them here under the connection's fd before gRPC gets it; a handler sees
//    the connection as ctx->peer() == "fd:N". Principal "uid:N"; admin for
//    uid 0 and the configured admin uids. A "fd:N" without a record is
//    refused (never admin).
//  - TCP: TLS (server certificate; with client certificates their verified
//    CN is the principal "cn:NAME", admin when configured), or plaintext only
//    with --insecure-tcp. Without a client certificate the principal is
//    "token" when a token is configured, else "tcp"; never admin. TCP peers
//    have no kernel credentials, so they cannot name memory to map.
//  - token: when configured, every RPC of every transport must carry
//    "authorization: Bearer <token>" (compared in constant time). The
//    standard grpc.health.v1 service does not pass through here and needs no
//    token (probes cannot send one).
//
// Thread-safety: Identify() is called concurrently from gRPC threads;
// AddUnixPeer() from accept threads; the fd table is guarded by mu_.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include <grpcpp/server_context.h>

#include "daemon/core/status.h"
#include "daemon/core/thread_annotations.h"
#include "daemon/sync/peer.h"

namespace ws::server {

struct AuthOptions {
  std::vector<uint32_t> admin_uids;      // besides root: unix peers that may act on every engine and sync
  std::vector<std::string> admin_cns;    // TLS client certificate CNs with admin rights
  std::vector<uint32_t> shm_gids;        // groups whose shm objects members may map (besides their own objects)
  std::string token;                     // when non-empty, every RPC must carry it ("authorization: Bearer ...")
};

// The groups of a unix peer: `gid` (its primary group as SO_PEERCRED
// reported it) plus the supplementary groups the group database lists for
// the passwd entry of `uid` (getgrouplist; none when the uid has no entry).
// Sorted, without duplicates.
std::vector<uint32_t> PeerGroups(uint32_t uid, uint32_t gid);

class Authenticator {
 public:
  explicit Authenticator(AuthOptions opts = {});
  virtual ~Authenticator();
  Authenticator(const Authenticator&) = delete;
  Authenticator& operator=(const Authenticator&) = delete;

  // The Peer a unix-socket connection with these kernel credentials gets:
  // principal, admin and shm groups resolved from the options.
  Peer UnixPeer(uint32_t uid, uint32_t gid, int32_t pid, const std::string& address) const;

  // Records the connection just accepted on `fd`, before it is handed to
  // gRPC. Replaces the record of an earlier connection whose fd had the same
  // number: that one is closed (the kernel only reuses closed numbers), and
  // gRPC closes an fd only after the last call on it is gone, so no call can
  // still be looking for the old record (unix_listener.h).
  void AddUnixPeer(int fd, Peer peer);

  // The calling peer, or Unauthenticated errors that name what is missing
  // (no token, wrong token, a connection with unknown credentials).
  virtual Result<Peer> Identify(grpc::ServerContext* ctx) const;

 protected:
  const AuthOptions opts_;

 private:
  Result<Peer> PeerOf(grpc::ServerContext* ctx) const;
  Status CheckToken(const grpc::ServerContext* ctx, const Peer& peer) const;

  mutable Mutex mu_;
  std::unordered_map<int, Peer> unix_peers_ WS_GUARDED_BY(mu_);  // by the fd number gRPC reports as "fd:N"
};

}  // namespace ws::server
