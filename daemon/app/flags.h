// weightsyncd's command line and config file: every flag with its default,
// and the checks and conversions CLI11 cannot do, into the settings the
// daemon starts with. Errors name the flag (or the config file's key).
//
// Thread-safety: plain data and pure functions (Resolve reads the token file
// and the group database).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "client/cpp/client.h"
#include "daemon/cluster/peers.h"
#include "daemon/core/limits.h"
#include "daemon/core/status.h"
#include "daemon/server/auth.h"

namespace ws::app {

// What the flags (or the TOML config file, keyed by the long flag names) say.
struct DaemonFlags {
  std::vector<std::string> listen{"unix:/tmp/weightsync.sock"};
  std::string metrics_listen;
  std::string layouts_dir;
  std::string log_format = "text";
  std::string log_level = "info";
  int threads = 0;
  bool require_cuda = false;
  uint64_t chunk_bytes = 4u << 20;
  double ack_timeout = 60;
  double progress_timeout = 30;
  uint64_t max_message_bytes = 512u << 20;
  int max_rpc_threads = 1024;
  Limits limits;
  double shutdown_grace = 2;
  std::string socket_mode = "0660";
  std::string tls_cert, tls_key, tls_client_ca, token_file;
  bool insecure_tcp = false;
  std::vector<uint32_t> admin_uids;
  std::vector<std::string> admin_cns, shm_groups;
  // Peers (syncs across nodes).
  std::string node_name;
  std::vector<std::string> peers;
  std::string peer_tls_ca, peer_tls_cert, peer_tls_key, peer_token_file;
  double peer_probe_interval = 2;
  uint64_t peer_staging_mb = 64;
  std::string peer_ucx_transports = "tcp", peer_ucx_devices;
  double peer_transfer_timeout = 30;
};

// Registers every flag of weightsyncd (and --config, --version) on `app`,
// bound to `flags`, whose current values are the defaults shown by --help.
void AddFlags(CLI::App& app, DaemonFlags& flags, const std::string& version);

// The flags checked and converted: what the daemon is started with.
struct StartupConfig {
  uint32_t socket_mode = 0660;
  server::AuthOptions auth;            // token read from --token-file, --shm-group names resolved
  std::string node_name;               // --node-name, or the host name
  std::vector<cluster::PeerSpec> peers;
  ClientOptions peer_client;           // how this daemon calls its peers
  cluster::PeerSetOptions peer_set;    // probe interval and timeout
};

// InvalidArgument naming the flag for a value CLI11 accepted but the daemon
// cannot use; the token file's own errors (missing, readable by others).
Result<StartupConfig> Resolve(const DaemonFlags& flags);

// A --shm-group value: a decimal gid, or a group name from the group database.
Result<uint32_t> ResolveGroup(const std::string& group);

}  // namespace ws::app
