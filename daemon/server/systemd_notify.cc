#include "daemon/server/systemd_notify.h"

#include <systemd/sd-daemon.h>

#include <cstdlib>

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <spdlog/fmt/fmt.h>
#include <spdlog/spdlog.h>

#include "grpc/health/v1/health.grpc.pb.h"

namespace ws::server {

namespace {

void Notify(const std::string& state) {
  int rc = sd_notify(0, state.c_str());
  if (rc < 0) spdlog::warn("sd_notify: {}", strerror(-rc));
}

}  // namespace

SystemdNotifier::SystemdNotifier(std::chrono::milliseconds stall_limit)
    : active_(std::getenv("NOTIFY_SOCKET") != nullptr), stall_limit_(stall_limit) {}

SystemdNotifier::~SystemdNotifier() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
}

std::string SystemdNotifier::StatusLine() const {
  StatusSnapshot s = coordinator_->GetStatus();
  std::string line = fmt::format("{}; {} engines; {} syncs in flight; ", serving_, s.engines.size(),
                                 s.current_syncs.size());
  if (s.last_sync)
    line += fmt::format("last sync {} model={} version={} {} in {:.2f} s", s.last_sync->sync_id, s.last_sync->model,
                        s.last_sync->version, s.last_sync->state, s.last_sync->seconds);
  else
    line += "no sync yet";
  // One line: STATUS= ends at a newline.
  for (char& c : line)
    if (c == '\n') c = ' ';
  return line;
}

void SystemdNotifier::Ready(const Coordinator* coordinator, const std::vector<std::string>& addresses) {
  if (!active_) return;
  coordinator_ = coordinator;
  serving_ = "serving on";
  for (const auto& a : addresses) {
    serving_ += " " + a;
    if (health_address_.empty() && a.rfind("unix:", 0) == 0) health_address_ = a;
  }
  Notify("READY=1\nSTATUS=" + StatusLine());
  uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
    if (health_address_.empty())
      spdlog::info("systemd watchdog: no unix socket to health-check; pinging on the housekeeping heartbeat only");
    spdlog::info("systemd watchdog: pinging every {} ms while the daemon makes progress", usec / 2000);
    watchdog_ = std::thread([this, usec] { WatchdogLoop(std::chrono::microseconds(usec / 2)); });
  }
}

void SystemdNotifier::Stopping(const std::string& why) {
  if (!active_) return;
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  Notify("STOPPING=1\nSTATUS=stopping: " + why);
}

bool SystemdNotifier::GrpcAlive() {
  if (health_address_.empty()) return true;
  auto channel = grpc::CreateChannel(health_address_, grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status st = stub->Check(&ctx, req, &resp);
  return st.ok() && resp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

void SystemdNotifier::WatchdogLoop(std::chrono::microseconds period) {
  using Clock = std::chrono::steady_clock;
  uint64_t seen = heartbeat_.load(std::memory_order_relaxed);
  auto last_beat = Clock::now();
  auto last_grpc_check = Clock::time_point{};
  bool grpc_ok = true, was_healthy = true;
  std::string last_status;
  std::unique_lock lk(mu_);
  while (!cv_.wait_for(lk, period, [&] { return stop_; })) {
    lk.unlock();
    const auto now = Clock::now();
    if (uint64_t hb = heartbeat_.load(std::memory_order_relaxed); hb != seen) {
      seen = hb;
      last_beat = now;
    }
    // The health check costs a connection: at most once a second.
    if (now - last_grpc_check >= std::chrono::seconds(1)) {
      grpc_ok = GrpcAlive();
      last_grpc_check = now;
    }
    const bool beating = now - last_beat <= stall_limit_;
    if (beating && grpc_ok) {
      std::string status = StatusLine();
      Notify(status == last_status ? "WATCHDOG=1" : "WATCHDOG=1\nSTATUS=" + status);
      last_status = status;
      if (!was_healthy) spdlog::info("systemd watchdog: healthy again, pinging");
      was_healthy = true;
    } else if (was_healthy) {
      spdlog::error("systemd watchdog: withholding pings ({}); systemd restarts the daemon after WatchdogSec",
                    !beating ? "the coordinator's housekeeping has stalled" : "the gRPC health check failed");
      was_healthy = false;
    }
    lk.lock();
  }
}

}  // namespace ws::server
