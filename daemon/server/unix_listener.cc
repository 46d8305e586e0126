#include "daemon/server/unix_listener.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <grpcpp/server_posix.h>
#include <spdlog/spdlog.h>

namespace ws::server {

#ifndef GPR_SUPPORT_CHANNELS_FROM_FD
#error "this gRPC build cannot serve connections from fds (GPR_SUPPORT_CHANNELS_FROM_FD)"
#endif

Result<std::unique_ptr<UnixListener>> UnixListener::Bind(const std::string& path, uint32_t mode) {
  const std::string where = "cannot listen on unix:" + path;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return InvalidArgument(where + ": the path must have 1 to " + std::to_string(sizeof(addr.sun_path) - 1) +
                           " bytes");
  if (mode > 0777) return InvalidArgument(where + ": socket mode " + std::to_string(mode) + " is not 0..0777");
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return Internal(where + ": socket(): " + std::strerror(errno));
  // Closes fd (and removes the socket file once bound); errno names the cause.
  bool bound = false;
  auto fail = [&](const char* what) {
    Status err = Unavailable(where + ": " + what + ": " + std::strerror(errno));
    fd.Close();
    if (bound) ::unlink(path.c_str());
    return err;
  };
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return fail("bind");
  bound = true;
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return fail("lstat");
  // Nobody can connect before listen(): the mode is in place before the socket is usable.
  if (::chmod(path.c_str(), static_cast<mode_t>(mode)) != 0) return fail("chmod");
  if (::listen(fd.get(), SOMAXCONN) != 0) return fail("listen");
  UniqueFd stop(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop.valid()) return fail("eventfd");
  return std::unique_ptr<UnixListener>(new UnixListener(path, std::move(fd), std::move(stop), st.st_dev, st.st_ino));
}

UnixListener::UnixListener(std::string path, UniqueFd listen_fd, UniqueFd stop_fd, dev_t dev, ino_t ino)
    : path_(std::move(path)),
      address_("unix:" + path_),
      listen_fd_(std::move(listen_fd)),
      stop_fd_(std::move(stop_fd)),
      dev_(dev),
      ino_(ino) {}

UnixListener::~UnixListener() {
  Stop();
  struct stat st {};
  if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_) ::unlink(path_.c_str());
}

Status UnixListener::Start(grpc::Server* server, Authenticator* auth) {
  if (thread_.joinable() || !listen_fd_.valid()) return FailedPrecondition("listener on " + address_ + " already started");
  thread_ = std::thread([this, server, auth] { AcceptLoop(server, auth); });
  return Status::Ok();
}

void UnixListener::Stop() {
  if (thread_.joinable()) {
    uint64_t one = 1;
    while (::write(stop_fd_.get(), &one, sizeof(one)) < 0 && errno == EINTR) {
    }
    thread_.join();
  }
  listen_fd_.Close();
}

void UnixListener::AcceptLoop(grpc::Server* server, Authenticator* auth) {
  for (;;) {
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {stop_fd_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("{}: poll: {}; no longer accepting connections", address_, std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0) return;
    if (fds[0].revents == 0) continue;
    int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      int e = errno;
      if (e == EAGAIN || e == EWOULDBLOCK || e == EINTR || e == ECONNABORTED || e == EPROTO) continue;
      spdlog::warn("{}: accept: {}", address_, std::strerror(e));
      // Out of fds or memory: the listening socket stays readable, so pause
      // (or stop) instead of spinning.
      pollfd stop{stop_fd_.get(), POLLIN, 0};
      if (::poll(&stop, 1, 100) > 0) return;
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof(cred)) {
      spdlog::warn("{}: refusing a connection whose credentials cannot be read: {}", address_, std::strerror(errno));
      ::close(fd);
      continue;
    }
    Peer peer = auth->UnixPeer(static_cast<uint32_t>(cred.uid), static_cast<uint32_t>(cred.gid),
                               static_cast<int32_t>(cred.pid), address_);
    spdlog::debug("{}: connection from {} as fd:{}", address_, peer.Describe(), fd);
    auth->AddUnixPeer(fd, std::move(peer));
    grpc::AddInsecureChannelFromFd(server, fd);  // gRPC owns fd from here on
  }
}

}  // namespace ws::server
