// Transports: how bytes get from a trainer shard to an engine parameter.
// Each declares what it can do so the server can pick one per pair of
// memory locations. Implemented today:
//   local: both ends mapped in this process (host shm, CUDA IPC); copies
//          run through an Executor with the full CopyOp semantics (cast,
//          transpose, slicing) straight into the destination.
//   nccl:  (CUDA builds, daemon/transport/nccl_transport.h) raw byte-range
//          send/recv between ranks of an NCCL communicator; see there for
//          what it does not do yet.
//
// Thread-safety: caps()/name() are const and safe anywhere; see each class
// for its data-moving calls.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "daemon/core/status.h"
#include "daemon/dataplane/executor.h"

namespace ws {

struct TransportCaps {
  bool host_memory = false;  // reads/writes host shared memory
  bool cuda_memory = false;  // reads/writes device memory
  bool cross_node = false;   // peers may be on other machines
  bool zero_copy = false;    // writes straight into the destination, no staging buffer

  std::string ToString() const {
    std::string s;
    auto add = [&](bool on, const char* n) {
      if (on) s += (s.empty() ? "" : ",") + std::string(n);
    };
    add(host_memory, "host_memory");
    add(cuda_memory, "cuda_memory");
    add(cross_node, "cross_node");
    add(zero_copy, "zero_copy");
    return "{" + s + "}";
  }
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  virtual TransportCaps caps() const = 0;
};

// In-process copies through an Executor. Copy() may be called concurrently
// (the executor is thread-safe).
class LocalTransport final : public Transport {
 public:
  LocalTransport(std::shared_ptr<Executor> executor, bool cuda_memory)
      : executor_(std::move(executor)), cuda_memory_(cuda_memory) {}

  const char* name() const override { return "local"; }
  TransportCaps caps() const override;

  // Runs the ops to completion; returns destination bytes written.
  Result<uint64_t> Copy(const std::vector<kernels::CopyOp>& ops, const std::vector<std::string>& labels = {}) {
    return executor_->Run(ops, labels);
  }
  Executor& executor() { return *executor_; }

 private:
  std::shared_ptr<Executor> executor_;
  bool cuda_memory_;
};

// A local transport over MakeExecutor(opts): CUDA memory too when this build
// has CUDA and a device is present.
std::unique_ptr<LocalTransport> MakeLocalTransport(const ExecutorOptions& opts);

}  // namespace ws
