// Prometheus metrics of the daemon: counters fed by the Coordinator (through
// CoordinatorObserver) and by a gRPC server interceptor (RPC errors by status
// code), gauges read from Coordinator::GetStatus() at scrape time, rendered
// in the Prometheus text exposition format (version 0.0.4) and served over
// HTTP at /metrics by MetricsServer (--metrics-listen).
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/support/server_interceptor.h>

#include "daemon/cluster/peers.h"
#include "daemon/core/status.h"
#include "daemon/server/coordinator.h"
#include "daemon/server/observer.h"

namespace httplib {
class Server;
}

namespace ws::server {

class GrpcClusterLink;  // daemon/server/grpc_cluster_link.h

struct BuildInfo {
  std::string version;
  bool cuda = false;  // CUDA references can be served
};

class Metrics : public CoordinatorObserver {
 public:
  // Upper bounds (seconds) of the sync duration histogram's buckets.
  static std::vector<double> DefaultDurationBuckets();

  explicit Metrics(BuildInfo build, std::vector<double> duration_buckets = DefaultDurationBuckets());
  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  void SyncFinished(const SyncStats& stats, bool committed) override;
  void Housekeeping() override;
  // An RPC ended with `code` (grpc::StatusCode); only errors are counted.
  void RpcFinished(const std::string& method, int code);

  uint64_t housekeeping_passes() const { return housekeeping_.load(std::memory_order_relaxed); }

  // The text exposition of every metric, with the gauges taken from `status`
  // and, per peer daemon, `peers`.
  // `peer_bytes`: sync data sent to / received from each peer (syncs across nodes).
  std::string Render(const StatusSnapshot& status, const std::vector<cluster::PeerState>& peers = {},
                     const std::map<std::string, PeerBytes>& peer_bytes = {}) const;

 private:
  const BuildInfo build_;
  const std::vector<double> buckets_;
  std::atomic<uint64_t> housekeeping_{0};

  mutable std::mutex mu_;
  std::map<std::string, uint64_t> syncs_;  // outcome -> count
  std::vector<uint64_t> duration_counts_;  // per bucket (not cumulative), plus +Inf last
  double duration_sum_ = 0;
  uint64_t bytes_written_ = 0;
  uint64_t bytes_read_ = 0;
  double last_throughput_ = 0;  // bytes/s of the last committed sync
  std::map<std::pair<std::string, std::string>, uint64_t> rpc_errors_;  // (method, code name) -> count
};

// "OK", "INVALID_ARGUMENT", ... for a grpc::StatusCode value.
std::string StatusCodeName(int code);

// Escapes a label value for the text format (backslash, double quote, newline).
std::string EscapeLabelValue(const std::string& v);

// Counts every RPC's final status into `metrics` (which must outlive the server).
std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeRpcMetricsInterceptor(Metrics* metrics);

// Serves GET /metrics over plain HTTP on one address.
class MetricsServer {
 public:
  // `metrics`, `coordinator` and `peers` (may be null) must outlive the server.
  // `cluster` (may be null): per-peer byte counters.
  MetricsServer(Metrics* metrics, const Coordinator* coordinator, const cluster::PeerSet* peers = nullptr,
                const GrpcClusterLink* cluster = nullptr);
  ~MetricsServer();  // Stop()s
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // `address` is HOST:PORT ("127.0.0.1:9464", "[::1]:9464", ":9464" for every
  // interface; port 0 picks a free one). Errors name the address.
  Status Start(const std::string& address);
  void Stop();
  // "http://HOST:PORT/metrics" as bound.
  const std::string& url() const { return url_; }

 private:
  Metrics* const metrics_;
  const Coordinator* const coordinator_;
  const cluster::PeerSet* const peers_;
  const GrpcClusterLink* const cluster_;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
  std::string url_;
};

}  // namespace ws::server
