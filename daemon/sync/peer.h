// Who is calling: the identity the gRPC layer establishes for every RPC
// (unix-socket credentials from SO_PEERCRED, a TLS client certificate or a
// shared token over TCP) and the coordinator uses for ownership checks and
// memory access. Plain C++: no gRPC here; it lives in daemon/sync so that the
// sync layer can check ownership without seeing daemon/server.
//
// Thread-safety: value type.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "daemon/mem/memory.h"

namespace ws::server {

struct Peer {
  enum class Via : uint8_t { kInProcess, kUnix, kTcp };
  Via via = Via::kInProcess;
  bool has_creds = false;  // uid/gid/pid vouched for by the kernel (SO_PEERCRED) or the process itself
  uint32_t uid = 0;
  uint32_t gid = 0;
  int32_t pid = 0;
  // Owner key of the engines and syncs this peer creates: "uid:1000" for a
  // unix-socket peer, "cn:NAME" for a TLS client certificate, "token" for a
  // shared-token TCP peer, "tcp" for an unauthenticated (insecure) TCP peer.
  std::string principal;
  bool admin = false;              // may act on every engine and sync (root, or listed in the config)
  std::vector<uint32_t> shm_gids;  // groups (allowed by config and held by the peer) whose shm it may map
  std::string address;             // transport address, for messages ("unix", "ipv4:10.0.0.2:4711")

  // "uid 1000 pid 4242" / "cn trainer at ipv4:10.0.0.2:4711" / ...
  std::string Describe() const;
  // What the memory domain needs to decide which objects this peer may map.
  Accessor ToAccessor() const;
  // May this peer act on something owned by `owner`?
  bool Owns(const std::string& owner) const { return admin || owner == principal; }

  // The daemon itself and in-process callers (unit tests): admin, own uid.
  static Peer InProcess();
};

}  // namespace ws::server
