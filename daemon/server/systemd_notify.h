// systemd service notifications (sd_notify, Type=notify units): READY=1 once
// every listener is up, STATUS= lines (engines, last sync), WATCHDOG=1 pings
// while the daemon makes progress, STOPPING=1 on shutdown. Does nothing
// unless the service manager set NOTIFY_SOCKET.
//
// The watchdog thread pings every WATCHDOG_USEC/2 only while (a) the
// coordinator's housekeeping heartbeat advanced within `stall_limit` (it
// stops when the coordinator is wedged) and (b) the gRPC server answers a
// health check on one of its unix sockets; otherwise it stops pinging and
// systemd restarts the daemon after WatchdogSec.
//
// Thread-safety: Ready() and Stopping() are called from one thread (main).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "daemon/server/coordinator.h"
#include "daemon/server/observer.h"

namespace ws::server {

class SystemdNotifier : public CoordinatorObserver {
 public:
  // `stall_limit`: longest gap between housekeeping passes still healthy.
  explicit SystemdNotifier(std::chrono::milliseconds stall_limit);
  ~SystemdNotifier() override;  // stops the watchdog thread
  SystemdNotifier(const SystemdNotifier&) = delete;
  SystemdNotifier& operator=(const SystemdNotifier&) = delete;

  bool active() const { return active_; }

  void SyncFinished(const SyncStats&, bool) override {}
  void Housekeeping() override { heartbeat_.fetch_add(1, std::memory_order_relaxed); }

  // Sends READY=1 with a STATUS= line and, when the service manager asked for
  // a watchdog (WATCHDOG_USEC), starts pinging. `addresses` are the server's
  // bound addresses (the first unix: one is health-checked); `coordinator`
  // must outlive this object.
  void Ready(const Coordinator* coordinator, const std::vector<std::string>& addresses);
  // Stops the watchdog and sends STOPPING=1.
  void Stopping(const std::string& why);

 private:
  void WatchdogLoop(std::chrono::microseconds period);
  std::string StatusLine() const;
  bool GrpcAlive();

  const bool active_;
  const std::chrono::milliseconds stall_limit_;
  std::atomic<uint64_t> heartbeat_{0};
  const Coordinator* coordinator_ = nullptr;
  std::string serving_;         // "serving on ..."
  std::string health_address_;  // "unix:/path" or ""

  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;  // guarded by mu_
  std::thread watchdog_;
};

}  // namespace ws::server
