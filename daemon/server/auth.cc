#include "daemon/server/auth.h"

#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include <grpc/grpc_security_constants.h>
#include <grpcpp/security/auth_context.h>

#include "daemon/core/token.h"

namespace ws::server {

namespace {

bool Contains(const std::vector<uint32_t>& v, uint32_t x) { return std::find(v.begin(), v.end(), x) != v.end(); }

// "fd:12" -> 12; -1 when it is not that form.
int ParseFdPeer(const std::string& peer) {
  if (peer.size() <= 3 || peer.size() > 13 || peer.compare(0, 3, "fd:") != 0) return -1;
  long v = 0;
  for (size_t i = 3; i < peer.size(); ++i) {
    if (peer[i] < '0' || peer[i] > '9') return -1;
    v = v * 10 + (peer[i] - '0');
  }
  return v > 0x7fffffff ? -1 : static_cast<int>(v);
}

// How a peer is named in authentication errors (a TCP peer's principal is
// not established yet when its token is missing).
std::string Who(const Peer& p) {
  if (p.via != Peer::Via::kTcp) return p.Describe();
  if (p.principal.rfind("cn:", 0) == 0) return "TCP peer " + p.address + " (" + p.principal + ")";
  return "TCP peer " + p.address;
}

}  // namespace

std::vector<uint32_t> PeerGroups(uint32_t uid, uint32_t gid) {
  std::vector<uint32_t> out{gid};
  long hint = ::sysconf(_SC_GETPW_R_SIZE_MAX);
  std::vector<char> buf(hint > 0 ? static_cast<size_t>(hint) : 16384);
  passwd pw{};
  passwd* found = nullptr;
  int rc;
  while ((rc = ::getpwuid_r(uid, &pw, buf.data(), buf.size(), &found)) == ERANGE && buf.size() < (1u << 20))
    buf.resize(buf.size() * 2);
  if (rc == 0 && found != nullptr) {
    out.push_back(pw.pw_gid);
    std::vector<gid_t> groups(64);
    for (int attempt = 0; attempt < 8; ++attempt) {
      int n = static_cast<int>(groups.size());
      if (::getgrouplist(pw.pw_name, pw.pw_gid, groups.data(), &n) >= 0) {
        groups.resize(static_cast<size_t>(n));
        out.insert(out.end(), groups.begin(), groups.end());
        break;
      }
      groups.resize(std::max(static_cast<size_t>(n), groups.size() * 2));
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

Authenticator::Authenticator(AuthOptions opts) : opts_(std::move(opts)) {}
Authenticator::~Authenticator() = default;

Peer Authenticator::UnixPeer(uint32_t uid, uint32_t gid, int32_t pid, const std::string& address) const {
  Peer p;
  p.via = Peer::Via::kUnix;
  p.has_creds = true;
  p.uid = uid;
  p.gid = gid;
  p.pid = pid;
  p.principal = "uid:" + std::to_string(uid);
  p.admin = uid == 0 || Contains(opts_.admin_uids, uid);
  if (!opts_.shm_gids.empty())
    for (uint32_t g : PeerGroups(uid, gid))
      if (Contains(opts_.shm_gids, g)) p.shm_gids.push_back(g);
  p.address = address;
  return p;
}

void Authenticator::AddUnixPeer(int fd, Peer peer) {
  MutexLock lk(&mu_);
  unix_peers_[fd] = std::move(peer);
}

Result<Peer> Authenticator::Identify(grpc::ServerContext* ctx) const {
  WS_ASSIGN_OR_RETURN(Peer peer, PeerOf(ctx));
  if (!opts_.token.empty()) WS_RETURN_IF_ERROR(CheckToken(ctx, peer));
  return peer;
}

Result<Peer> Authenticator::PeerOf(grpc::ServerContext* ctx) const {
  const std::string addr = ctx->peer();
  if (int fd = ParseFdPeer(addr); fd >= 0) {
    MutexLock lk(&mu_);
    auto it = unix_peers_.find(fd);
    if (it == unix_peers_.end())
      return Unauthenticated("connection " + addr + " has no recorded unix-socket credentials; refused");
    return it->second;
  }
  if (addr.rfind("ipv4:", 0) == 0 || addr.rfind("ipv6:", 0) == 0) {
    Peer p;
    p.via = Peer::Via::kTcp;
    p.has_creds = false;
    p.address = addr;
    // A CN counts only from a TLS handshake that verified the client
    // certificate (the server requires and verifies one when it has a client CA).
    std::shared_ptr<const grpc::AuthContext> ac = ctx->auth_context();
    if (ac && ac->IsPeerAuthenticated()) {
      bool tls = false;
      for (const auto& v : ac->FindPropertyValues(GRPC_TRANSPORT_SECURITY_TYPE_PROPERTY_NAME))
        tls |= std::string(v.data(), v.size()) == GRPC_SSL_TRANSPORT_SECURITY_TYPE;
      auto cns = ac->FindPropertyValues(GRPC_X509_CN_PROPERTY_NAME);
      if (tls && !cns.empty() && !cns[0].empty()) {
        std::string cn(cns[0].data(), cns[0].size());
        p.principal = "cn:" + cn;
        p.admin = std::find(opts_.admin_cns.begin(), opts_.admin_cns.end(), cn) != opts_.admin_cns.end();
        return p;
      }
    }
    p.principal = opts_.token.empty() ? "tcp" : "token";
    return p;
  }
  return Unauthenticated("connection " + addr + " is on no transport this daemon authenticates; refused");
}

Status Authenticator::CheckToken(const grpc::ServerContext* ctx, const Peer& peer) const {
  constexpr std::string_view kBearer = "Bearer ";
  const auto& md = ctx->client_metadata();
  auto [begin, end] = md.equal_range("authorization");
  const auto n = std::distance(begin, end);
  if (n == 0)
    return Unauthenticated(Who(peer) +
                           ": no token: this daemon requires \"authorization: Bearer <token>\" metadata on every "
                           "call (client token option, weightsyncctl --token-file)");
  if (n > 1) return Unauthenticated(Who(peer) + ": more than one authorization metadata entry");
  std::string_view value(begin->second.data(), begin->second.size());
  if (value.substr(0, kBearer.size()) != kBearer)
    return Unauthenticated(Who(peer) + ": the authorization metadata is not \"Bearer <token>\"");
  if (!TokenEquals(value.substr(kBearer.size()), opts_.token))
    return Unauthenticated(Who(peer) + ": wrong token in the authorization metadata");
  return Status::Ok();
}

}  // namespace ws::server
