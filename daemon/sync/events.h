// What engines hear about syncs of their model, and the sink that carries it.
#pragma once

#include <cstdint>
#include <string>

namespace ws::server {

struct EngineEvent {
  enum class Kind { kStarted, kCommitted, kAborted };
  Kind kind = Kind::kStarted;
  uint64_t sync_id = 0;
  uint64_t version = 0;
  std::string reason;  // kAborted only
};

// Implemented by the gRPC layer (one per open RegisterEngine stream) and by
// tests. Deliver() is called with the coordinator's lock held: it must not
// block and must not call back into the Coordinator. It is never called again
// once UnregisterEngine() for its engine has returned.
class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void Deliver(const EngineEvent& event) = 0;
};

}  // namespace ws::server
