// SystemdNotifier: the notify protocol on a datagram socket the test owns,
// and the watchdog withholding pings while the housekeeping heartbeat stalls.
#include "daemon/server/systemd_notify.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "daemon/core/layout.h"
#include "tests/unit/server/fakes.h"

namespace ws::server::testing {
namespace {

using namespace std::chrono_literals;

// A bound AF_UNIX datagram socket; NOTIFY_SOCKET and WATCHDOG_USEC point at it
// for the test's lifetime.
class NotifySocket {
 public:
  explicit NotifySocket(const char* watchdog_usec) {
    path_ = "/tmp/ws-notify-" + std::to_string(::getpid()) + ".sock";
    ::unlink(path_.c_str());
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::snprintf(a.sun_path, sizeof(a.sun_path), "%s", path_.c_str());
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    ::setenv("NOTIFY_SOCKET", path_.c_str(), 1);
    ::setenv("WATCHDOG_USEC", watchdog_usec, 1);
    ::unsetenv("WATCHDOG_PID");
  }
  ~NotifySocket() {
    ::unsetenv("NOTIFY_SOCKET");
    ::unsetenv("WATCHDOG_USEC");
    ::close(fd_);
    ::unlink(path_.c_str());
  }
  NotifySocket(const NotifySocket&) = delete;
  NotifySocket& operator=(const NotifySocket&) = delete;

  // Every datagram that arrives within `window`.
  std::vector<std::string> Receive(std::chrono::milliseconds window) {
    std::vector<std::string> out;
    const auto end = std::chrono::steady_clock::now() + window;
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
      char buf[4096];
      ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
      if (n > 0) out.emplace_back(buf, static_cast<size_t>(n));
    }
    return out;
  }

 private:
  std::string path_;
  int fd_ = -1;
};

int Pings(const std::vector<std::string>& msgs) {
  int n = 0;
  for (const auto& m : msgs) n += m.find("WATCHDOG=1") != std::string::npos;
  return n;
}

TEST(SystemdNotifier, InactiveWithoutNotifySocket) {
  ::unsetenv("NOTIFY_SOCKET");
  SystemdNotifier n(1s);
  EXPECT_FALSE(n.active());
}

TEST(SystemdNotifier, WatchdogPingsOnlyWhileHousekeepingBeats) {
  NotifySocket sock("100000");  // ping every 50 ms
  auto reg = LayoutRegistry::LoadDir(WS_LAYOUTS_DIR);
  ASSERT_TRUE(reg.ok()) << reg.status().ToString();
  ws::testing::ShmDir shm;
  auto domain = ws::testing::WrappedHostDomain(shm);
  auto exec = MakeHostExecutor(ExecutorOptions{1, 1 << 12});
  SystemdNotifier notifier(300ms);
  ASSERT_TRUE(notifier.active());
  CoordinatorOptions o;
  o.housekeeping_interval = std::chrono::hours(1);  // the test beats by hand
  Coordinator coord(*reg, domain.get(), exec.get(), o);

  notifier.Ready(&coord, {"127.0.0.1:1"});  // no unix address: the heartbeat alone decides
  auto msgs = sock.Receive(200ms);
  ASSERT_FALSE(msgs.empty());
  EXPECT_EQ(msgs[0].rfind("READY=1\nSTATUS=serving on 127.0.0.1:1; 0 engines; 0 syncs in flight; no sync yet", 0), 0u)
      << msgs[0];
  EXPECT_GE(Pings(msgs), 1);

  // No housekeeping pass for longer than the stall limit: pings stop.
  sock.Receive(400ms);
  EXPECT_EQ(Pings(sock.Receive(300ms)), 0);

  // Beats again: pings resume.
  std::atomic<bool> beat{true};
  std::thread beater([&] {
    while (beat) {
      notifier.Housekeeping();
      std::this_thread::sleep_for(50ms);
    }
  });
  EXPECT_GE(Pings(sock.Receive(1000ms)), 1);
  beat = false;
  beater.join();

  notifier.Stopping("test over");
  auto last = sock.Receive(200ms);
  ASSERT_FALSE(last.empty());
  EXPECT_EQ(last.back(), "STOPPING=1\nSTATUS=stopping: test over");
}

}  // namespace
}  // namespace ws::server::testing
