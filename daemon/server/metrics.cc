#include "daemon/server/metrics.h"

#include <httplib.h>

#include <chrono>
#include <cmath>

#include <spdlog/fmt/fmt.h>
#include <spdlog/spdlog.h>

#include "daemon/server/grpc_cluster_link.h"

namespace ws::server {

namespace {

// Appends "# HELP" and "# TYPE" for one metric family.
void Family(std::string& out, const char* name, const char* type, const char* help) {
  out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

std::string Num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  return fmt::format("{}", v);
}

class RpcMetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  RpcMetricsInterceptor(grpc::experimental::ServerRpcInfo* info, Metrics* m) : method_(info->method()), m_(m) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS))
      m_->RpcFinished(method_, static_cast<int>(methods->GetSendStatus().error_code()));
    methods->Proceed();
  }

 private:
  const std::string method_;
  Metrics* const m_;
};

class RpcMetricsFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcMetricsFactory(Metrics* m) : m_(m) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(grpc::experimental::ServerRpcInfo* info) override {
    return new RpcMetricsInterceptor(info, m_);
  }

 private:
  Metrics* const m_;
};

}  // namespace

std::vector<double> Metrics::DefaultDurationBuckets() {
  return {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600};
}

Metrics::Metrics(BuildInfo build, std::vector<double> duration_buckets)
    : build_(std::move(build)), buckets_(std::move(duration_buckets)), duration_counts_(buckets_.size() + 1, 0) {
  for (size_t i = 1; i < buckets_.size(); ++i)
    if (!(buckets_[i - 1] < buckets_[i])) {
      spdlog::critical("metrics: histogram buckets must increase");
      std::abort();
    }
  syncs_["committed"] = 0;
  syncs_["aborted"] = 0;
}

void Metrics::SyncFinished(const SyncStats& stats, bool committed) {
  std::lock_guard lk(mu_);
  ++syncs_[committed ? "committed" : "aborted"];
  size_t b = 0;
  while (b < buckets_.size() && stats.seconds > buckets_[b]) ++b;
  ++duration_counts_[b];
  duration_sum_ += stats.seconds;
  bytes_written_ += stats.bytes_written;
  bytes_read_ += stats.bytes_read;
  if (committed && stats.seconds > 0) last_throughput_ = static_cast<double>(stats.bytes_written) / stats.seconds;
}

void Metrics::Housekeeping() { housekeeping_.fetch_add(1, std::memory_order_relaxed); }

void Metrics::RpcFinished(const std::string& method, int code) {
  if (code == 0) return;
  std::lock_guard lk(mu_);
  ++rpc_errors_[{method, StatusCodeName(code)}];
}

std::string Metrics::Render(const StatusSnapshot& s, const std::vector<cluster::PeerState>& peers,
                            const std::map<std::string, PeerBytes>& peer_bytes) const {
  std::string out;
  Family(out, "weightsync_build_info", "gauge", "Build of the running daemon (always 1).");
  out += fmt::format("weightsync_build_info{{version=\"{}\",cuda=\"{}\"}} 1\n", EscapeLabelValue(build_.version),
                     build_.cuda ? "true" : "false");
  Family(out, "weightsync_uptime_seconds", "gauge", "Seconds since the daemon started.");
  out += "weightsync_uptime_seconds " + Num(s.uptime_seconds) + "\n";
  Family(out, "weightsync_housekeeping_passes_total", "counter",
         "Housekeeping passes of the coordinator (stops growing when it is wedged).");
  out += fmt::format("weightsync_housekeeping_passes_total {}\n", housekeeping_passes());
  Family(out, "weightsync_engines_registered", "gauge", "Registered engine ranks.");
  out += fmt::format("weightsync_engines_registered {}\n", s.engines.size());
  Family(out, "weightsync_syncs_in_flight", "gauge", "Syncs begun and not yet committed or aborted.");
  out += fmt::format("weightsync_syncs_in_flight {}\n", s.current_syncs.size());

  std::map<std::string, uint64_t> committed;
  Family(out, "weightsync_model_committed_version", "gauge", "Last committed weight version per model.");
  for (const auto& m : s.models) {
    committed[m.model] = m.committed_version;
    out += fmt::format("weightsync_model_committed_version{{model=\"{}\"}} {}\n", EscapeLabelValue(m.model),
                       m.committed_version);
  }
  Family(out, "weightsync_engine_applied_version", "gauge", "Last weight version each engine rank acknowledged.");
  for (const auto& e : s.engines)
    out += fmt::format("weightsync_engine_applied_version{{engine=\"{}\",model=\"{}\",replica=\"{}\",tp_rank=\"{}\"}} {}\n",
                       EscapeLabelValue(e.engine_id), EscapeLabelValue(e.model), e.replica_id, e.tp_rank,
                       e.applied_version);
  Family(out, "weightsync_engine_version_lag", "gauge",
         "Committed version of the engine's model minus the version the engine applied.");
  for (const auto& e : s.engines) {
    uint64_t c = committed.count(e.model) ? committed[e.model] : 0;
    out += fmt::format("weightsync_engine_version_lag{{engine=\"{}\",model=\"{}\"}} {}\n",
                       EscapeLabelValue(e.engine_id), EscapeLabelValue(e.model),
                       c > e.applied_version ? c - e.applied_version : 0);
  }

  Family(out, "weightsync_peer_up", "gauge",
         "1 when the peer daemon answered its last probe as the node it is configured as, else 0.");
  for (const auto& p : peers)
    out += fmt::format("weightsync_peer_up{{peer=\"{}\"}} {}\n", EscapeLabelValue(p.spec.name),
                       p.health == cluster::PeerHealth::kUp ? 1 : 0);
  if (!peer_bytes.empty()) {
    Family(out, "weightsync_peer_bytes_sent_total", "counter",
           "Sync data (packed chunks) sent to the peer (UCX and NCCL together).");
    for (const auto& [peer, b] : peer_bytes)
      out += fmt::format("weightsync_peer_bytes_sent_total{{peer=\"{}\"}} {}\n", EscapeLabelValue(peer), b.sent);
    Family(out, "weightsync_peer_bytes_received_total", "counter",
           "Sync data (packed chunks) received from the peer (UCX and NCCL together).");
    for (const auto& [peer, b] : peer_bytes)
      out += fmt::format("weightsync_peer_bytes_received_total{{peer=\"{}\"}} {}\n", EscapeLabelValue(peer),
                         b.received);
    Family(out, "weightsync_peer_device_bytes_sent_total", "counter",
           "The part of weightsync_peer_bytes_sent_total sent GPU to GPU (NCCL).");
    for (const auto& [peer, b] : peer_bytes)
      out += fmt::format("weightsync_peer_device_bytes_sent_total{{peer=\"{}\"}} {}\n", EscapeLabelValue(peer),
                         b.device_sent);
    Family(out, "weightsync_peer_device_bytes_received_total", "counter",
           "The part of weightsync_peer_bytes_received_total received GPU to GPU (NCCL).");
    for (const auto& [peer, b] : peer_bytes)
      out += fmt::format("weightsync_peer_device_bytes_received_total{{peer=\"{}\"}} {}\n", EscapeLabelValue(peer),
                         b.device_received);
  }

  std::lock_guard lk(mu_);
  Family(out, "weightsync_syncs_total", "counter", "Finished syncs by outcome.");
  for (const auto& [outcome, n] : syncs_) out += fmt::format("weightsync_syncs_total{{outcome=\"{}\"}} {}\n", outcome, n);
  Family(out, "weightsync_sync_duration_seconds", "histogram", "Seconds from BeginSync to commit or abort.");
  uint64_t cum = 0;
  for (size_t i = 0; i <= buckets_.size(); ++i) {
    cum += duration_counts_[i];
    out += fmt::format("weightsync_sync_duration_seconds_bucket{{le=\"{}\"}} {}\n",
                       i < buckets_.size() ? Num(buckets_[i]) : "+Inf", cum);
  }
  out += "weightsync_sync_duration_seconds_sum " + Num(duration_sum_) + "\n";
  out += fmt::format("weightsync_sync_duration_seconds_count {}\n", cum);
  Family(out, "weightsync_bytes_written_total", "counter", "Bytes written into engine memory by finished syncs.");
  out += fmt::format("weightsync_bytes_written_total {}\n", bytes_written_);
  Family(out, "weightsync_bytes_read_total", "counter", "Bytes read from trainer memory by finished syncs.");
  out += fmt::format("weightsync_bytes_read_total {}\n", bytes_read_);
  Family(out, "weightsync_last_sync_throughput_bytes_per_second", "gauge",
         "Bytes written per second by the last committed sync (begin to commit).");
  out += "weightsync_last_sync_throughput_bytes_per_second " + Num(last_throughput_) + "\n";
  Family(out, "weightsync_rpc_errors_total", "counter", "RPCs that ended with an error, by method and status code.");
  for (const auto& [k, n] : rpc_errors_)
    out += fmt::format("weightsync_rpc_errors_total{{method=\"{}\",code=\"{}\"}} {}\n", EscapeLabelValue(k.first),
                       k.second, n);
  return out;
}

std::string StatusCodeName(int code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  if (code >= 0 && code < static_cast<int>(std::size(kNames))) return kNames[code];
  return "CODE_" + std::to_string(code);
}

std::string EscapeLabelValue(const std::string& v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\')
      out += "\\\\";
    else if (c == '"')
      out += "\\\"";
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeRpcMetricsInterceptor(Metrics* metrics) {
  return std::make_unique<RpcMetricsFactory>(metrics);
}

// ---------------------------------------------------------------- HTTP

MetricsServer::MetricsServer(Metrics* metrics, const Coordinator* coordinator, const cluster::PeerSet* peers,
                             const GrpcClusterLink* cluster)
    : metrics_(metrics), coordinator_(coordinator), peers_(peers), cluster_(cluster) {}

MetricsServer::~MetricsServer() { Stop(); }

Status MetricsServer::Start(const std::string& address) {
  const auto colon = address.rfind(':');
  if (colon == std::string::npos) return InvalidArgument("--metrics-listen " + address + ": not HOST:PORT");
  std::string host = address.substr(0, colon);
  const std::string port_s = address.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host.empty()) host = "0.0.0.0";
  int port = 0;
  if (port_s.empty() || port_s.size() > 5 || port_s.find_first_not_of("0123456789") != std::string::npos ||
      (port = std::stoi(port_s)) > 65535)
    return InvalidArgument("--metrics-listen " + address + ": port must be a number 0..65535");

  http_ = std::make_unique<httplib::Server>();
  http_->new_task_queue = [] { return new httplib::ThreadPool(2); };
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics_->Render(coordinator_->GetStatus(),
                                     peers_ != nullptr ? peers_->Snapshot() : std::vector<cluster::PeerState>{},
                                     cluster_ != nullptr ? cluster_->bytes() : std::map<std::string, PeerBytes>{}),
                    "text/plain; version=0.0.4; charset=utf-8");
  });
  int bound = port;
  if (port == 0)
    bound = http_->bind_to_any_port(host);
  else if (!http_->bind_to_port(host, port))
    bound = -1;
  if (bound <= 0) {
    http_.reset();
    return Unavailable("--metrics-listen " + address + ": cannot bind (address in use or not local?)");
  }
  url_ = fmt::format("http://{}:{}/metrics", host.find(':') != std::string::npos ? "[" + host + "]" : host, bound);
  thread_ = std::thread([this] { http_->listen_after_bind(); });
  // Stop() is a no-op until the loop runs: wait for it.
  for (int i = 0; i < 5000 && !http_->is_running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return Status::Ok();
}

void MetricsServer::Stop() {
  if (!http_) return;
  http_->stop();
  if (thread_.joinable()) thread_.join();
  http_.reset();
}

}  // namespace ws::server
