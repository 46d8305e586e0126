// weightsyncd: the per-node weight sync daemon. Flags or a TOML config file
// (keys are the long flag names; flags win; daemon/app/flags.h), then serve
// until SIGTERM/SIGINT.
// Exit status: 0 after a clean shutdown, 2 when it cannot start.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
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

#include "daemon/app/flags.h"
#include "daemon/cluster/peers.h"
#include "daemon/core/layout.h"
#include "daemon/core/thread_annotations.h"
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
  ws::app::DaemonFlags f;
  f.layouts_dir = WS_DEFAULT_LAYOUTS_DIR;
  ws::app::AddFlags(app, f, std::string("weightsyncd ") + WS_VERSION);
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
  auto resolved = ws::app::Resolve(f);
  if (!resolved.ok()) return StartupError(resolved.status().message());
  const ws::app::StartupConfig& cfg = *resolved;
  const ws::server::AuthOptions& auth = cfg.auth;
  ws::cluster::PeerSet peers(cfg.node_name, cfg.peers,
                             std::make_unique<ws::server::GrpcPeerProber>(cfg.node_name, cfg.peer_client),
                             cfg.peer_set);

  ws::server::LogOptions lo;
  lo.format = f.log_format == "json" ? ws::server::LogFormat::kJson : ws::server::LogFormat::kText;
  lo.level = f.log_level;
  if (ws::Status st = ws::server::SetupLogging(lo); !st.ok()) return StartupError(st.message());

  auto layouts = ws::LayoutRegistry::LoadDir(f.layouts_dir, f.limits);
  if (!layouts.ok()) return StartupError("cannot load layouts from " + f.layouts_dir + ": " + layouts.status().message());
  auto archs = layouts.value()->Architectures();
  if (archs.empty()) return StartupError("no layout rules found in " + f.layouts_dir);

  ws::DataPlaneOptions dpo;
  dpo.executor.threads = f.threads;
  dpo.executor.chunk_bytes = f.chunk_bytes;
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
    if (f.require_cuda) return StartupError("--require-cuda: " + plane.cuda.message());
    spdlog::info("CUDA references are refused: {}", plane.cuda.message());
  }

  ws::server::CoordinatorOptions co;
  co.ack_timeout = std::chrono::milliseconds(static_cast<int64_t>(f.ack_timeout * 1000));
  co.progress_timeout = std::chrono::milliseconds(static_cast<int64_t>(f.progress_timeout * 1000));
  co.limits = f.limits;
  // Syncs across nodes: with peers, a UCX worker for the data and the peer
  // RPCs for the control (daemon/server/grpc_cluster_link.h).
  std::unique_ptr<ws::server::GrpcClusterLink> cluster;
  std::unique_ptr<ws::server::DeviceStaging> device_staging;
  if (peers.size() > 0) {
    ws::UcxOptions uo;
    uo.transports = f.peer_ucx_transports;
    uo.net_devices = f.peer_ucx_devices;
    auto ucx = ws::UcxTransport::Create(uo);
    if (!ucx.ok()) return StartupError("UCX worker for syncs across nodes: " + ucx.status().message());
    ws::server::ClusterLinkOptions clo;
    clo.staging_bytes = f.peer_staging_mb << 20;
    clo.transfer_timeout = std::chrono::milliseconds(static_cast<int64_t>(f.peer_transfer_timeout * 1000));
    clo.commit_timeout = co.ack_timeout + std::chrono::seconds(30);
    clo.limits = f.limits;
    // GPU to GPU between nodes (NCCL) when this build has it and the data
    // plane runs device copies (it packs and scatters the device staging).
    std::unique_ptr<ws::PeerCommFactory> nccl = plane.cuda.ok() ? ws::MakeNcclPeerCommFactory() : nullptr;
    if (nccl) {
      device_staging = ws::server::MakePlatformDeviceStaging(&ws::DefaultPlatform());
      co.device_staging = device_staging.get();
    }
    cluster = std::make_unique<ws::server::GrpcClusterLink>(&peers, cfg.peer_client, std::move(ucx).value(), clo,
                                                            std::move(nccl));
    co.cluster = cluster.get();
    spdlog::info("chunks across nodes: {}", cluster->chunk_transports());
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
  so.listen = f.listen;
  so.max_message_bytes = static_cast<int>(f.max_message_bytes);
  so.max_rpc_threads = f.max_rpc_threads;
  so.auth = auth;
  so.tls.cert_file = f.tls_cert;
  so.tls.key_file = f.tls_key;
  so.tls.client_ca_file = f.tls_client_ca;
  so.insecure_tcp = f.insecure_tcp;
  so.socket_mode = cfg.socket_mode;
  so.metrics = &metrics;
  so.peers = &peers;
  so.cluster = cluster.get();
  ws::server::Server server(&coordinator, so);
  if (ws::Status st = server.Start(); !st.ok()) return StartupError(st.message());
  ws::server::MetricsServer metrics_server(&metrics, &coordinator, &peers, cluster.get());
  if (!f.metrics_listen.empty()) {
    if (ws::Status st = metrics_server.Start(f.metrics_listen); !st.ok()) {
      server.Stop(std::chrono::milliseconds(0));
      return StartupError(st.message());
    }
    spdlog::info("metrics on {}", metrics_server.url());
  }

  auto caps = domain->caps();
  std::string addrs;
  for (const auto& a : server.addresses()) addrs += (addrs.empty() ? "" : " ") + a;
  spdlog::info("weightsyncd {} serving on {}; {} architectures from {}; {} copy threads; memory: host_shm={} cuda_ipc={}",
               WS_VERSION, addrs, archs.size(), f.layouts_dir, executor->threads(), caps.host_shm, caps.cuda_ipc);
  {
    std::string admins = "uid 0";
    for (uint32_t u : auth.admin_uids) admins += ", uid " + std::to_string(u);
    for (const auto& cn : auth.admin_cns) admins += ", cn " + cn;
    bool has_tcp = false;
    for (const auto& a : server.addresses()) has_tcp |= a.rfind("unix:", 0) != 0;
    const char* tcp = !has_tcp              ? "not served"
                      : !f.tls_cert.empty()   ? (f.tls_client_ca.empty() ? "TLS" : "TLS with client certificates")
                                            : "plaintext (--insecure-tcp)";
    spdlog::info("access: unix socket mode {:04o}; TCP {}; token {}; admins: {}; shm groups: {}", cfg.socket_mode, tcp,
                 auth.token.empty() ? "not required" : "required", admins, auth.shm_gids.size());
  }

  if (peers.size() > 0) {
    std::string names;
    for (const auto& p : peers.Snapshot()) names += (names.empty() ? "" : ", ") + p.spec.name + "=" + p.spec.address;
    spdlog::info("node {}; peers: {} (probed every {:.1f} s)", cfg.node_name, names, f.peer_probe_interval);
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
  const auto hard_limit = std::chrono::milliseconds(static_cast<int64_t>(f.shutdown_grace * 1000)) +
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
  server.Stop(std::chrono::milliseconds(static_cast<int64_t>(f.shutdown_grace * 1000)));
  spdlog::info("stopped");
  spdlog::shutdown();
  return got == 0 ? kExitFatal : 0;
}
