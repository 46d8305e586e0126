// Executes resolved copy operations (pointers bound) on a thread pool in
// chunks. Host implementation; the CUDA executor runs the same CopyOps as
// one batched kernel launch per destination device.
//
// Thread-safety: Run() may be called concurrently from several trainer
// streams; the pool is shared. Ops passed to one Run() call must not write
// overlapping destination ranges with ops of a concurrent call (the planner
// guarantees this: every engine element has exactly one source).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "daemon/core/status.h"
#include "daemon/kernels/copy_math.h"

namespace ws {

struct ExecutorOptions {
  int threads = 0;                   // 0 = hardware concurrency
  size_t chunk_bytes = 4u << 20;     // destination bytes per work item
};

class Executor {
 public:
  virtual ~Executor() = default;
  // Runs every op to completion (blocking). Returns the destination bytes written.
  virtual Result<uint64_t> Run(const std::vector<kernels::CopyOp>& ops) = 0;
  virtual int threads() const = 0;
};

std::unique_ptr<Executor> MakeHostExecutor(const ExecutorOptions& opts);

// Single-threaded reference path: the plain per-element loop over
// kernels::RunElement. Used by tests to check the fast paths.
void RunOpReference(const kernels::CopyOp& op);

}  // namespace ws
