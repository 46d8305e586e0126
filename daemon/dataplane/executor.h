// Executes resolved copy operations (pointers bound) on a thread pool in
// chunks. Host implementation; the CUDA executor runs the same CopyOps as
// one batched kernel launch per destination device.
//
// Thread-safety: Run() may be called concurrently from several trainer
// streams; the pool is shared. Ops passed to one Run() call must not write
// overlapping destination ranges with ops of a concurrent call (the planner
// guarantees this: every engine element has exactly one source).
//
// Signals: the host executor installs a process-wide SIGBUS handler (once,
// on first construction; a previous handler is kept and chained to). Each
// host work item runs with a per-thread guard armed; a SIGBUS on that thread
// while armed (a peer truncated a mapped shm object mid-copy) jumps back out
// of the item, and Run returns FailedPrecondition naming the op's
// label and the cause (DiagnoseMemoryFault: truncated, or out of space in
// /dev/shm), with the remaining items skipped and the destination partly
// written. A SIGBUS anywhere else goes to the previous handler, or kills the
// process as before (core dump). Only SIGBUS is guarded, and only host
// copies: GPU reads of truncated host memory are not covered.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "daemon/core/status.h"
#include "daemon/kernels/copy_math.h"

namespace ws {

// Names op i of a batch in error messages; called only when an error needs it.
using OpNamer = std::function<std::string(size_t)>;

struct ExecutorOptions {
  int threads = 0;                   // 0 = hardware concurrency
  size_t chunk_bytes = 4u << 20;     // destination bytes per work item
  // Host row loops: a rows::Isa (host_rows.h) to force, which must be
  // supported (tests, benchmarks); -1: rows::Best().
  int host_isa = -1;
  // Host ops writing at least this many bytes use non-temporal stores (their
  // destination is not read again by the daemon).
  uint64_t stream_min_bytes = 256u << 10;
};

class Executor {
 public:
  virtual ~Executor() = default;
  // Runs every op to completion (blocking) and returns the destination bytes
  // written. labels[i], when present and non-empty, names ops[i] in errors
  // (otherwise "copy op i"). Every op is checked first (ValidateCopyOp): a
  // malformed one refuses the whole call before any byte is written.
  Result<uint64_t> Run(const std::vector<kernels::CopyOp>& ops, const std::vector<std::string>& labels = {});
  // As Run(); name(i) names ops[i] and is called only for an error message
  // (no per-op string work on the hot path); an empty `name` gives "copy op i".
  Result<uint64_t> RunNamed(const std::vector<kernels::CopyOp>& ops, const OpNamer& name);
  virtual int threads() const = 0;
  // Ok while the executor can run ops. Once it cannot run anything again
  // (a sticky CUDA error: the context stays broken until the process exits)
  // the error, for good.
  virtual Status health() const { return Status::Ok(); }

 protected:
  // The work of Run/RunNamed, on ops that passed ValidateCopyOp; `name`
  // never empty.
  virtual Result<uint64_t> RunValidated(const std::vector<kernels::CopyOp>& ops, const OpNamer& name) = 0;
};

// The name of ops[i] in errors: labels[i], or "copy op i" when absent.
std::string OpLabel(const std::vector<std::string>& labels, size_t i);
// The name of ops[i] in errors: name(i), or "copy op i" when `name` is empty.
std::string OpName(const OpNamer& name, size_t i);

// Host memory only (every op's pointers must be host-addressable).
std::unique_ptr<Executor> MakeHostExecutor(const ExecutorOptions& opts);

// The host executor, plus, when built with CUDA and the CUDA executor starts,
// that executor: an op whose source or destination is device memory goes to
// the GPU (one batched launch per destination device), the rest to the host
// pool; such an op is refused when the CUDA executor could not start. The
// executor of MakeDataPlane (data_plane.h), which also builds the matching
// memory domain. Without CUDA this is the host executor.
std::unique_ptr<Executor> MakeExecutor(const ExecutorOptions& opts);

// Where a bound op's buffers end, in elements of their dtypes.
struct OpExtents {
  uint64_t src_elems = 0;  // unused for zero fills
  uint64_t dst_elems = 0;
};

// Checks an op's shape fields (non-negative sizes, count >= 1, known dtypes,
// non-null pointers aligned to their element size, destination rows and
// batches that do not overlap: DstBatchesDisjoint) and, given `extents`, that every element it reads or writes lies
// inside them (computed with overflow checks). InvalidArgument naming `what`.
Status ValidateCopyOp(const kernels::CopyOp& op, const std::string& what, const OpExtents* extents = nullptr);

// Whether an op's destination batches are provably disjoint: each batch's
// whole span lies before the next one's (dst_batch_stride >=
// (rows-1)*dst_ld + cols), or the batches sit side by side within every
// destination row (rows > 1, cols <= dst_batch_stride and
// (count-1)*dst_batch_stride + cols <= dst_ld). Rows within a batch are
// checked separately (dst_ld >= cols). True for count <= 1 and empty ops.
bool DstBatchesDisjoint(const kernels::CopyOp& op);

// Single-threaded reference path: the plain per-element loop over
// kernels::RunElement. Used by tests to check the fast paths.
void RunOpReference(const kernels::CopyOp& op);

}  // namespace ws
