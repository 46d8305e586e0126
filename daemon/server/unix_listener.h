// A unix-socket listener the daemon runs itself, so that it knows each
// peer's kernel credentials: gRPC 1.51's C++ API gives a handler no access to
// a connection's fd. For every accepted connection the accept thread reads
// SO_PEERCRED, records the credentials in the Authenticator under the fd
// number, and then hands the fd to grpc::AddInsecureChannelFromFd, which owns
// (and eventually closes) it. gRPC names such a connection "fd:N" in
// ServerContext::peer(), fixed when each call is created.
//
// fd-number reuse is safe: a number is reused only after gRPC closed the old
// connection's fd, which it does when the transport is destroyed, after
// every call on it has ended (calls hold the transport). The new connection's
// record replaces the old one at accept time, before gRPC sees the new fd, so
// every live call named "fd:N" finds the record of its own connection. Stale
// records (closed connections) are never looked up by a live call and are
// bounded by the number of fds.
//
// Thread-safety: Start() and Stop() from one thread; the accept thread only
// touches the Authenticator (which locks) and gRPC (thread-safe).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include <sys/types.h>

#include <grpcpp/server.h>

#include "daemon/core/posix_handles.h"
#include "daemon/core/status.h"
#include "daemon/server/auth.h"

namespace ws::server {

class UnixListener {
 public:
  // Creates the socket file at `path` (which PrepareUnixSocket made free)
  // with permission bits `mode` and listens; connections queue until Start().
  static Result<std::unique_ptr<UnixListener>> Bind(const std::string& path, uint32_t mode);
  ~UnixListener();  // Stop(), closes the socket, removes the socket file (if still the one it bound)
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;

  // Starts accepting into `server` (started, not shut down) with credentials
  // recorded in `auth`; both must outlive Stop().
  Status Start(grpc::Server* server, Authenticator* auth);
  // Ends the accept thread promptly and closes the listening socket (new
  // connects are refused; accepted connections stay with gRPC). Idempotent.
  void Stop();

  const std::string& path() const { return path_; }
  const std::string& address() const { return address_; }  // "unix:" + path

 private:
  UnixListener(std::string path, UniqueFd listen_fd, UniqueFd stop_fd, dev_t dev, ino_t ino);
  void AcceptLoop(grpc::Server* server, Authenticator* auth);

  const std::string path_;
  const std::string address_;
  UniqueFd listen_fd_;
  UniqueFd stop_fd_;  // eventfd: readable once Stop() was called
  const dev_t dev_;  // the socket file as bound: removed only while still this file
  const ino_t ino_;
  std::thread thread_;
};

}  // namespace ws::server
