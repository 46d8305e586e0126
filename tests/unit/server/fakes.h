// Test doubles for the server tests: an in-process memory domain over named
// std::vector buffers, an event sink that records, an executor wrapper that
// can hold a copy mid-flight, and a tiny rule file with TP slicing, fusion
// and vocab padding.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "daemon/dataplane/executor.h"
#include "daemon/kernels/copy_math.h"
#include "daemon/mem/memory.h"
#include "daemon/server/coordinator.h"

namespace ws::server::testing {

// The in-process caller (admin, the test's own uid) for coordinator calls.
inline const Peer& Self() {
  static const Peer p = Peer::InProcess();
  return p;
}

inline bool Has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }
#define EXPECT_ERR(st, needle) \
  EXPECT_TRUE(::ws::server::testing::Has((st).message(), (needle))) << "expected \"" << (needle) << "\" in: " << (st).ToString()

// Buffers keyed by name; Map() checks offset+length like the real domains.
class FakeDomain final : public MemoryDomain {
 public:
  struct Buffer {
    std::vector<uint8_t> bytes;
    bool writable = true;
  };

  std::shared_ptr<Buffer> Add(const std::string& name, size_t size, bool writable = true) {
    std::lock_guard lk(mu_);
    auto b = std::make_shared<Buffer>();
    b->bytes.assign(size, 0);
    b->writable = writable;
    buffers_[name] = b;
    return b;
  }
  std::shared_ptr<Buffer> Get(const std::string& name) {
    std::lock_guard lk(mu_);
    return buffers_.at(name);
  }
  int map_calls() const {
    std::lock_guard lk(mu_);
    return map_calls_;
  }
  int trims() const {
    std::lock_guard lk(mu_);
    return trims_;
  }
  int cuda_trims() const {
    std::lock_guard lk(mu_);
    return cuda_trims_;
  }

  DomainCaps caps() const override { return DomainCaps{true, false}; }

  using MemoryDomain::Map;
  Result<std::shared_ptr<Mapping>> Map(const MemoryRef& ref, const std::string& what, const Accessor&) override {
    std::lock_guard lk(mu_);
    ++map_calls_;
    if (ref.kind != MemoryKind::kHostShm) return FailedPrecondition(what + ": fake domain has host memory only");
    auto it = buffers_.find(ref.name);
    if (it == buffers_.end()) return NotFound(what + ": no shared memory object " + ref.name);
    if (ref.offset + ref.length > it->second->bytes.size())
      return OutOfRange(what + ": " + ref.ToString() + " is outside " + ref.name);
    return std::shared_ptr<Mapping>(std::make_shared<FakeMapping>(it->second, ref.offset, ref.length));
  }
  void Trim() override {
    std::lock_guard lk(mu_);
    ++trims_;
  }
  void TrimCuda() override {
    std::lock_guard lk(mu_);
    ++cuda_trims_;
  }

 private:
  class FakeMapping final : public Mapping {
   public:
    FakeMapping(std::shared_ptr<Buffer> b, uint64_t off, uint64_t len) : b_(std::move(b)), off_(off), len_(len) {}
    void* data() const override { return b_->bytes.data() + off_; }
    uint64_t size() const override { return len_; }
    MemoryKind kind() const override { return MemoryKind::kHostShm; }
    int device() const override { return -1; }
    bool writable() const override { return b_->writable; }
    MemoryExtent extent() const override {
      return MemoryExtent{MemoryKind::kHostShm, reinterpret_cast<uint64_t>(b_.get()), 0, off_, off_ + len_};
    }

   private:
    std::shared_ptr<Buffer> b_;
    uint64_t off_, len_;
  };

  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Buffer>> buffers_;
  int map_calls_ = 0;
  int trims_ = 0;
  int cuda_trims_ = 0;
};

// Records events; lets a test wait for one.
class RecordingSink final : public EventSink {
 public:
  void Deliver(const EngineEvent& ev) override {
    std::lock_guard lk(mu_);
    events_.push_back(ev);
    cv_.notify_all();
  }
  std::vector<EngineEvent> events() const {
    std::lock_guard lk(mu_);
    return events_;
  }
  // Kinds as a compact string: S=Started C=Committed A=Aborted.
  std::string kinds() const {
    std::lock_guard lk(mu_);
    std::string s;
    for (const auto& e : events_)
      s += e.kind == EngineEvent::Kind::kStarted ? 'S' : e.kind == EngineEvent::Kind::kCommitted ? 'C' : 'A';
    return s;
  }
  // Waits for an event of `kind` (of sync `sync_id`, unless 0).
  bool WaitFor(EngineEvent::Kind kind, uint64_t sync_id = 0,
               std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, timeout, [&] {
      for (const auto& e : events_)
        if (e.kind == kind && (sync_id == 0 || e.sync_id == sync_id)) return true;
      return false;
    });
  }
  std::string last_reason() const {
    std::lock_guard lk(mu_);
    return events_.empty() ? "" : events_.back().reason;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<EngineEvent> events_;
};

// Runs ops with the plain reference loop, optionally blocking inside Run()
// until released (to abort a sync while its copy is running) or failing.
class TestExecutor final : public Executor {
 public:
  Result<uint64_t> RunValidated(const std::vector<kernels::CopyOp>& ops, const OpNamer&) override {
    {
      std::unique_lock lk(mu_);
      ++runs_;
      in_run_ = true;
      cv_.notify_all();
      cv_.wait(lk, [&] { return !hold_; });
      in_run_ = false;
      if (!fail_.ok()) return fail_;
    }
    uint64_t bytes = 0;
    for (const auto& op : ops) {
      for (int64_t k = 0; k < op.rows * op.cols; ++k) kernels::RunElement(op, k);
      bytes += static_cast<uint64_t>(op.rows * op.cols) * (op.dst_dtype == kernels::kF32 ? 4 : 2);
    }
    return bytes;
  }
  int threads() const override { return 1; }

  void Hold() {
    std::lock_guard lk(mu_);
    hold_ = true;
  }
  void Release() {
    std::lock_guard lk(mu_);
    hold_ = false;
    cv_.notify_all();
  }
  bool WaitInRun() {
    std::unique_lock lk(mu_);
    return cv_.wait_for(lk, std::chrono::seconds(10), [&] { return in_run_; });
  }
  void FailWith(Status st) {
    std::lock_guard lk(mu_);
    fail_ = std::move(st);
  }
  int runs() const {
    std::lock_guard lk(mu_);
    return runs_;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool hold_ = false;
  bool in_run_ = false;
  int runs_ = 0;
  Status fail_;
};

// A toy architecture: fused q/k rows split by TP, a 1-D norm copied whole,
// and an embedding whose vocab is padded to a multiple of 4 and split by TP
// (padding rows are zero-filled).
inline const char* kToyRules = R"J({
  "name": "toy",
  "architectures": ["ToyForCausalLM"],
  "example_config": {"hidden_size": 4, "vocab_size": 6, "num_layers": 2},
  "vars": {"H": "hidden_size", "V": "vocab_size", "NL": "num_layers", "per": "divide(pad(V, 4), T)"},
  "skip": [{"pattern": "*.inv_freq"}],
  "sources": [
    {"name": "embed.weight", "shape": ["V", "H"]},
    {"name": "layers.{L}.q.weight", "for": {"L": "NL"}, "shape": ["H", "H"]},
    {"name": "layers.{L}.k.weight", "for": {"L": "NL"}, "shape": ["H", "H"]},
    {"name": "layers.{L}.norm.weight", "for": {"L": "NL"}, "shape": ["H"]}
  ],
  "params": [
    {"name": "embed.weight", "parts": [{"src": "embed.weight",
      "rows": {"begin": "min(r * per, V)", "end": "min((r + 1) * per, V)"}, "pad_rows": "per"}]},
    {"name": "layers.{L}.qk.weight", "for": {"L": "NL"}, "parts": [
      {"src": "layers.{L}.q.weight", "rows": {"split": "T", "index": "r"}},
      {"src": "layers.{L}.k.weight", "rows": {"split": "T", "index": "r"}}]},
    {"name": "layers.{L}.norm.weight", "for": {"L": "NL"}, "parts": [{"src": "layers.{L}.norm.weight"}]}
  ]
})J";

inline const char* kToyConfig = R"({"architectures": ["ToyForCausalLM"], "hidden_size": 4, "vocab_size": 6, "num_layers": 2})";

}  // namespace ws::server::testing
