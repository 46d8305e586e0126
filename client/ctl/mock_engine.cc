// mock-engine: R replicas x T tensor-parallel ranks, each a child process
// that registers one buffer holding all of its parameters (engine layout,
// engine dtype) and dumps them after every commit. The buffer is a
// shared-memory object (--device host) or one cudaMalloc'ed allocation
// shared by CUDA IPC (--device cuda[:N]; dumps copy it back to the host).
//
// The parent never touches gRPC or CUDA: children are forked before any
// channel or CUDA context exists (neither is fork-safe). SIGTERM/SIGINT/SIGCHLD are blocked in every
// process and taken synchronously (sigwait), so no async-signal handlers run.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "client/cpp/client.h"
#include "client/cpp/safetensors.h"
#include "client/ctl/commands.h"
#include "client/ctl/cuda_buffers.h"

namespace ws::ctl {
namespace {

namespace fs = std::filesystem;

struct Param {
  std::string name;
  Shape shape;
  uint64_t offset = 0;
  uint64_t bytes = 0;
};

struct Rank {
  uint32_t replica = 0, rank = 0;
  std::vector<Param> params;
  uint64_t total = 0;
};

struct Setup {
  std::string daemon, model, architecture, config_text, dump;
  ClientOptions client;  // TLS and token options of the connection
  bool no_dump = false;
  DeviceSpec device;
  DType dtype = DType::kBF16;
  uint32_t tp = 1;
  int64_t syncs = 0;
  std::map<std::string, int64_t> options;
};

std::string Tag(const Rank& r) {
  return "replica " + std::to_string(r.replica) + " rank " + std::to_string(r.rank);
}

std::string DumpName(const Rank& r) {
  return "replica" + std::to_string(r.replica) + "-rank" + std::to_string(r.rank) + ".safetensors";
}

// Writes every param (engine name, shape, dtype) to DIR/replica<i>-rank<r>.safetensors,
// atomically (temp file + rename).
Status Dump(const Setup& s, const Rank& r, const uint8_t* base, const std::string& subdir) {
  const fs::path dir = fs::path(s.dump) / subdir;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return Internal("cannot create " + dir.string() + ": " + ec.message());
  const std::string final_path = (dir / DumpName(r)).string();
  const std::string tmp = final_path + ".tmp";
  std::vector<st::TensorToWrite> ts;
  for (const Param& p : r.params) ts.push_back({p.name, s.dtype, p.shape, base + p.offset});
  WS_RETURN_IF_ERROR(st::WriteSafetensors(tmp, ts));
  fs::rename(tmp, final_path, ec);
  if (ec) return Internal("cannot rename " + tmp + ": " + ec.message());
  return Status::Ok();
}

Status DumpNow(const Setup& s, const Rank& r, RankBuffer& mem, const std::string& subdir) {
  WS_ASSIGN_OR_RETURN(const uint8_t* base, mem.Snapshot());
  return Dump(s, r, base, subdir);
}

std::string Label() {
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  return std::string(host) + ":" + std::to_string(::getpid());
}

int ChildMain(const Setup& s, const Rank& r, const sigset_t& sigs) {
  const std::string tag = Tag(r);
  auto mem = RankBuffer::Create(s.device, r.total, "engine-r" + std::to_string(r.replica) + "-t" + std::to_string(r.rank),
                                "parameters of " + tag);
  Status filled = mem.ok() ? mem->Fill(0x5A) : mem.status();  // garbage: zero-fill and untouched bytes stay visible
  if (!filled.ok()) {
    Err(tag + ": " + filled.ToString());
    return 1;
  }
  if (Status st = s.no_dump ? Status::Ok() : DumpNow(s, r, *mem, "initial"); !st.ok()) {
    Err(tag + ": " + st.ToString());
    return 1;
  }

  // Signals: a detached thread takes SIGTERM/SIGINT and cancels the event
  // stream. What it touches lives on the heap, shared with it: a signal may
  // arrive after this function returned, while the process exits (a stack
  // local would then be out of scope; ASan caught that write).
  struct SignalState {
    std::mutex mu;
    EngineSession* live = nullptr;  // guarded by mu; null once the session is gone
    std::atomic<bool> stop{false};
  };
  auto sig_state = std::make_shared<SignalState>();
  std::thread([sigs, st = sig_state] {
    for (;;) {
      int sig = 0;
      if (sigwait(&sigs, &sig) != 0) continue;
      if (sig != SIGTERM && sig != SIGINT) continue;
      st->stop = true;
      std::lock_guard<std::mutex> l(st->mu);
      if (st->live != nullptr) st->live->Cancel();
    }
  }).detach();
  std::mutex& mu = sig_state->mu;
  EngineSession*& live = sig_state->live;
  std::atomic<bool>& stop = sig_state->stop;

  ClientOptions copts = s.client;
  copts.rpc_timeout_s = 30;  // AckVersion / GetStatus / UnregisterEngine; the event stream has none
  WeightSyncClient client(s.daemon, copts);
  pb::RegisterEngineRequest req;
  req.set_model(s.model);
  req.set_architecture(s.architecture);
  req.set_hf_config_json(s.config_text);
  req.set_replica_id(r.replica);
  req.set_tp_rank(r.rank);
  req.set_tp_size(s.tp);
  req.set_dtype(ToProto(s.dtype));
  req.set_engine_label(Label());
  req.set_acks_pause(true);  // nothing runs on its weights: paused as soon as it hears `started`
  for (const auto& [k, v] : s.options) (*req.mutable_options())[k] = v;
  for (const Param& p : r.params) {
    pb::EngineParam* ep = req.add_params();
    ep->set_name(p.name);
    for (int64_t d : p.shape) ep->add_shape(d);
    ep->set_dtype(ToProto(s.dtype));
    mem->Ref(p.offset, p.bytes, ep->mutable_memory());
  }
  auto session = client.RegisterEngine(req);
  if (!session.ok()) {
    Err(tag + ": registration refused by " + client.target() + ": " + session.status().ToString());
    return 1;
  }
  const std::string engine_id = (*session)->engine_id();
  {
    std::lock_guard<std::mutex> l(mu);
    live = session->get();
    if (stop) live->Cancel();
  }
  uint64_t bytes = 0;
  for (const Param& p : r.params) bytes += p.bytes;
  Out(tag + " registered (" + std::to_string(r.params.size()) + " params, " + HumanBytes(bytes) + ")");

  int64_t commits = 0;
  int code = 0;
  for (;;) {
    auto ev = (*session)->Next();
    if (!ev.ok()) {
      if (!stop) {
        Err(tag + ": event stream ended: " + ev.status().ToString());
        code = 1;
      }
      break;
    }
    if (ev->has_started()) {
      Out(tag + ": sync " + std::to_string(ev->started().sync_id()) + " version " +
          std::to_string(ev->started().version()) + " started");
      Status paused = client.AckPaused(engine_id, ev->started().sync_id());
      if (!paused.ok()) Err(tag + ": AckPaused: " + paused.ToString());
    } else if (ev->has_committed()) {
      const uint64_t v = ev->committed().version();
      Status st = s.no_dump ? Status::Ok() : DumpNow(s, r, *mem, "v" + std::to_string(v));
      if (!st.ok()) Err(tag + ": " + st.ToString());
      Status ack = client.AckVersion(engine_id, v, st.ok(), st.ok() ? "" : st.ToString());
      if (!ack.ok()) Err(tag + ": AckVersion " + std::to_string(v) + ": " + ack.ToString());
      Out(tag + ": committed version " + std::to_string(v));
      if (s.syncs > 0 && ++commits >= s.syncs) break;  // leaving after the ack keeps the commit
    } else if (ev->has_aborted()) {
      const uint64_t v = ev->aborted().version();
      Status st = DumpNow(s, r, *mem, "aborted-v" + std::to_string(v));
      if (!st.ok()) Err(tag + ": " + st.ToString());
      Out("aborted version " + std::to_string(v) + ": " + ev->aborted().reason());
    }
  }
  {
    std::lock_guard<std::mutex> l(mu);
    live = nullptr;
  }
  session->reset();  // cancels the stream if still open
  Status un = client.UnregisterEngine(engine_id);
  if (!un.ok() && un.code() != Code::kNotFound && un.code() != Code::kUnavailable)
    Err(tag + ": UnregisterEngine: " + un.ToString());
  return code;
}

Result<std::map<std::string, int64_t>> ParseOptions(const std::vector<std::string>& kvs) {
  std::map<std::string, int64_t> out;
  for (const std::string& kv : kvs) {
    size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) return InvalidArgument("--option \"" + kv + "\" is not key=value");
    std::string k = kv.substr(0, eq), v = kv.substr(eq + 1);
    if (v == "true") {
      out[k] = 1;
    } else if (v == "false") {
      out[k] = 0;
    } else {
      try {
        size_t used = 0;
        int64_t n = std::stoll(v, &used);
        if (used != v.size()) throw std::invalid_argument(v);
        out[k] = n;
      } catch (const std::exception&) {
        return InvalidArgument("--option " + k + ": \"" + v + "\" is not an integer");
      }
    }
  }
  return out;
}

}  // namespace

int RunMockEngine(const GlobalOptions& g, const MockEngineOptions& o) {
  auto fail = [](const std::string& m) {
    Err("weightsyncctl mock-engine: " + m);
    return 1;
  };
  Setup s;
  s.daemon = g.daemon;
  s.client = g.client;
  s.model = o.model;
  s.dump = o.dump;
  s.no_dump = o.no_dump;
  auto dev = ParseDevice(o.device);
  if (!dev.ok()) return fail(dev.status().message());
  s.device = *dev;
  s.tp = o.tp;
  s.syncs = o.syncs;
  auto dt = ParseDType(o.dtype);
  if (!dt) return fail("--dtype \"" + o.dtype + "\": expected bf16, fp16 or fp32");
  s.dtype = *dt;
  auto opts = ParseOptions(o.options);
  if (!opts.ok()) return fail(opts.status().message());
  s.options = *opts;

  const std::string cfg_path = (fs::path(o.checkpoint) / "config.json").string();
  {
    std::ifstream in(cfg_path);
    if (!in) return fail("cannot read " + cfg_path);
    std::ostringstream ss;
    ss << in.rdbuf();
    s.config_text = ss.str();
  }
  try {
    auto j = nlohmann::json::parse(s.config_text);
    if (!j.contains("architectures") || !j["architectures"].is_array() || j["architectures"].empty() ||
        !j["architectures"][0].is_string())
      return fail(cfg_path + ": missing \"architectures\"");
    s.architecture = j["architectures"][0].get<std::string>();
  } catch (const std::exception& e) {
    return fail(cfg_path + ": not valid JSON: " + e.what());
  }

  auto reg = LoadRegistry(o.layouts_dir);
  if (!reg.ok()) return fail(reg.status().ToString());
  const uint64_t esize = DTypeSize(s.dtype);
  std::vector<Rank> ranks;
  for (uint32_t t = 0; t < o.tp; ++t) {
    ResolveOptions ro;
    ro.tp_size = o.tp;
    ro.tp_rank = t;
    ro.engine_options = s.options;
    auto layout = (*reg)->Resolve(s.architecture, s.config_text, ro);
    if (!layout.ok()) return fail("rank " + std::to_string(t) + ": " + layout.status().ToString());
    Rank r;
    r.rank = t;
    auto add = [&](const std::string& name, const Shape& shape) {
      r.total = (r.total + 63) / 64 * 64;
      Param p{name, shape, r.total, static_cast<uint64_t>(NumElements(shape)) * esize};
      r.total += p.bytes;
      r.params.push_back(std::move(p));
    };
    for (const ExpectedParam& p : layout->params) add(p.name, p.shape);
    if (!o.extra_param.empty()) add(o.extra_param, Shape{8});
    for (uint32_t i = 0; i < o.replicas; ++i) {
      r.replica = i;
      ranks.push_back(r);
    }
  }
  std::error_code ec;
  fs::create_directories(o.no_dump ? fs::path(o.dump) : fs::path(o.dump) / "initial", ec);
  if (ec) return fail("cannot create " + o.dump + ": " + ec.message());

  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  sigset_t parent_sigs = sigs;
  sigaddset(&parent_sigs, SIGCHLD);
  sigprocmask(SIG_BLOCK, &parent_sigs, nullptr);

  const pid_t parent = ::getpid();
  std::map<pid_t, const Rank*> children;
  for (const Rank& r : ranks) {
    pid_t pid = ::fork();
    if (pid < 0) {
      Err("weightsyncctl mock-engine: fork: " + std::string(std::strerror(errno)));
      for (auto& [c, _] : children) ::kill(c, SIGTERM);
      break;
    }
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != parent) ::_exit(1);
      int code = ChildMain(s, r, sigs);
      ::_exit(code);
    }
    children[pid] = &r;
  }

  // Parent: forward signals, reap children, stop the rest when one fails.
  bool all_ok = children.size() == ranks.size();
  bool stopping = !all_ok;
  while (!children.empty()) {
    int sig = 0;
    if (sigwait(&parent_sigs, &sig) != 0) continue;
    if (sig == SIGTERM || sig == SIGINT) {
      stopping = true;
      for (auto& [c, _] : children) ::kill(c, sig);
      continue;
    }
    for (;;) {
      int wstatus = 0;
      pid_t pid = ::waitpid(-1, &wstatus, WNOHANG);
      if (pid <= 0) break;
      auto it = children.find(pid);
      if (it == children.end()) continue;
      const bool ok = WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0;
      if (!ok) {
        all_ok = false;
        Err("weightsyncctl mock-engine: " + Tag(*it->second) +
            (WIFEXITED(wstatus) ? " exited with status " + std::to_string(WEXITSTATUS(wstatus))
                                : " killed by signal " + std::to_string(WTERMSIG(wstatus))));
      }
      children.erase(it);
      if (!ok && !stopping) {
        stopping = true;
        for (auto& [c, _] : children) ::kill(c, SIGTERM);
      }
    }
  }
  return all_ok ? 0 : 1;
}

}  // namespace ws::ctl
