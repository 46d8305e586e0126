#include "daemon/cluster/peers.h"

#include <set>
#include <utility>

namespace ws::cluster {

namespace {

bool ValidNodeName(const std::string& n) {
  if (n.empty() || n.size() > 253) return false;
  for (char c : n) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
              c == '-';
    if (!ok) return false;
  }
  return true;
}

}  // namespace

Result<PeerSpec> ParsePeerSpec(const std::string& value) {
  auto eq = value.find('=');
  if (eq == std::string::npos)
    return InvalidArgument("--peer '" + value + "': expected NAME=HOST:PORT (e.g. node-b=10.0.0.2:7070)");
  PeerSpec p{value.substr(0, eq), value.substr(eq + 1)};
  if (!ValidNodeName(p.name))
    return InvalidArgument("--peer '" + value + "': node name '" + p.name + "' must be 1-253 of [A-Za-z0-9._-]");
  if (p.address.empty()) return InvalidArgument("--peer '" + value + "': empty address");
  if (p.address.rfind("unix:", 0) != 0) {
    auto colon = p.address.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == p.address.size())
      return InvalidArgument("--peer '" + value + "': address '" + p.address + "' is not HOST:PORT");
    for (size_t i = colon + 1; i < p.address.size(); ++i)
      if (p.address[i] < '0' || p.address[i] > '9')
        return InvalidArgument("--peer '" + value + "': port of '" + p.address + "' is not a number");
  }
  return p;
}

Status ValidatePeers(const std::string& self, const std::vector<PeerSpec>& peers) {
  if (!ValidNodeName(self))
    return InvalidArgument("--node-name '" + self + "' must be 1-253 of [A-Za-z0-9._-]");
  std::set<std::string> seen;
  for (const auto& p : peers) {
    if (!ValidNodeName(p.name)) return InvalidArgument("--peer " + p.name + ": invalid node name");
    if (p.name == self)
      return InvalidArgument("--peer " + p.name + "=" + p.address + ": names this node itself (--node-name " + self +
                             ")");
    if (!seen.insert(p.name).second) return InvalidArgument("--peer " + p.name + ": listed twice");
  }
  return Status::Ok();
}

const char* PeerHealthName(PeerHealth h) {
  switch (h) {
    case PeerHealth::kUp:
      return "up";
    case PeerHealth::kDown:
      return "down";
    case PeerHealth::kUnknown:
      break;
  }
  return "unknown";
}

PeerSet::PeerSet(std::string self, std::vector<PeerSpec> peers, std::unique_ptr<PeerProber> prober,
                 PeerSetOptions opts)
    : self_(std::move(self)), specs_(std::move(peers)), prober_(std::move(prober)), opts_(std::move(opts)) {
  states_.reserve(specs_.size());
  for (const auto& s : specs_) {
    PeerState st;
    st.spec = s;
    states_.push_back(std::move(st));
  }
}

PeerSet::~PeerSet() { Stop(); }

void PeerSet::Record(size_t i, const Result<HelloReply>& r, std::chrono::steady_clock::time_point start,
                     std::chrono::steady_clock::time_point end) {
  MutexLock lk(&mu_);
  PeerState& st = states_[i];
  std::string err;
  if (!r.ok()) {
    err = r.status().ToString();
  } else if (r->node_name != st.spec.name) {
    err = "answers as node '" + r->node_name + "', configured as '" + st.spec.name + "' (check its --node-name)";
  }
  if (err.empty()) {
    st.health = PeerHealth::kUp;
    st.last_error.clear();
    st.daemon_version = r->daemon_version;
    st.consecutive_failures = 0;
    st.rtt_ms = std::chrono::duration<double, std::milli>(end - start).count();
    st.last_ok = end;
  } else {
    st.health = PeerHealth::kDown;
    st.last_error = std::move(err);
    ++st.consecutive_failures;
  }
}

void PeerSet::ProbeAll() {
  for (size_t i = 0; i < specs_.size(); ++i) {
    auto start = opts_.now();
    auto r = prober_->Hello(specs_[i], opts_.timeout);
    Record(i, r, start, opts_.now());
  }
}

void PeerSet::Start() {
  if (specs_.empty() || thread_.joinable()) return;
  {
    MutexLock lk(&mu_);
    stop_ = false;
  }
  thread_ = std::thread([this] {
    for (;;) {
      ProbeAll();
      MutexLock lk(&mu_);
      lk.WaitFor(cv_, opts_.interval, [this] {
        mu_.AssertHeld();
        return stop_;
      });
      if (stop_) return;
    }
  });
}

void PeerSet::Stop() {
  {
    MutexLock lk(&mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::vector<PeerState> PeerSet::Snapshot() const {
  MutexLock lk(&mu_);
  return states_;
}

}  // namespace ws::cluster
