#include "daemon/server/server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <spdlog/spdlog.h>

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
    : coord_(coordinator), opts_(std::move(opts)), auth_(opts_.auth), service_(coordinator, &auth_) {}

Server::~Server() { Stop(std::chrono::milliseconds(0)); }

Status Server::Start() {
  if (opts_.listen.empty()) return InvalidArgument("no listen address given");
  for (const auto& a : opts_.listen) {
    if (a.rfind("unix:", 0) != 0) continue;
    std::string path = UnixSocketPath(a);
    if (path.empty() || path.back() == '/') return InvalidArgument("listen address " + a + " has no socket path");
    WS_RETURN_IF_ERROR(PrepareUnixSocket(path).WithContext("listen " + a));
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  std::vector<int> ports(opts_.listen.size(), 0);
  for (size_t i = 0; i < opts_.listen.size(); ++i)
    builder.AddListeningPort(opts_.listen[i], grpc::InsecureServerCredentials(), &ports[i]);
  builder.RegisterService(&service_);
  builder.SetMaxReceiveMessageSize(opts_.max_message_bytes);
  builder.SetMaxSendMessageSize(opts_.max_message_bytes);
  server_ = builder.BuildAndStart();
  std::string failed;
  for (size_t i = 0; i < ports.size(); ++i)
    if (ports[i] == 0) failed += (failed.empty() ? "" : ", ") + opts_.listen[i];
  if (!server_ || !failed.empty()) {
    if (server_) server_->Shutdown();
    server_.reset();
    return Unavailable("cannot listen on " + (failed.empty() ? std::string("the configured addresses") : failed) +
                       " (address in use, bad address, or no permission)");
  }
  for (size_t i = 0; i < opts_.listen.size(); ++i) {
    const std::string& a = opts_.listen[i];
    std::string path = UnixSocketPath(a);
    if (!path.empty()) {
      socket_files_.push_back(path);
      bound_.push_back(a);
    } else {
      auto colon = a.rfind(':');
      bound_.push_back(colon == std::string::npos ? a : a.substr(0, colon + 1) + std::to_string(ports[i]));
    }
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
  coord_->AbortAll("the daemon is shutting down", grace);
  service_.BeginShutdown();
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  server_->Wait();
  for (const auto& p : socket_files_) ::unlink(p.c_str());
  socket_files_.clear();
}

}  // namespace ws::server
