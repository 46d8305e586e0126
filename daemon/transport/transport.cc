#include "daemon/transport/transport.h"

#include <utility>

namespace ws {

bool TransportCaps::Serves(const Route& r) const {
  for (const Route& x : routes)
    if (x == r) return true;
  return false;
}

std::string TransportCaps::ToString() const {
  std::string s;
  for (const Route& r : routes) s += (s.empty() ? "" : ", ") + r.ToString();
  return "{" + s + "}";
}

TransportCaps LocalTransport::caps() const {
  TransportCaps c;
  std::vector<MemoryKind> kinds = {MemoryKind::kHostShm};
  if (device_memory_) kinds.push_back(MemoryKind::kCudaIpc);
  for (MemoryKind src : kinds)
    for (MemoryKind dst : kinds) c.routes.push_back(Route{src, dst, true});
  return c;
}

Result<Transport*> TransportRegistry::Pick(const Route& route) const {
  for (const auto& t : transports_)
    if (t->caps().Serves(route)) return t.get();
  std::string have;
  for (const auto& t : transports_) have += (have.empty() ? "" : "; ") + std::string(t->name()) + " " + t->caps().ToString();
  return FailedPrecondition("no transport serves " + route.ToString() + " (transports: " +
                            (have.empty() ? "none" : have) + ")");
}

Result<uint64_t> TransportRegistry::Copy(const BoundOps& ops) const {
  // Which transport runs each op, picked once per distinct route (a batch
  // has one or two); the common case is one transport for all.
  std::vector<std::pair<Route, Transport*>> by_route;
  std::vector<Transport*> picked(ops.ops.size());
  std::vector<Transport*> distinct;
  for (size_t i = 0; i < ops.ops.size(); ++i) {
    const Route route = i < ops.routes.size() ? ops.routes[i] : Route{};
    Transport* t = nullptr;
    for (const auto& [r, rt] : by_route)
      if (r == route) t = rt;
    if (t == nullptr) {
      auto p = Pick(route);
      if (!p.ok()) return p.status().WithContext(ops.Name(i));
      t = *p;
      by_route.emplace_back(route, t);
      bool seen = false;
      for (Transport* d : distinct) seen = seen || d == t;
      if (!seen) distinct.push_back(t);
    }
    picked[i] = t;
  }
  if (distinct.empty()) return uint64_t{0};
  if (distinct.size() == 1) return distinct[0]->Copy(ops);
  uint64_t bytes = 0;
  for (Transport* t : distinct) {
    BoundOps part;
    std::vector<size_t> index;  // part.ops[k] is ops.ops[index[k]]
    for (size_t i = 0; i < ops.ops.size(); ++i) {
      if (picked[i] != t) continue;
      part.ops.push_back(ops.ops[i]);
      part.routes.push_back(i < ops.routes.size() ? ops.routes[i] : Route{});
      index.push_back(i);
    }
    part.name = [&ops, &index](size_t k) { return ops.Name(index[k]); };
    WS_ASSIGN_OR_RETURN(uint64_t n, t->Copy(part));
    bytes += n;
  }
  return bytes;
}

}  // namespace ws
