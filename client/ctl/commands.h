// weightsyncctl subcommands. Each Run* returns the process exit code.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "client/cpp/client.h"
#include "daemon/core/layout.h"
#include "daemon/core/status.h"

namespace ws::ctl {

struct GlobalOptions {
  std::string daemon = "unix:/tmp/weightsync.sock";
  ClientOptions client;  // TLS files and token (file) for every connection
};

struct StatusOptions {
  bool json = false;
};

struct HealthOptions {
  std::string service;
  double timeout_s = 5;
};

struct GenCheckpointOptions {
  std::string arch;
  std::string out;
  std::string layouts_dir;
  // Overrides of the example config; -1 = keep.
  int64_t hidden_size = -1, layers = -1, heads = -1, kv_heads = -1, intermediate_size = -1,
          vocab_size = -1, experts = -1, tie = -1;
  uint64_t seed = 0;
  double shard_mb = 0;  // 0 = one file
};

struct MockEngineOptions {
  std::string model;
  std::string checkpoint;
  uint32_t tp = 1;
  uint32_t replicas = 1;
  std::string dtype = "bf16";
  std::string dump;
  int64_t syncs = 0;  // 0 = until SIGTERM/SIGINT
  std::string layouts_dir;
  std::vector<std::string> options;  // key=value
  std::string extra_param;
  bool no_dump = false;  // benchmarks: no initial or v<V> dumps (aborted versions are still dumped)
  std::string device = "host";  // host | cuda | cuda:N: where each rank's parameter buffer lives
};

struct PushOptions {
  std::string checkpoint;
  std::string model;
  uint32_t world_size = 1;
  uint64_t version = 1;
  uint32_t repeat = 1;
  uint32_t shard_dim = 0;
  bool json = false;
  std::string inject;
  int64_t crash_after_layers = -1;
  std::string device = "host";  // host | cuda | cuda:N: where each rank's shard buffer lives
  bool processes = false;       // a process per rank (always with cuda)
  // "RANK=ADDR": rank RANK talks to the daemon at ADDR instead of --daemon
  // (trainer ranks on several nodes; rank 0's daemon leads the sync).
  std::vector<std::string> rank_daemons;
};

int RunHealth(const GlobalOptions& g, const HealthOptions& o);
int RunStatus(const GlobalOptions& g, const StatusOptions& o);
int RunGenCheckpoint(const GenCheckpointOptions& o);
int RunMockEngine(const GlobalOptions& g, const MockEngineOptions& o);
int RunPush(const GlobalOptions& g, const PushOptions& o);

// --layouts-dir, else $WEIGHTSYNC_LAYOUTS_DIR, else the built-in default.
std::string LayoutsDir(const std::string& flag);
Result<std::shared_ptr<const LayoutRegistry>> LoadRegistry(const std::string& flag);

// Writes one whole line to stdout / stderr with a single write(2), so lines of
// concurrent processes and threads do not interleave.
void Out(const std::string& line);
void Err(const std::string& line);

std::string HumanBytes(uint64_t bytes);  // "1.2 MB"

}  // namespace ws::ctl
