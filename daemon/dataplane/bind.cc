#include "daemon/dataplane/bind.h"

#include <utility>

#include "daemon/dataplane/executor.h"

namespace ws {

Status BindOp(kernels::CopyOp op, const Mapping* src, const Mapping& dst, const std::function<std::string()>& label,
              const std::string& where, BoundOps* out) {
  OpExtents extents;
  op.dst = dst.data();
  extents.dst_elems = dst.size() / kernels::ElemSize(op.dst_dtype);
  if (op.zero_fill || src == nullptr) {
    op.zero_fill = 1;
    op.src = nullptr;
  } else {
    op.src = src->data();
    extents.src_elems = src->size() / kernels::ElemSize(op.src_dtype);
  }
  if (!ValidateCopyOp(op, std::string(), &extents).ok()) {  // the label is made only for the message
    return Internal(where + ": planned " + ValidateCopyOp(op, label(), &extents).message());
  }
  if (!op.zero_fill && op.rows > 0 && op.cols > 0) {
    out->bytes_read += static_cast<uint64_t>(op.count * op.rows * op.cols) * kernels::ElemSize(op.src_dtype);
  }
  out->ops.push_back(op);
  // Mapped memory is on this node.
  out->routes.push_back(Route{op.zero_fill ? dst.kind() : src->kind(), dst.kind(), true});
  return Status::Ok();
}

}  // namespace ws
