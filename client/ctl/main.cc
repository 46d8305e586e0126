// weightsyncctl: operate a weightsync daemon and stand in for trainers and
// engines in tests and benchmarks.
#include <cstdlib>

#include <CLI/CLI.hpp>

#include "client/ctl/commands.h"

#ifndef WS_VERSION
#define WS_VERSION "dev"
#endif

int main(int argc, char** argv) {
  using namespace ws::ctl;
  CLI::App app{"weightsyncctl " WS_VERSION ": control and test client for weightsyncd"};
  app.set_version_flag("--version", WS_VERSION);
  app.require_subcommand(1);
  app.fallthrough();
  GlobalOptions g;
  app.add_option("--daemon", g.daemon, "daemon address: unix:/path or host:port")
      ->envname("WEIGHTSYNC_DAEMON")
      ->capture_default_str();
  app.add_option("--tls-ca", g.client.tls_ca_file,
                 "PEM CA certificates that signed the daemon's TLS certificate (host:port daemons)")
      ->envname("WEIGHTSYNC_TLS_CA");
  app.add_option("--tls-cert", g.client.tls_cert_file, "PEM client certificate, for daemons that require one")
      ->envname("WEIGHTSYNC_TLS_CERT");
  app.add_option("--tls-key", g.client.tls_key_file, "PEM private key of --tls-cert")->envname("WEIGHTSYNC_TLS_KEY");
  app.add_option("--token-file", g.client.token_file,
                 "file with the daemon's token, sent as \"authorization: Bearer <token>\" (or the token itself in "
                 "$WEIGHTSYNC_TOKEN)")
      ->envname("WEIGHTSYNC_TOKEN_FILE");

  HealthOptions ho;
  auto* health = app.add_subcommand("health", "print SERVING / NOT_SERVING; exit 0 only when serving");
  health->add_option("--service", ho.service, "health service name (default: the whole server)");
  health->add_option("--timeout", ho.timeout_s, "seconds")->capture_default_str();

  StatusOptions so;
  auto* status = app.add_subcommand("status", "show engines, models and syncs");
  status->add_flag("--json", so.json, "print the StatusResponse as JSON");

  GenCheckpointOptions go;
  auto* gen = app.add_subcommand("gen-checkpoint", "write a random fp32 checkpoint for an architecture");
  gen->add_option("--arch", go.arch, "HF architecture, e.g. LlamaForCausalLM")->required();
  gen->add_option("--out", go.out, "output directory")->required();
  gen->add_option("--layouts-dir", go.layouts_dir, "layout rule directory");
  gen->add_option("--hidden-size", go.hidden_size);
  gen->add_option("--layers", go.layers);
  gen->add_option("--heads", go.heads);
  gen->add_option("--kv-heads", go.kv_heads);
  gen->add_option("--intermediate-size", go.intermediate_size);
  gen->add_option("--vocab-size", go.vocab_size);
  gen->add_option("--experts", go.experts);
  gen->add_option("--tie", go.tie, "tie_word_embeddings")->check(CLI::Range(0, 1));
  gen->add_option("--seed", go.seed)->capture_default_str();
  gen->add_option("--shard-mb", go.shard_mb, "split into files of at most this many MB (plus an index)")
      ->check(CLI::PositiveNumber);

  MockEngineOptions mo;
  auto* mock = app.add_subcommand("mock-engine", "register fake engine ranks and dump what they receive");
  mock->add_option("--model", mo.model)->required();
  mock->add_option("--checkpoint", mo.checkpoint, "checkpoint directory (its config.json is used)")->required();
  mock->add_option("--tp", mo.tp, "tensor-parallel size")->required()->check(CLI::Range(1, 1024));
  mock->add_option("--replicas", mo.replicas)->capture_default_str()->check(CLI::Range(1, 1024));
  mock->add_option("--dtype", mo.dtype, "bf16 | fp16 | fp32")->capture_default_str();
  mock->add_option("--dump", mo.dump, "output directory for parameter dumps")->required();
  mock->add_option("--syncs", mo.syncs, "exit after this many commits (default: run until SIGTERM)")
      ->check(CLI::NonNegativeNumber);
  mock->add_option("--layouts-dir", mo.layouts_dir, "layout rule directory");
  mock->add_option("--option", mo.options, "engine option key=value (repeatable)");
  mock->add_option("--extra-param", mo.extra_param, "register one more 8-element param that no rule fills");
  mock->add_flag("--no-dump", mo.no_dump, "do not dump the initial state or committed versions (for benchmarks)");
  mock->add_option("--device", mo.device,
                   "host (shared memory) or cuda[:N]: each rank's params in one cudaMalloc'ed buffer, shared by CUDA IPC")
      ->capture_default_str();

  PushOptions po;
  auto* push = app.add_subcommand("push", "push a checkpoint as W FSDP ranks would");
  push->add_option("--checkpoint", po.checkpoint)->required();
  push->add_option("--model", po.model)->required();
  push->add_option("--world-size", po.world_size)->required()->check(CLI::Range(1, 4096));
  push->add_option("--version", po.version)->capture_default_str();
  push->add_option("--repeat", po.repeat, "consecutive syncs (versions V..V+N-1)")->check(CLI::Range(1, 1000000));
  push->add_option("--shard-dim", po.shard_dim, "split 2-D tensors along this dim")->check(CLI::Range(0, 1));
  push->add_flag("--json", po.json, "print per-sync stats as JSON lines");
  push->add_option("--rank-daemon", po.rank_daemons,
                   "RANK=ADDR: trainer rank RANK pushes to the daemon at ADDR (its node's) instead of --daemon; "
                   "repeatable. Rank 0's daemon leads the sync; each daemon's node name comes from its status");
  push->add_option("--inject", po.inject, "corrupt the manifest/data for validation tests")
      ->check(CLI::IsMember({"unknown-tensor", "wrong-shape", "wrong-dtype", "overlap", "gap", "drop-tensor",
                             "oob-memref"}));
  push->add_option("--crash-after-layers", po.crash_after_layers,
                   "_exit(17) after rank 0 received this many layer acks")
      ->check(CLI::NonNegativeNumber);
  push->add_option("--device", po.device,
                   "host (shared memory, a thread per rank) or cuda[:N] (a process per rank, shards in one "
                   "cudaMalloc'ed buffer per rank, shared by CUDA IPC)")
      ->capture_default_str();
  push->add_flag("--processes", po.processes, "run each rank as its own process (implied by --device cuda)")
      ->envname("WEIGHTSYNC_PUSH_PROCESSES");

  CLI11_PARSE(app, argc, argv);
  // The token itself may come from the environment (never from the command line, where ps shows it).
  if (const char* t = std::getenv("WEIGHTSYNC_TOKEN"); t != nullptr && *t != '\0' && g.client.token_file.empty())
    g.client.token = t;

  if (health->parsed()) return RunHealth(g, ho);
  if (status->parsed()) return RunStatus(g, so);
  if (gen->parsed()) return RunGenCheckpoint(go);
  if (mock->parsed()) return RunMockEngine(g, mo);
  if (push->parsed()) return RunPush(g, po);
  return 2;
}
