// Coalescing of copy ops: fewer, larger ops that write exactly the same
// destination elements with exactly the same values.
//   * Canonical: a non-transposed op whose rows are back to back on both
//     sides becomes one row; a non-transposed op of one row per batch
//     becomes a 2-D op (batches as rows).
//   * AppendToBatch: an op that is the next batch of a run (same buffers,
//     shape, dtypes and transpose; source and destination offsets advancing
//     by the run's constant strides) is merged into the run as one more
//     batch, as long as the run's destination batches stay disjoint
//     (DstBatchesDisjoint), so the merged op passes ValidateCopyOp exactly
//     when all of its parts do.
// Ops are merged only when adjacent in the order given: the caller (the sync
// layer's BindLayer) orders candidates next to each other.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <vector>

#include "daemon/kernels/copy_math.h"

namespace ws {

// The same op in canonical form (see above); empty ops are returned as is.
kernels::CopyOp Canonical(const kernels::CopyOp& op);

// Merges `next` (a count-1 op in canonical form) into `run` (canonical, any
// count) as its batch run->count; false (run unchanged) when it is not
// exactly that batch. Call Canonical on the run when it is complete.
bool AppendToBatch(kernels::CopyOp* run, const kernels::CopyOp& next);

struct CoalescedOps {
  std::vector<kernels::CopyOp> ops;
  // ops[k] does the work of input ops [first[k], first[k + 1]); size ops + 1.
  std::vector<uint32_t> first;
};
// Coalesces adjacent ops of `ops` (any ops, e.g. bound ones).
CoalescedOps CoalesceOps(const std::vector<kernels::CopyOp>& ops);

}  // namespace ws
