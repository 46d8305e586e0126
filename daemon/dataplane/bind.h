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
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "daemon/core/status.h"
#include "daemon/dataplane/executor.h"
#include "daemon/kernels/copy_math.h"
#include "daemon/mem/memory.h"

namespace ws {

// Copy operations ready for Executor::RunNamed.
struct BoundOps {
  std::vector<kernels::CopyOp> ops;
  // Names ops[i] in errors ("tensor T (rank R) -> ENGINE param P"); called
  // only when an error needs it, so binding does no per-op string work.
  // Empty: "copy op i".
  OpNamer name;
  std::vector<Route> routes;  // where each op reads and writes (a zero fill: from its destination's kind)
  uint64_t bytes_read = 0;    // source bytes the ops read
  // Set by the sync layer: engines (indices in the sync) whose live, not
  // staged, parameters the ops write; they must have paused first.
  std::set<uint32_t> in_place_engines;
  // Set by the sync layer's BindLayer: the layer's shard groups (of two or
  // more shards) merged from the plan's chains, and those whose copies it
  // walked one by one (a layout the chains do not fit).
  uint32_t groups_chained = 0, groups_walked = 0;

  std::string Name(size_t i) const { return OpName(name, i); }
};

// Binds one planned op: `op` carries the plan's offsets, strides, shape,
// dtypes, transpose and zero_fill (its pointers are ignored); `src` (nullptr
// for a zero fill) and `dst` are the mapped buffers. Appends the bound op and
// its route to `out` (the caller sets out->name). The plan was validated
// against the same sizes, so an op that does not fit is a daemon bug:
// Internal, naming `where` and label() (called only then), and nothing is
// appended.
Status BindOp(kernels::CopyOp op, const Mapping* src, const Mapping& dst, const std::function<std::string()>& label,
              const std::string& where, BoundOps* out);

}  // namespace ws
