// Helpers for the server tests: an event sink that records and a tiny rule
// file with TP slicing, fusion and vocab padding. Memory and copies are the
// real host shm domain and host executor, wrapped for fault injection
// (tests/unit/testing/fault_injection.h).
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

#include "daemon/server/coordinator.h"
#include "tests/unit/testing/fault_injection.h"

namespace ws::server::testing {

// The in-process caller (admin, the test's own uid) for coordinator calls.
inline const Peer& Self() {
  static const Peer p = Peer::InProcess();
  return p;
}

inline bool Has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }
#define EXPECT_ERR(st, needle) \
  EXPECT_TRUE(::ws::server::testing::Has((st).message(), (needle))) << "expected \"" << (needle) << "\" in: " << (st).ToString()

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
