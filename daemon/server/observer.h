// Hooks the Coordinator calls so that operational modules (Prometheus metrics,
// the systemd watchdog) can follow it without the Coordinator knowing them.
#pragma once

namespace ws::server {

struct SyncStats;

class CoordinatorObserver {
 public:
  virtual ~CoordinatorObserver() = default;
  // A sync reached its end (committed or aborted). Called with the
  // coordinator's lock held: must not block and must not call back into it.
  virtual void SyncFinished(const SyncStats& stats, bool committed) = 0;
  // One housekeeping pass ran (every CoordinatorOptions::housekeeping_interval),
  // with the coordinator's lock held: a heartbeat that stops when the
  // coordinator is wedged.
  virtual void Housekeeping() = 0;
};

}  // namespace ws::server
