// The peer daemons of a deployment (one daemon per node): who they are
// (--peer NAME=HOST:PORT, or `peer = [...]` in the config file), and whether
// each answers. A background thread probes every peer each interval with a
// PeerProber (gRPC PeerHello in the daemon; a fake in tests); a peer is "up"
// when its last probe succeeded and it answered with the node name it is
// configured under, "down" otherwise, "unknown" before its first probe.
//
// Pure C++ (no gRPC): the prober is the seam. Time comes from an injectable
// clock so tests need no sleeps.
//
// Thread-safety: every public method may be called from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "daemon/core/status.h"
#include "daemon/core/thread_annotations.h"

namespace ws::cluster {

struct PeerSpec {
  std::string name;     // the peer's node name
  std::string address;  // HOST:PORT (or unix:/path, for tests on one host)
};

// "NAME=HOST:PORT" -> PeerSpec; errors name the value.
Result<PeerSpec> ParsePeerSpec(const std::string& value);

// Checks a deployment's peer list from this node's point of view: node names
// are non-empty, made of [A-Za-z0-9._-], unique, and not `self`.
Status ValidatePeers(const std::string& self, const std::vector<PeerSpec>& peers);

// What a peer says about itself.
struct HelloReply {
  std::string node_name;
  std::string daemon_version;
};

class PeerProber {
 public:
  virtual ~PeerProber() = default;
  // One round trip to `peer`, failing after `timeout`.
  virtual Result<HelloReply> Hello(const PeerSpec& peer, std::chrono::milliseconds timeout) = 0;
};

enum class PeerHealth { kUnknown, kUp, kDown };
const char* PeerHealthName(PeerHealth h);  // "unknown", "up", "down"

struct PeerState {
  PeerSpec spec;
  PeerHealth health = PeerHealth::kUnknown;
  std::string last_error;  // why the last probe failed ("" when up)
  std::string daemon_version;
  uint64_t consecutive_failures = 0;
  double rtt_ms = 0;
  std::optional<std::chrono::steady_clock::time_point> last_ok;
};

struct PeerSetOptions {
  std::chrono::milliseconds interval{2000};  // between probe passes
  std::chrono::milliseconds timeout{1500};   // of one probe
  std::function<std::chrono::steady_clock::time_point()> now = [] { return std::chrono::steady_clock::now(); };
};

class PeerSet {
 public:
  // `peers` must have passed ValidatePeers(self, peers).
  PeerSet(std::string self, std::vector<PeerSpec> peers, std::unique_ptr<PeerProber> prober,
          PeerSetOptions opts = {});
  ~PeerSet();  // Stop()s
  PeerSet(const PeerSet&) = delete;
  PeerSet& operator=(const PeerSet&) = delete;

  const std::string& self() const { return self_; }
  size_t size() const { return specs_.size(); }

  // One probe of every peer, in the calling thread (what the background
  // thread runs each interval).
  void ProbeAll();
  // Starts / stops the background thread (no-op without peers).
  void Start();
  void Stop();

  std::vector<PeerState> Snapshot() const;

 private:
  void Record(size_t i, const Result<HelloReply>& r, std::chrono::steady_clock::time_point start,
              std::chrono::steady_clock::time_point end);

  const std::string self_;
  const std::vector<PeerSpec> specs_;
  const std::unique_ptr<PeerProber> prober_;
  const PeerSetOptions opts_;

  mutable Mutex mu_;
  std::vector<PeerState> states_ WS_GUARDED_BY(mu_);
  bool stop_ WS_GUARDED_BY(mu_) = false;
  std::condition_variable cv_;
  std::thread thread_;
};

}  // namespace ws::cluster
