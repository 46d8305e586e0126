// weightsyncd: the per-node weight sync daemon. Flags or a TOML config file
// (keys are the long flag names; flags win), then serve until SIGTERM/SIGINT.
// Exit status: 0 after a clean shutdown, 2 when it cannot start.
#include <grp.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "daemon/cluster/peers.h"
#include "daemon/core/layout.h"
#include "daemon/core/thread_annotations.h"
#include "daemon/core/limits.h"
#include "daemon/core/token.h"
#include "daemon/dataplane/data_plane.h"
#include "daemon/mem/memory.h"
#include "daemon/server/coordinator.h"
#include "daemon/server/logging.h"
#include "daemon/server/metrics.h"
#include "daemon/server/grpc_cluster_link.h"
#include "daemon/server/peer_prober.h"
#include "daemon/server/server.h"
#include "daemon/server/systemd_notify.h"
#include "daemon/transport/transport.h"

#ifndef WS_DEFAULT_LAYOUTS_DIR
#define WS_DEFAULT_LAYOUTS_DIR "/usr/local/share/weightsync/layouts"
#endif

namespace {

constexpr int kExitStartup = 2;
// The data plane hit a sticky CUDA error; a restart gives it a new context.
constexpr int kExitFatal = 3;

// Shared with the detached sigwait thread, so they outlive main().
sigset_t g_term;
ws::Mutex g_mu;
std::condition_variable g_cv;                // signalled when g_signal or g_fatal is set
int g_signal WS_GUARDED_BY(g_mu) = 0;        // the first SIGTERM/SIGINT
std::string g_fatal WS_GUARDED_BY(g_mu);     // set once by the data plane's on_fatal

int StartupError(const std::string& msg) {
  std::fprintf(stderr, "weightsyncd: %s\n", msg.c_str());
  return kExitStartup;
}

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

// A --shm-group value: a gid, or a group name looked up in the group database.
ws::Result<uint32_t> ResolveGroup(const std::string& g) {
  uint32_t gid = 0;
  if (ParseId(g, &gid)) return gid;
  std::vector<char> buf(16384);
  group gr{};
  group* found = nullptr;
  int rc;
  while ((rc = getgrnam_r(g.c_str(), &gr, buf.data(), buf.size(), &found)) == ERANGE && buf.size() < (1u << 20))
    buf.resize(buf.size() * 2);
  if (rc != 0 || found == nullptr) return ws::InvalidArgument("--shm-group " + g + ": no such group");
  return static_cast<uint32_t>(gr.gr_gid);
}

}  // namespace

int main(int argc, char** argv) {
  // Termination signals go to one sigwait thread only: block them before any
  // other thread (gRPC, executor pool) exists so every thread inherits the mask.
  sigemptyset(&g_term);
  sigaddset(&g_term, SIGTERM);
  sigaddset(&g_term, SIGINT);
  pthread_sigmask(SIG_BLOCK, &g_term, nullptr);
  signal(SIGPIPE, SIG_IGN);

  CLI::App app{"weightsyncd: writes trainer weight shards directly into inference engines' parameter memory.",
               "weightsyncd"};
  app.set_config("--config", "", "TOML config file; keys are the long option names (command-line flags win)");
  app.allow_config_extras(CLI::config_extras_mode::error);
  app.set_version_flag("--version", std::string("weightsyncd ") + WS_VERSION);

  std::vector<std::string> listen{"unix:/tmp/weightsync.sock"};
  std::string layouts_dir = WS_DEFAULT_LAYOUTS_DIR;
  std::string log_format = "text";
  std::string log_level = "info";
  int threads = 0;
  bool require_cuda = false;
  uint64_t chunk_bytes = 4u << 20;
  double ack_timeout = 60;
  double progress_timeout = 30;
  uint64_t max_message_bytes = 512u << 20;
  int max_rpc_threads = 1024;
  double shutdown_grace = 2;
  std::string tls_cert, tls_key, tls_client_ca, token_file, socket_mode = "0660";
  bool insecure_tcp = false;
  std::vector<uint32_t> admin_uids;
  std::vector<std::string> admin_cns, shm_groups;
  std::string metrics_listen;
  std::string node_name;
  std::vector<std::string> peer_values;
  std::string peer_tls_ca, peer_tls_cert, peer_tls_key, peer_token_file;
  double peer_probe_interval = 2;
  uint64_t peer_staging_mb = 64;
  std::string peer_ucx_transports = "tcp", peer_ucx_devices;
  double peer_transfer_timeout = 30;

  app.add_option("--listen", listen,
                 "Address to serve on, repeatable: unix:/path/to.sock or host:port (a stale socket file is replaced)")
      ->capture_default_str();
  app.add_option("--metrics-listen", metrics_listen,
                 "Serve Prometheus metrics over plain HTTP at http://HOST:PORT/metrics (e.g. 127.0.0.1:9464; "
                 "no authentication: bind it where only the scraper reaches)");
  app.add_option("--layouts-dir", layouts_dir, "Directory of layout rule files (*.json)")->capture_default_str();
  app.add_option("--log-format", log_format, "Log format")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_option("--log-level", log_level, "Log level")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}))
      ->capture_default_str();
  app.add_option("--threads", threads, "Copy worker threads (0 = one per core)")
      ->check(CLI::Range(0, 1024))
      ->capture_default_str();
  app.add_flag("--require-cuda", require_cuda,
               "Refuse to start (exit 2) unless CUDA references can be served (a device and a working CUDA executor)");
  app.add_option("--chunk-bytes", chunk_bytes, "Destination bytes per copy work item (e.g. 4MiB)")
      ->transform(CLI::AsSizeValue(/*kb_is_1000=*/true))
      ->capture_default_str();
  app.add_option("--ack-timeout", ack_timeout, "Seconds Commit waits for every engine's AckVersion")
      ->check(CLI::Range(0.001, 1e6))
      ->capture_default_str();
  app.add_option("--sync-progress-timeout,--sync-idle-timeout", progress_timeout,
                 "Seconds an uncommitted sync may go without progress (BeginSync, a layer landing) before it is "
                 "aborted and its model freed, even while the trainer's streams are open (0 = never)")
      ->check(CLI::Range(0.0, 1e6))
      ->capture_default_str();
  app.add_option("--max-message-bytes", max_message_bytes,
                 "Largest gRPC message accepted (BeginSync carries the whole manifest), e.g. 512MiB")
      ->transform(CLI::AsSizeValue(/*kb_is_1000=*/true))
      ->capture_default_str();
  app.add_option("--max-rpc-threads", max_rpc_threads,
                 "gRPC handler threads at most (each engine event stream and trainer Push stream holds one); "
                 "calls past it get RESOURCE_EXHAUSTED")
      ->check(CLI::Range(16, 65536))
      ->capture_default_str();
  // Request limits (daemon/core/limits.h): refusals name the limit.
  ws::Limits limits;
  app.add_option("--max-tensors-per-manifest", limits.max_tensors_per_manifest,
                 "Most tensors in one BeginSync manifest (also shards in one pushed layer)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-shards-per-manifest", limits.max_shards_per_manifest,
                 "Most shards in one BeginSync manifest, all tensors together")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-params-per-registration", limits.max_params_per_registration,
                 "Most parameters in one RegisterEngine")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-layout-entries", limits.max_layout_entries,
                 "Most rule expansions (loop iterations) resolving one engine layout from its HF config")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-json-depth", limits.max_json_depth,
                 "Deepest nesting of arrays/objects in hf_config_json, mapping_json and rule files")
      ->check(CLI::Range(size_t{1}, size_t{1024}))
      ->capture_default_str();
  app.add_option("--max-json-bytes", limits.max_json_bytes, "Largest hf_config_json or mapping_json, e.g. 1MiB")
      ->transform(CLI::AsSizeValue(/*kb_is_1000=*/true))
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--max-name-bytes", limits.max_name_bytes,
                 "Longest model, tensor, parameter, layer or option name (bytes)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--shutdown-grace", shutdown_grace, "Seconds in-flight RPCs get to finish on SIGTERM/SIGINT")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--socket-mode", socket_mode,
                 "Permission bits (octal) of the unix socket files; who may connect at all (every call is then "
                 "authorized by the caller's uid)")
      ->capture_default_str();
  app.add_option("--tls-cert", tls_cert, "PEM server certificate for TCP addresses (with --tls-key)");
  app.add_option("--tls-key", tls_key, "PEM private key of --tls-cert");
  app.add_option("--tls-client-ca", tls_client_ca,
                 "PEM CA certificates: TCP clients must present a certificate they signed; its CN is the "
                 "caller's identity (cn:NAME)");
  app.add_flag("--insecure-tcp", insecure_tcp,
               "Serve TCP addresses as plaintext without TLS (anyone who can reach them can call every RPC)");
  app.add_option("--token-file", token_file,
                 "File with a shared token every RPC must carry as \"authorization: Bearer <token>\" (all "
                 "transports; the health service is exempt); must not be readable by other users");
  app.add_option("--admin-uid", admin_uids,
                 "Unix uid that may act on every engine and sync, besides root (repeatable)");
  app.add_option("--admin-cn", admin_cns, "TLS client certificate CN that may act on every engine and sync (repeatable)");
  app.add_option("--shm-group", shm_groups,
                 "Group (name or gid) whose shared-memory objects its members may name, besides their own "
                 "(repeatable)");

  app.add_option("--node-name", node_name, "This node's name among its peers (default: the host name)");
  app.add_option("--peer", peer_values,
                 "A peer daemon of this deployment as NAME=HOST:PORT, NAME being its --node-name (repeatable)");
  app.add_option("--peer-tls-ca", peer_tls_ca, "PEM CAs that signed the peers' server certificates");
  app.add_option("--peer-tls-cert", peer_tls_cert,
                 "PEM client certificate this daemon presents to its peers (with --peer-tls-key)");
  app.add_option("--peer-tls-key", peer_tls_key, "PEM private key of --peer-tls-cert");
  app.add_option("--peer-token-file", peer_token_file,
                 "Bearer token file presented to peers (default: --token-file)");
  app.add_option("--peer-staging-mb", peer_staging_mb,
                 "Syncs across nodes: packed bytes held at once per peer (MiB), sending or receiving")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--peer-ucx-transports", peer_ucx_transports,
                 "UCX transports for sync data between nodes (UCX_TLS syntax, e.g. tcp or rc,ud; \"\" = UCX's choice)")
      ->capture_default_str();
  app.add_option("--peer-ucx-devices", peer_ucx_devices,
                 "UCX network devices for sync data (UCX_NET_DEVICES syntax, e.g. eth0; default: all)");
  app.add_option("--peer-transfer-timeout", peer_transfer_timeout,
                 "Seconds one window of sync data to a peer may take before the sync aborts")
      ->capture_default_str();
  app.add_option("--peer-probe-interval", peer_probe_interval, "Seconds between probes of each peer")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 3600.0));

  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version
    return app.exit(e);
  } catch (const CLI::ConfigError& e) {
    std::string file = app.get_config_ptr() ? app.get_config_ptr()->as<std::string>() : "";
    return StartupError("config file " + file + ": " + e.what() +
                        " (keys are the long flag names, e.g. layouts-dir; see --help)");
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitStartup;
  }
  if (chunk_bytes == 0) return StartupError("--chunk-bytes must be positive");
  if (max_message_bytes < (1u << 20) || max_message_bytes > (2047ull << 20))
    return StartupError("--max-message-bytes must be between 1MiB and 2047MiB");

  uint32_t sock_mode = 0;
  {
    char* end = nullptr;
    unsigned long m = socket_mode.empty() ? 01000 : std::strtoul(socket_mode.c_str(), &end, 8);
    if (socket_mode.empty() || *end != '\0' || m > 0777)
      return StartupError("--socket-mode " + socket_mode + ": not an octal mode 0..0777 (e.g. 0660)");
    sock_mode = static_cast<uint32_t>(m);
  }
  ws::server::AuthOptions auth;
  auth.admin_uids = admin_uids;
  auth.admin_cns = admin_cns;
  for (const auto& g : shm_groups) {
    auto gid = ResolveGroup(g);
    if (!gid.ok()) return StartupError(gid.status().message());
    auth.shm_gids.push_back(*gid);
  }
  if (!token_file.empty()) {
    auto token = ws::ReadTokenFile(token_file, /*refuse_other_access=*/true);
    if (!token.ok()) return StartupError(token.status().message());
    auth.token = std::move(token).value();
  }

  if (node_name.empty()) {
    char host[256] = {};
    if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0') return StartupError("--node-name: no host name");
    node_name = host;
  }
  std::vector<ws::cluster::PeerSpec> peer_specs;
  for (const auto& v : peer_values) {
    auto p = ws::cluster::ParsePeerSpec(v);
    if (!p.ok()) return StartupError(p.status().message());
    peer_specs.push_back(std::move(p).value());
  }
  if (ws::Status st = ws::cluster::ValidatePeers(node_name, peer_specs); !st.ok()) return StartupError(st.message());
  if (peer_tls_cert.empty() != peer_tls_key.empty())
    return StartupError("--peer-tls-cert and --peer-tls-key go together");
  ws::ClientOptions peer_client;
  peer_client.tls_ca_file = peer_tls_ca;
  peer_client.tls_cert_file = peer_tls_cert;
  peer_client.tls_key_file = peer_tls_key;
  peer_client.token_file = peer_token_file.empty() ? token_file : peer_token_file;
  const auto probe_interval = std::chrono::milliseconds(static_cast<int64_t>(peer_probe_interval * 1000));
  // A peer that restarted is reachable again on the next probe, not after gRPC's backoff (up to 120 s).
  peer_client.max_reconnect_backoff_s = std::min(peer_probe_interval, 1.0);
  ws::cluster::PeerSetOptions pso;
  pso.interval = probe_interval;
  pso.timeout = std::min(probe_interval, std::chrono::milliseconds(2000));
  ws::cluster::PeerSet peers(node_name, std::move(peer_specs),
                             std::make_unique<ws::server::GrpcPeerProber>(node_name, peer_client), pso);

  ws::server::LogOptions lo;
  lo.format = log_format == "json" ? ws::server::LogFormat::kJson : ws::server::LogFormat::kText;
  lo.level = log_level;
  if (ws::Status st = ws::server::SetupLogging(lo); !st.ok()) return StartupError(st.message());

  auto layouts = ws::LayoutRegistry::LoadDir(layouts_dir, limits);
  if (!layouts.ok()) return StartupError("cannot load layouts from " + layouts_dir + ": " + layouts.status().message());
  auto archs = layouts.value()->Architectures();
  if (archs.empty()) return StartupError("no layout rules found in " + layouts_dir);

  ws::DataPlaneOptions dpo;
  dpo.executor.threads = threads;
  dpo.executor.chunk_bytes = chunk_bytes;
  dpo.on_fatal = [](const ws::Status& st) {
    {
      ws::MutexLock lk(&g_mu);
      g_fatal = st.message();
    }
    g_cv.notify_all();
  };
  auto plane = ws::MakeDataPlane(dpo);
  auto& domain = plane.domain;
  auto& executor = plane.executor;
  if (!plane.cuda.ok()) {
    if (require_cuda) return StartupError("--require-cuda: " + plane.cuda.message());
    spdlog::info("CUDA references are refused: {}", plane.cuda.message());
  }

  ws::server::CoordinatorOptions co;
  co.ack_timeout = std::chrono::milliseconds(static_cast<int64_t>(ack_timeout * 1000));
  co.progress_timeout = std::chrono::milliseconds(static_cast<int64_t>(progress_timeout * 1000));
  co.limits = limits;
  // Syncs across nodes: with peers, a UCX worker for the data and the peer
  // RPCs for the control (daemon/server/grpc_cluster_link.h).
  std::unique_ptr<ws::server::GrpcClusterLink> cluster;
  if (peers.size() > 0) {
    ws::UcxOptions uo;
    uo.transports = peer_ucx_transports;
    uo.net_devices = peer_ucx_devices;
    auto ucx = ws::UcxTransport::Create(uo);
    if (!ucx.ok()) return StartupError("UCX worker for syncs across nodes: " + ucx.status().message());
    ws::server::ClusterLinkOptions clo;
    clo.staging_bytes = peer_staging_mb << 20;
    clo.transfer_timeout = std::chrono::milliseconds(static_cast<int64_t>(peer_transfer_timeout * 1000));
    clo.commit_timeout = co.ack_timeout + std::chrono::seconds(30);
    clo.limits = limits;
    cluster = std::make_unique<ws::server::GrpcClusterLink>(&peers, peer_client, std::move(ucx).value(), clo);
    co.cluster = cluster.get();
  }
  ws::server::Metrics metrics(ws::server::BuildInfo{WS_VERSION, plane.cuda.ok()});
  // The watchdog pings while housekeeping passes keep coming (three missed = stalled).
  ws::server::SystemdNotifier systemd(3 * co.housekeeping_interval);
  co.observers = {&metrics, &systemd};
  // Transports by route: today the local one (both ends mapped here).
  auto transports = std::make_shared<ws::TransportRegistry>();
  transports->Add(std::make_shared<ws::LocalTransport>(executor.get(), plane.cuda.ok()));
  ws::server::Coordinator coordinator(layouts.value(), domain.get(), transports, co);

  ws::server::ServerOptions so;
  so.listen = listen;
  so.max_message_bytes = static_cast<int>(max_message_bytes);
  so.max_rpc_threads = max_rpc_threads;
  so.auth = auth;
  so.tls.cert_file = tls_cert;
  so.tls.key_file = tls_key;
  so.tls.client_ca_file = tls_client_ca;
  so.insecure_tcp = insecure_tcp;
  so.socket_mode = sock_mode;
  so.metrics = &metrics;
  so.peers = &peers;
  so.cluster = cluster.get();
  ws::server::Server server(&coordinator, so);
  if (ws::Status st = server.Start(); !st.ok()) return StartupError(st.message());
  ws::server::MetricsServer metrics_server(&metrics, &coordinator, &peers, cluster.get());
  if (!metrics_listen.empty()) {
    if (ws::Status st = metrics_server.Start(metrics_listen); !st.ok()) {
      server.Stop(std::chrono::milliseconds(0));
      return StartupError(st.message());
    }
    spdlog::info("metrics on {}", metrics_server.url());
  }

  auto caps = domain->caps();
  std::string addrs;
  for (const auto& a : server.addresses()) addrs += (addrs.empty() ? "" : " ") + a;
  spdlog::info("weightsyncd {} serving on {}; {} architectures from {}; {} copy threads; memory: host_shm={} cuda_ipc={}",
               WS_VERSION, addrs, archs.size(), layouts_dir, executor->threads(), caps.host_shm, caps.cuda_ipc);
  {
    std::string admins = "uid 0";
    for (uint32_t u : auth.admin_uids) admins += ", uid " + std::to_string(u);
    for (const auto& cn : auth.admin_cns) admins += ", cn " + cn;
    bool has_tcp = false;
    for (const auto& a : server.addresses()) has_tcp |= a.rfind("unix:", 0) != 0;
    const char* tcp = !has_tcp              ? "not served"
                      : !tls_cert.empty()   ? (tls_client_ca.empty() ? "TLS" : "TLS with client certificates")
                                            : "plaintext (--insecure-tcp)";
    spdlog::info("access: unix socket mode {:04o}; TCP {}; token {}; admins: {}; shm groups: {}", sock_mode, tcp,
                 auth.token.empty() ? "not required" : "required", admins, auth.shm_gids.size());
  }

  if (peers.size() > 0) {
    std::string names;
    for (const auto& p : peers.Snapshot()) names += (names.empty() ? "" : ", ") + p.spec.name + "=" + p.spec.address;
    spdlog::info("node {}; peers: {} (probed every {:.1f} s)", node_name, names, peer_probe_interval);
  }
  peers.Start();
  systemd.Ready(&coordinator, server.addresses());

  std::thread([] {
    int sig = 0;
    if (sigwait(&g_term, &sig) != 0) return;
    {
      ws::MutexLock lk(&g_mu);
      g_signal = sig;
    }
    g_cv.notify_all();
    // Another signal at least a second later (not a duplicate delivered to the
    // whole process group) while shutting down: stop now.
    auto first = std::chrono::steady_clock::now();
    while (sigwait(&g_term, &sig) == 0) {
      if (std::chrono::steady_clock::now() - first < std::chrono::seconds(1)) continue;
      std::fprintf(stderr, "weightsyncd: second %s during shutdown, exiting immediately\n", strsignal(sig));
      _exit(1);
    }
  }).detach();

  int got = 0;
  std::string fatal;
  {
    ws::MutexLock lk(&g_mu);
    lk.Wait(g_cv, [] {
      g_mu.AssertHeld();
      return g_signal != 0 || !g_fatal.empty();
    });
    got = g_signal;
    fatal = g_fatal;
  }
  if (got == 0) {
    // Health turns NOT_SERVING and every sync aborts in Stop(); the non-zero
    // exit has the supervisor restart the daemon with a fresh CUDA context.
    spdlog::critical("the CUDA data plane is unusable, shutting down (aborting in-flight syncs): {}", fatal);
  } else {
    spdlog::info("received {}; shutting down (aborting in-flight syncs)", strsignal(got));
  }
  // Whatever is in flight, the daemon is gone a few seconds after the grace
  // period: a supervisor's stop must not hang on a stuck peer or copy.
  const auto hard_limit = std::chrono::milliseconds(static_cast<int64_t>(shutdown_grace * 1000)) +
                          std::chrono::seconds(3);
  std::thread([hard_limit] {
    std::this_thread::sleep_for(hard_limit);
    std::fprintf(stderr, "weightsyncd: shutdown did not finish within %.1f s; exiting now\n",
                 std::chrono::duration<double>(hard_limit).count());
    _exit(1);
  }).detach();
  systemd.Stopping(got == 0 ? "CUDA data plane unusable" : strsignal(got));
  metrics_server.Stop();
  peers.Stop();
  server.Stop(std::chrono::milliseconds(static_cast<int64_t>(shutdown_grace * 1000)));
  spdlog::info("stopped");
  spdlog::shutdown();
  return got == 0 ? kExitFatal : 0;
}
