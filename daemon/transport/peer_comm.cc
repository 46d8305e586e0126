#include "daemon/transport/peer_comm.h"

#include <utility>

namespace ws {

std::string CommKey::ToString() const {
  return "node " + peer + " (" + (local_device.empty() ? "?" : local_device) + " here, " +
         (remote_device.empty() ? "?" : remote_device) + " there)";
}

struct PeerCommCache::Entry {
  Entry(CommKey k, uint64_t g, int r, std::string id)
      : key(std::move(k)), generation(g), rank(r), unique_id(std::move(id)) {}
  const CommKey key;
  const uint64_t generation;
  const int rank;               // 0: sends chunks, 1: receives them
  const std::string unique_id;  // joined with it on first use
  Mutex mu;                     // one join or exchange at a time (communicators are not thread-safe)
  std::unique_ptr<PeerComm> comm WS_GUARDED_BY(mu);
  Status failed WS_GUARDED_BY(mu);  // why it was dropped; Ok while usable
};

PeerCommCache::PeerCommCache(PeerCommFactory* factory, std::chrono::milliseconds timeout)
    : factory_(factory), timeout_(timeout) {}

PeerCommCache::~PeerCommCache() = default;

const char* PeerCommCache::name() const { return factory_->name(); }

Result<PeerCommCache::Lease> PeerCommCache::ForSend(const CommKey& key) {
  {
    MutexLock lk(&mu_);
    if (auto it = entries_.find({key, 0}); it != entries_.end()) return Lease{it->second, "", it->second->generation};
  }
  // A new communicator: made outside the lock (ncclGetUniqueId may take a while).
  WS_ASSIGN_OR_RETURN(std::string id, factory_->NewUniqueId());
  MutexLock lk(&mu_);
  if (auto it = entries_.find({key, 0}); it != entries_.end())  // another window made one meanwhile
    return Lease{it->second, "", it->second->generation};
  auto e = std::make_shared<Entry>(key, next_generation_++, 0, id);
  entries_[{key, 0}] = e;
  return Lease{e, id, e->generation};
}

Result<PeerCommCache::Lease> PeerCommCache::ForReceive(const CommKey& key, const std::string& unique_id,
                                                       uint64_t generation) {
  MutexLock lk(&mu_);
  auto it = entries_.find({key, 1});
  if (!unique_id.empty()) {
    if (it != entries_.end() && it->second->generation == generation)  // the same window's id, seen again
      return Lease{it->second, "", generation};
    // The sender made a new communicator: whatever was there is stale.
    if (it != entries_.end()) stats_.dropped++;
    auto e = std::make_shared<Entry>(key, generation, 1, unique_id);
    entries_[{key, 1}] = e;
    return Lease{e, "", generation};
  }
  if (it == entries_.end())
    return FailedPrecondition(factory_->name() + std::string(" communicator with ") + key.ToString() +
                              " (generation " + std::to_string(generation) + ") is not known here; the sender makes a new one");
  if (it->second->generation != generation)
    return FailedPrecondition(factory_->name() + std::string(" communicator with ") + key.ToString() + " is generation " +
                              std::to_string(it->second->generation) + " here, the sender uses " +
                              std::to_string(generation) + "; the sender makes a new one");
  return Lease{it->second, "", generation};
}

Status PeerCommCache::Exchange(const Lease& lease, const std::vector<PeerComm::P2P>& ops) {
  Entry& e = *lease.entry;
  Status st;
  bool joined = false;
  uint64_t sent = 0, received = 0;
  {
    MutexLock lk(&e.mu);
    if (!e.failed.ok()) {
      st = FailedPrecondition(std::string(factory_->name()) + " communicator with " + e.key.ToString() +
                              " was dropped (" + e.failed.message() + ")");
    } else {
      if (!e.comm) {
        auto c = factory_->Join(e.unique_id, e.rank, e.key.local_device, timeout_);
        if (c.ok()) {
          e.comm = std::move(c).value();
          joined = true;
        } else {
          st = c.status().WithContext(std::string("joining the ") + factory_->name() + " communicator with " +
                                      e.key.ToString());
        }
      }
      if (st.ok()) st = e.comm->Exchange(ops);
      if (!st.ok()) {
        e.comm.reset();  // aborted by the failure; freed here
        e.failed = st;
      }
    }
  }
  for (const auto& op : ops) (op.send ? sent : received) += op.bytes;
  if (!st.ok()) {
    DropEntry(lease.entry);
    return st;
  }
  MutexLock lk(&mu_);
  (joined ? stats_.created : stats_.reused)++;
  stats_.bytes_sent += sent;
  stats_.bytes_received += received;
  return st;
}

void PeerCommCache::Drop(const CommKey& key, uint64_t generation) {
  std::shared_ptr<Entry> e;
  {
    MutexLock lk(&mu_);
    auto it = entries_.find({key, 0});
    if (it == entries_.end() || it->second->generation != generation) return;
    e = it->second;
  }
  {
    MutexLock lk(&e->mu);  // waits for an exchange in flight on it (bounded by its deadline)
    e->comm.reset();
    if (e->failed.ok()) e->failed = Aborted("dropped after a failed window");
  }
  DropEntry(e);
}

void PeerCommCache::DropEntry(const std::shared_ptr<Entry>& e) {
  MutexLock lk(&mu_);
  auto it = entries_.find({e->key, e->rank});
  if (it == entries_.end() || it->second != e) return;  // replaced or dropped already
  entries_.erase(it);
  stats_.dropped++;
}

PeerCommCache::Stats PeerCommCache::stats() const {
  MutexLock lk(&mu_);
  Stats s = stats_;
  s.live = entries_.size();
  return s;
}

void ChunkTransports::Add(std::string name, TransportCaps caps) { transports_.emplace_back(std::move(name), std::move(caps)); }

Result<std::string> ChunkTransports::Pick(const Route& route) const {
  for (const auto& [name, caps] : transports_)
    if (caps.Serves(route)) return name;
  return FailedPrecondition("no transport carries chunks " + route.ToString() + " (transports: " +
                            (transports_.empty() ? std::string("none") : ToString()) + ")");
}

std::string ChunkTransports::ToString() const {
  std::string s;
  for (const auto& [name, caps] : transports_) s += (s.empty() ? "" : "; ") + name + " " + caps.ToString();
  return s;
}

TransportCaps HostStagedCaps() {
  TransportCaps c;
  for (MemoryKind src : {MemoryKind::kHostShm, MemoryKind::kCudaIpc})
    for (MemoryKind dst : {MemoryKind::kHostShm, MemoryKind::kCudaIpc}) c.routes.push_back(Route{src, dst, false});
  return c;
}

TransportCaps DeviceCaps() {
  TransportCaps c;
  c.routes.push_back(Route{MemoryKind::kCudaIpc, MemoryKind::kCudaIpc, false});
  return c;
}

}  // namespace ws
