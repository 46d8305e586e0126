// Establishes who is calling, once per RPC: the single place that turns a
// gRPC call into a Peer (daemon/server/peer.h).
//
//  - unix socket: the daemon accepts connections itself, reads SO_PEERCRED
//    (uid, gid, pid vouched for by the kernel) and hands the connection to
//    gRPC; principal "uid:N", admin for uid 0 and the configured admin uids.
//  - TCP: TLS (server certificate; client certificates optional, their CN is
//    the principal "cn:NAME"), or plaintext only with --insecure-tcp
//    (principal "tcp"); an optional shared token is required on every RPC of
//    every transport when configured.
//
// Thread-safety: Identify() is called concurrently from gRPC threads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <grpcpp/server_context.h>

#include "daemon/core/status.h"
#include "daemon/server/peer.h"

namespace ws::server {

struct AuthOptions {
  std::vector<uint32_t> admin_uids;      // besides root: unix peers that may act on every engine and sync
  std::vector<std::string> admin_cns;    // TLS client certificate CNs with admin rights
  std::vector<uint32_t> shm_gids;        // groups whose shm objects members may map (besides their own objects)
  std::string token;                     // when non-empty, every RPC must carry it ("authorization: Bearer ...")
};

class Authenticator {
 public:
  explicit Authenticator(AuthOptions opts = {});
  virtual ~Authenticator();
  Authenticator(const Authenticator&) = delete;
  Authenticator& operator=(const Authenticator&) = delete;

  // The calling peer, or PermissionDenied/Unauthenticated-style errors that
  // name what is missing (no token, wrong token, unknown connection).
  virtual Result<Peer> Identify(grpc::ServerContext* ctx) const;

 protected:
  const AuthOptions opts_;
};

}  // namespace ws::server
