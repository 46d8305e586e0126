// Binds the WeightSync service and the standard grpc.health.v1 service to the
// configured addresses, and stops them gracefully. Unix sockets are accepted
// by the daemon itself (unix_listener.h: SO_PEERCRED per connection); TCP
// addresses need TLS unless plaintext is explicitly allowed (insecure_tcp).
//
// Thread-safety: Start() and Stop() are called from one thread (main);
// Stop() may run while RPCs are in flight on gRPC's threads.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/server.h>

#include "daemon/core/status.h"
#include "daemon/server/coordinator.h"
#include "daemon/server/service.h"
#include "daemon/server/unix_listener.h"

namespace ws::server {

class GrpcClusterLink;  // daemon/server/grpc_cluster_link.h

class Metrics;

struct TlsOptions {
  std::string cert_file;       // PEM server certificate (chain)
  std::string key_file;        // PEM private key of cert_file
  std::string client_ca_file;  // PEM CAs; when set, clients must present a certificate they signed
};

struct ServerOptions {
  std::vector<std::string> listen = {"unix:/tmp/weightsync.sock"};  // unix:/path or host:port
  int max_message_bytes = 512 << 20;  // largest request (BeginSync carries the whole manifest)
  // gRPC handler threads at most (each open engine event stream and trainer
  // Push stream holds one): past it new calls get RESOURCE_EXHAUSTED instead
  // of the daemon growing threads without bound.
  int max_rpc_threads = 1024;
  AuthOptions auth;
  TlsOptions tls;             // TCP addresses serve TLS with these (cert and key given together)
  bool insecure_tcp = false;  // without TLS options, serve TCP as plaintext anyway (warned at Start)
  uint32_t socket_mode = 0660;  // permission bits of the unix socket files
  Metrics* metrics = nullptr;   // when set, counts every RPC's status (must outlive the server)
  const cluster::PeerSet* peers = nullptr;  // node name and peer daemons for GetStatus/PeerHello (outlives the server)
  GrpcClusterLink* cluster = nullptr;  // syncs across nodes: UCX addresses, byte counters (outlives the server)
};

// For "unix:/p", "unix:///p", "unix:p" returns the socket path; "" otherwise.
std::string UnixSocketPath(const std::string& address);

// Makes `path` free to bind: removes a stale socket file nobody listens on;
// refuses a live socket or a file that is not a socket.
Status PrepareUnixSocket(const std::string& path);

class Server {
 public:
  Server(Coordinator* coordinator, ServerOptions opts);
  ~Server();

  // Checks the TLS options (a TCP address needs TLS or insecure_tcp), binds
  // every address (errors name it), starts serving, sets health SERVING.
  Status Start();
  // Health NOT_SERVING, stops accepting unix connections, aborts in-flight
  // syncs (engines hear Aborted), ends engine streams, shuts gRPC down within
  // `grace`, removes unix socket files.
  void Stop(std::chrono::milliseconds grace);
  // Addresses as bound (a TCP port 0 replaced by the chosen port).
  const std::vector<std::string>& addresses() const { return bound_; }

 private:
  Coordinator* const coord_;
  const ServerOptions opts_;
  Authenticator auth_;
  WeightSyncService service_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::string> bound_;
  std::vector<std::unique_ptr<UnixListener>> listeners_;
  bool stopped_ = false;
};

}  // namespace ws::server
