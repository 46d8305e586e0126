#include "daemon/sync/peer.h"

#include <unistd.h>

namespace ws::server {

std::string Peer::Describe() const {
  switch (via) {
    case Via::kInProcess:
      return "in-process caller";
    case Via::kUnix:
      if (!has_creds) return "unix-socket peer (credentials unknown)";
      return "uid " + std::to_string(uid) + " pid " + std::to_string(pid);
    case Via::kTcp:
      return principal + (address.empty() ? "" : " at " + address);
  }
  return principal;
}

Accessor Peer::ToAccessor() const {
  Accessor a;
  a.local = has_creds;
  a.any_owner = has_creds && admin;
  a.uid = uid;
  a.gids = shm_gids;
  a.who = Describe();
  return a;
}

Peer Peer::InProcess() {
  Peer p;
  p.via = Via::kInProcess;
  p.has_creds = true;
  p.uid = static_cast<uint32_t>(::geteuid());
  p.gid = static_cast<uint32_t>(::getegid());
  p.pid = static_cast<int32_t>(::getpid());
  p.principal = "uid:" + std::to_string(p.uid);
  p.admin = true;
  return p;
}

}  // namespace ws::server
