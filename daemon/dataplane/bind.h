// Binding: the one step that turns planned copies plus mapped memory into
// copy operations an Executor runs. The plan (daemon/core/planner.h) holds
// element offsets and shapes only; binding sets the pointers from the
// mappings and checks each op against its buffers (ValidateCopyOp with the
// mappings' sizes), so no op that could touch memory outside a mapping
// reaches an executor.
//
// Thread-safety: pure functions (the mappings are immutable).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "daemon/core/status.h"
#include "daemon/kernels/copy_math.h"
#include "daemon/mem/memory.h"

namespace ws {

// Copy operations ready for Executor::Run, one label per op.
struct BoundOps {
  std::vector<kernels::CopyOp> ops;
  std::vector<std::string> labels;
  std::vector<Route> routes;  // where each op reads and writes (a zero fill: from its destination's kind)
  uint64_t bytes_read = 0;    // source bytes the ops read
};

// Binds one planned op: `op` carries the plan's offsets, strides, shape,
// dtypes, transpose and zero_fill (its pointers are ignored); `src` (nullptr
// for a zero fill) and `dst` are the mapped buffers. Appends the bound op and
// `label` to `out`. The plan was validated against the same sizes, so an op
// that does not fit is a daemon bug: Internal, naming `where` and `label`,
// and nothing is appended.
Status BindOp(kernels::CopyOp op, const Mapping* src, const Mapping& dst, std::string label, const std::string& where,
              BoundOps* out);

}  // namespace ws
