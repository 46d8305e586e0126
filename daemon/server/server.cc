#include "daemon/server/server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <spdlog/spdlog.h>

#include "daemon/core/token.h"
#include "daemon/server/metrics.h"

namespace ws::server {

namespace {
constexpr const char* kServiceName = "weightsync.v1.WeightSync";
}

std::string UnixSocketPath(const std::string& address) {
  if (address.rfind("unix:", 0) != 0) return "";
  std::string p = address.substr(5);
  if (p.rfind("//", 0) == 0) p = p.substr(2);
  return p;
}

Status PrepareUnixSocket(const std::string& path) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return FailedPrecondition("cannot stat " + path + ": " + std::strerror(errno));
  }
  if (!S_ISSOCK(st.st_mode))
    return FailedPrecondition(path + " exists and is not a socket; refusing to remove it");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return InvalidArgument("unix socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Internal(std::string("socket(): ") + std::strerror(errno));
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  ::close(fd);
  if (rc == 0) return FailedPrecondition("another process is listening on unix:" + path);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return FailedPrecondition("cannot remove stale socket " + path + ": " + std::strerror(errno));
  spdlog::info("removed stale socket {}", path);
  return Status::Ok();
}

Server::Server(Coordinator* coordinator, ServerOptions opts)
    : coord_(coordinator), opts_(std::move(opts)), auth_(opts_.auth), service_(coordinator, &auth_, opts_.peers, opts_.cluster) {}

Server::~Server() { Stop(std::chrono::milliseconds(0)); }

namespace {

}  // namespace

Status Server::Start() {
  if (opts_.listen.empty()) return InvalidArgument("no listen address given");
  const TlsOptions& tls = opts_.tls;
  const bool use_tls = !tls.cert_file.empty() || !tls.key_file.empty();
  if (use_tls && (tls.cert_file.empty() || tls.key_file.empty()))
    return InvalidArgument("TLS needs both a certificate and its key (--tls-cert and --tls-key)");
  if (!tls.client_ca_file.empty() && !use_tls)
    return InvalidArgument("--tls-client-ca needs a server certificate too (--tls-cert and --tls-key)");
  if (use_tls && opts_.insecure_tcp)
    return InvalidArgument("--insecure-tcp contradicts --tls-cert/--tls-key: choose TLS or plaintext for TCP");
  if (opts_.socket_mode > 0777) return InvalidArgument("socket mode must be within 0..0777");

  std::vector<std::string> tcp;
  for (const auto& a : opts_.listen) {
    if (a.rfind("unix:", 0) != 0) {
      tcp.push_back(a);
      continue;
    }
    std::string path = UnixSocketPath(a);
    if (path.empty() || path.back() == '/') return InvalidArgument("listen address " + a + " has no socket path");
  }
  if (!tcp.empty() && !use_tls && !opts_.insecure_tcp)
    return FailedPrecondition("listen address " + tcp[0] +
                              " is TCP, which needs TLS: give --tls-cert and --tls-key (and --tls-client-ca to "
                              "require client certificates), or --insecure-tcp to serve it as plaintext without "
                              "authentication of the peer");
  std::shared_ptr<grpc::ServerCredentials> tcp_creds = grpc::InsecureServerCredentials();
  if (use_tls) {
    grpc::SslServerCredentialsOptions so(tls.client_ca_file.empty()
                                             ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                             : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    WS_ASSIGN_OR_RETURN(std::string cert, ReadPemFile(tls.cert_file, "TLS certificate"));
    WS_ASSIGN_OR_RETURN(std::string key, ReadPemFile(tls.key_file, "TLS key"));
    so.pem_key_cert_pairs.push_back({key, cert});
    if (!tls.client_ca_file.empty()) {
      WS_ASSIGN_OR_RETURN(so.pem_root_certs, ReadPemFile(tls.client_ca_file, "TLS client CA"));
    }
    tcp_creds = grpc::SslServerCredentials(so);
    if (tcp.empty()) spdlog::warn("TLS options given but no TCP listen address: they are unused");
  }

  std::vector<std::unique_ptr<UnixListener>> listeners;
  for (const auto& a : opts_.listen) {
    if (a.rfind("unix:", 0) != 0) continue;
    std::string path = UnixSocketPath(a);
    WS_RETURN_IF_ERROR(PrepareUnixSocket(path).WithContext("listen " + a));
    WS_ASSIGN_OR_RETURN(auto l, UnixListener::Bind(path, opts_.socket_mode));
    listeners.push_back(std::move(l));
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  std::vector<int> ports(tcp.size(), 0);
  for (size_t i = 0; i < tcp.size(); ++i) builder.AddListeningPort(tcp[i], tcp_creds, &ports[i]);
  builder.RegisterService(&service_);
  if (opts_.metrics) {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
    interceptors.push_back(MakeRpcMetricsInterceptor(opts_.metrics));
    builder.experimental().SetInterceptorCreators(std::move(interceptors));
  }
  builder.SetMaxReceiveMessageSize(opts_.max_message_bytes);
  builder.SetMaxSendMessageSize(opts_.max_message_bytes);
  grpc::ResourceQuota quota("weightsyncd");
  quota.SetMaxThreads(opts_.max_rpc_threads);
  builder.SetResourceQuota(quota);
  server_ = builder.BuildAndStart();
  std::string failed;
  for (size_t i = 0; i < ports.size(); ++i)
    if (ports[i] == 0) failed += (failed.empty() ? "" : ", ") + tcp[i];
  if (!server_ || !failed.empty()) {
    if (server_) server_->Shutdown();
    server_.reset();
    return Unavailable("cannot listen on " + (failed.empty() ? std::string("the configured addresses") : failed) +
                       (use_tls ? " (address in use, bad address, no permission, or a TLS certificate/key gRPC "
                                  "cannot use)"
                                : " (address in use, bad address, or no permission)"));
  }
  for (auto& l : listeners) {
    if (Status st = l->Start(server_.get(), &auth_); !st.ok()) {
      for (auto& m : listeners) m->Stop();
      server_->Shutdown();
      server_.reset();
      return st;
    }
  }
  listeners_ = std::move(listeners);
  size_t t = 0;
  for (const auto& a : opts_.listen) {
    if (a.rfind("unix:", 0) == 0) {
      bound_.push_back(a);
      continue;
    }
    auto colon = a.rfind(':');
    bound_.push_back(colon == std::string::npos ? a : a.substr(0, colon + 1) + std::to_string(ports[t]));
    ++t;
  }
  if (opts_.insecure_tcp && !tcp.empty()) {
    std::string where;
    for (const auto& a : bound_)
      if (a.rfind("unix:", 0) != 0) where += (where.empty() ? "" : ", ") + a;
    spdlog::warn("serving plaintext TCP without TLS on {} (--insecure-tcp): anyone who can reach it can read and "
                 "forge its traffic{}",
                 where,
                 opts_.auth.token.empty() ? " and call every RPC as principal \"tcp\"" : ", the token included");
  }
  auto* health = server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(kServiceName, true);
  return Status::Ok();
}

void Server::Stop(std::chrono::milliseconds grace) {
  if (!server_ || stopped_) return;
  stopped_ = true;
  if (auto* health = server_->GetHealthCheckService()) {
    health->SetServingStatus("", false);
    health->SetServingStatus(kServiceName, false);
  }
  for (auto& l : listeners_) l->Stop();
  coord_->AbortAll("the daemon is shutting down", grace);
  service_.BeginShutdown();
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  server_->Wait();
  listeners_.clear();  // removes the socket files
}

}  // namespace ws::server
