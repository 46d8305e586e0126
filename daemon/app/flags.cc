#include "daemon/app/flags.h"

#include <grp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>

#include "daemon/core/token.h"

namespace ws::app {
namespace {

// "1234" -> 1234; false when not a decimal number below 2^32.
bool ParseId(const std::string& s, uint32_t* out) {
  if (s.empty() || s.size() > 10) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v > 0xffffffffull) return false;
  *out = static_cast<uint32_t>(v);
  return true;
}

std::chrono::milliseconds Millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
}

}  // namespace

Result<uint32_t> ResolveGroup(const std::string& g) {
  uint32_t gid = 0;
  if (ParseId(g, &gid)) return gid;
  std::vector<char> buf(16384);
  group gr{};
  group* found = nullptr;
  int rc;
  while ((rc = getgrnam_r(g.c_str(), &gr, buf.data(), buf.size(), &found)) == ERANGE && buf.size() < (1u << 20))
    buf.resize(buf.size() * 2);
  if (rc != 0 || found == nullptr) return InvalidArgument("--shm-group " + g + ": no such group");
  return static_cast<uint32_t>(gr.gr_gid);
}

void AddFlags(CLI::App& app, DaemonFlags& f, const std::string& version) {
  app.set_config("--config", "", "TOML config file; keys are the long option names (command-line flags win)");
  app.allow_config_extras(CLI::config_extras_mode::error);
  app.set_version_flag("--version", version);
  app.add_option("--listen", f.listen,
                 "Address to serve on, repeatable: unix:/path/to.sock or host:port (a stale socket file is replaced)")
      ->capture_default_str();
  app.add_option("--metrics-listen", f.metrics_listen,
                 "Serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464; "
                 "no authentication: bind it where only the scraper reaches)");
  app.add_option("--layouts-dir", f.layouts_dir, "Directory of layout rule files (*.json)")->capture_default_str();
  app.add_option("--log-format", f.log_format, "Log format")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_option("--log-level", f.log_level, "Log level")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}))
      ->capture_default_str();
  app.add_option("--threads", f.threads, "Copy worker threads (0 = one per core)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  app.add_flag("--require-cuda", f.require_cuda,
               "Refuse to start (exit 2) unless CUDA references can be served (a device and a working CUDA executor)");
  app.add_option("--chunk-bytes", f.chunk_bytes, "Destination bytes per copy work item (e.g. 4MiB)")
      ->transform(CLI::AsSizeValue(/*kb_is_1000=*/true))
      ->capture_default_str();
  app.add_option("--ack-timeout", f.ack_timeout, "Seconds Commit waits for every engine's AckVersion")
      ->check(CLI::Range(0.001, 1e6))
      ->capture_default_str();
  app.add_option("--sync-progress-timeout,--sync-idle-timeout", f.progress_timeout,
                 "Seconds an uncommitted sync may go without progress (BeginSync, a layer landing) before it is "
                 "aborted and its model freed, even while the trainer's streams are open (0 = never)")
      ->check(CLI::Range(0.0, 1e6))
      ->capture_default_str();
  app.add_option("--max-message-bytes", f.max_message_bytes,
                 "Largest gRPC message accepted (BeginSync carries the whole manifest), e.g. 512MiB")
      ->transform(CLI::AsSizeValue(/*kb_is_1000=*/true))
      ->capture_default_str();
  app.add_option("--max-rpc-threads", f.max_rpc_threads,
                 "gRPC handler threads at most (each engine event stream and trainer Push stream holds one); "
                 "calls past it get RESOURCE_EXHAUSTED")
      ->check(CLI::Range(16, 65536))
      ->capture_default_str();
  // Request limits (daemon/core/f.limits.h): refusals name the limit.
  ws::Limits limits;
  app.add_option("--max-tensors-per-manifest", f.limits.max_tensors_per_manifest,
                 "Most tensors in one BeginSync manifest (also shards in one pushed layer)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-shards-per-manifest", f.limits.max_shards_per_manifest,
                 "Most shards in one BeginSync manifest, all tensors together")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-params-per-registration", f.limits.max_params_per_registration,
                 "Most parameters in one RegisterEngine")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-layout-entries", f.limits.max_layout_entries,
                 "Most rule expansions (loop iterations) resolving one engine layout from its HF config")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-json-depth", f.limits.max_json_depth,
                 "Deepest nesting of arrays/objects in hf_config_json, mapping_json and rule files")
      ->check(CLI::Range(size_t{1}, size_t{1024}))
      ->capture_default_str();
  app.add_option("--max-json-bytes", f.limits.max_json_bytes, "Largest hf_config_json or mapping_json, e.g. 1MiB")
      ->transform(CLI::AsSizeValue(/*kb_is_1000=*/true))
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-name-bytes", f.limits.max_name_bytes,
                 "Longest model, tensor, parameter, layer or option name (bytes)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--shutdown-grace", f.shutdown_grace, "Seconds in-flight RPCs get to finish on SIGTERM/SIGINT")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--socket-mode", f.socket_mode,
                 "Permission bits (octal) of the unix socket files; who may connect at all (every call is then "
                 "authorized by the caller's uid)")
      ->capture_default_str();
  app.add_option("--tls-cert", f.tls_cert, "PEM server certificate for TCP addresses (with --tls-key)");
  app.add_option("--tls-key", f.tls_key, "PEM private key of --tls-cert");
  app.add_option("--tls-client-ca", f.tls_client_ca,
                 "PEM CA certificates: TCP clients must present a certificate they signed; its CN is the "
                 "caller's identity (cn:NAME)");
  app.add_flag("--insecure-tcp", f.insecure_tcp,
               "Serve TCP addresses as plaintext without TLS (anyone who can reach them can call every RPC)");
  app.add_option("--token-file", f.token_file,
                 "File with a shared token every RPC must carry as \"authorization: Bearer <token>\" (all "
                 "transports; the health service is exempt); must not be readable by other users");
  app.add_option("--admin-uid", f.admin_uids,
                 "Unix uid that may act on every engine and sync, besides root (repeatable)");
  app.add_option("--admin-cn", f.admin_cns, "TLS client certificate CN that may act on every engine and sync (repeatable)");
  app.add_option("--shm-group", f.shm_groups,
                 "Group (name or gid) whose shared-memory objects its members may name, besides their own "
                 "(repeatable)");

  app.add_option("--node-name", f.node_name, "This node's name among its peers (default: the host name)");
  app.add_option("--peer", f.peers,
                 "A peer daemon of this deployment as NAME=HOST:PORT, NAME being its --node-name (repeatable)");
  app.add_option("--peer-tls-ca", f.peer_tls_ca, "PEM CAs that signed the peers' server certificates");
  app.add_option("--peer-tls-cert", f.peer_tls_cert,
                 "PEM client certificate this daemon presents to its peers (with --peer-tls-key)");
  app.add_option("--peer-tls-key", f.peer_tls_key, "PEM private key of --peer-tls-cert");
  app.add_option("--peer-token-file", f.peer_token_file,
                 "Bearer token file presented to peers (default: --token-file)");
  app.add_option("--peer-staging-mb", f.peer_staging_mb,
                 "Syncs across nodes: packed bytes held at once per peer (MiB), sending or receiving")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--peer-ucx-transports", f.peer_ucx_transports,
                 "UCX transports for sync data between nodes (UCX_TLS syntax, e.g. tcp or rc,ud; \"\" = UCX's choice)")
      ->capture_default_str();
  app.add_option("--peer-ucx-devices", f.peer_ucx_devices,
                 "UCX network devices for sync data (UCX_NET_DEVICES syntax, e.g. eth0; default: all)");
  app.add_option("--peer-transfer-timeout", f.peer_transfer_timeout,
                 "Seconds one window of sync data to a peer may take before the sync aborts")
      ->capture_default_str();
  app.add_option("--peer-probe-interval", f.peer_probe_interval, "Seconds between probes of each peer")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 3600.0));

}

Result<StartupConfig> Resolve(const DaemonFlags& f) {
  if (f.chunk_bytes == 0) return InvalidArgument("--chunk-bytes must be positive");
  if (f.max_message_bytes < (1u << 20) || f.max_message_bytes > (2047ull << 20))
    return InvalidArgument("--max-message-bytes must be between 1MiB and 2047MiB");
  StartupConfig c;
  {
    char* end = nullptr;
    unsigned long m = f.socket_mode.empty() ? 01000 : std::strtoul(f.socket_mode.c_str(), &end, 8);
    if (f.socket_mode.empty() || *end != '\0' || m > 0777)
      return InvalidArgument("--socket-mode " + f.socket_mode + ": not an octal mode 0..0777 (e.g. 0660)");
    c.socket_mode = static_cast<uint32_t>(m);
  }
  c.auth.admin_uids = f.admin_uids;
  c.auth.admin_cns = f.admin_cns;
  for (const auto& g : f.shm_groups) {
    WS_ASSIGN_OR_RETURN(uint32_t gid, ResolveGroup(g));
    c.auth.shm_gids.push_back(gid);
  }
  if (!f.token_file.empty()) {
    WS_ASSIGN_OR_RETURN(c.auth.token, ReadTokenFile(f.token_file, /*refuse_other_access=*/true));
  }

  c.node_name = f.node_name;
  if (c.node_name.empty()) {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0')
      return InvalidArgument("--node-name: no host name to default to");
    c.node_name = host;
  }
  for (const auto& v : f.peers) {
    WS_ASSIGN_OR_RETURN(cluster::PeerSpec p, cluster::ParsePeerSpec(v));
    c.peers.push_back(std::move(p));
  }
  WS_RETURN_IF_ERROR(cluster::ValidatePeers(c.node_name, c.peers));
  if (f.peer_tls_cert.empty() != f.peer_tls_key.empty())
    return InvalidArgument("--peer-tls-cert and --peer-tls-key go together");
  c.peer_client.tls_ca_file = f.peer_tls_ca;
  c.peer_client.tls_cert_file = f.peer_tls_cert;
  c.peer_client.tls_key_file = f.peer_tls_key;
  c.peer_client.token_file = f.peer_token_file.empty() ? f.token_file : f.peer_token_file;
  // A peer that restarted is reachable again on the next probe, not after gRPC's backoff (up to 120 s).
  c.peer_client.max_reconnect_backoff_s = std::min(f.peer_probe_interval, 1.0);
  c.peer_set.interval = Millis(f.peer_probe_interval);
  c.peer_set.timeout = std::min(c.peer_set.interval, std::chrono::milliseconds(2000));
  return c;
}

}  // namespace ws::app
