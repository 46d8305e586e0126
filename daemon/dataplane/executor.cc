#include "daemon/dataplane/executor.h"

#include <cstdint>

namespace ws {

namespace {

// Last element index of `count` batches at stride `bs` of `outer` rows of
// `inner` elements at stride `ld` from `offset`; false when it overflows (a
// wrapped index must fail the check).
bool LastIndex(int64_t offset, int64_t count, int64_t bs, int64_t outer, int64_t ld, int64_t inner, uint64_t* out) {
  int64_t a, b, c;
  if (__builtin_mul_overflow(outer - 1, ld, &a) || __builtin_mul_overflow(count - 1, bs, &c) ||
      __builtin_add_overflow(offset, a, &b) || __builtin_add_overflow(b, c, &b) ||
      __builtin_add_overflow(b, inner - 1, &b))
    return false;
  *out = static_cast<uint64_t>(b);
  return true;
}

}  // namespace

std::string OpLabel(const std::vector<std::string>& labels, size_t i) {
  return i < labels.size() && !labels[i].empty() ? labels[i] : "copy op " + std::to_string(i);
}

std::string OpName(const OpNamer& name, size_t i) {
  return name ? name(i) : "copy op " + std::to_string(i);
}

Result<uint64_t> Executor::Run(const std::vector<kernels::CopyOp>& ops, const std::vector<std::string>& labels) {
  return RunNamed(ops, [&labels](size_t i) { return OpLabel(labels, i); });
}

Result<uint64_t> Executor::RunNamed(const std::vector<kernels::CopyOp>& ops, const OpNamer& name) {
  // Checked without a name first: the name is made only for the message.
  for (size_t i = 0; i < ops.size(); ++i)
    if (!ValidateCopyOp(ops[i], std::string()).ok()) return ValidateCopyOp(ops[i], OpName(name, i));
  if (name) return RunValidated(ops, name);
  return RunValidated(ops, [](size_t i) { return OpName(OpNamer(), i); });
}

Status ValidateCopyOp(const kernels::CopyOp& op, const std::string& what, const OpExtents* extents) {
  auto bad = [&](const std::string& m) { return InvalidArgument(what + ": invalid copy op: " + m); };
  if (op.rows < 0 || op.cols < 0) {
    return bad("negative shape " + std::to_string(op.rows) + "x" + std::to_string(op.cols));
  }
  if (op.count < 1) return bad("batch count " + std::to_string(op.count) + " < 1");
  if (op.src_dtype > kernels::kF16 || op.dst_dtype > kernels::kF16) {
    return bad("unknown dtype code " + std::to_string(op.src_dtype) + " -> " + std::to_string(op.dst_dtype));
  }
  if (op.rows == 0 || op.cols == 0) return Status::Ok();
  if (op.dst == nullptr) return bad("null destination");
  if (!op.zero_fill && op.src == nullptr) return bad("null source");
  if (op.src_offset < 0 || op.dst_offset < 0 || op.src_ld < 0 || op.dst_ld < 0) return bad("negative offset or stride");
  // Misaligned element accesses are undefined on the host and a sticky
  // error (cudaErrorMisalignedAddress) on the GPU.
  auto misaligned = [](const void* p, uint8_t dtype) {
    return reinterpret_cast<uintptr_t>(p) % kernels::ElemSize(dtype) != 0;
  };
  if (misaligned(op.dst, op.dst_dtype)) return bad("destination address is not aligned to its element size");
  if (!op.zero_fill && misaligned(op.src, op.src_dtype)) return bad("source address is not aligned to its element size");
  if (op.rows > 1 && op.dst_ld < op.cols) {
    return bad("destination stride " + std::to_string(op.dst_ld) + " < cols " + std::to_string(op.cols) +
               " (rows would overlap)");
  }
  if (op.count > 1 && (op.src_batch_stride < 0 || op.dst_batch_stride < 0)) return bad("negative batch stride");
  if (!DstBatchesDisjoint(op)) {
    return bad("destination batch stride " + std::to_string(op.dst_batch_stride) + " makes " +
               std::to_string(op.count) + " batches of " + std::to_string(op.rows) + "x" + std::to_string(op.cols) +
               " (row stride " + std::to_string(op.dst_ld) + ") overlap");
  }
  if (extents == nullptr) return Status::Ok();
  uint64_t last;
  if (!LastIndex(op.dst_offset, op.count, op.dst_batch_stride, op.rows, op.dst_ld, op.cols, &last) ||
      last >= extents->dst_elems) {
    return bad("writes past the end of its destination (" + std::to_string(extents->dst_elems) + " elements)");
  }
  if (op.zero_fill) return Status::Ok();
  if (!(op.transpose ? LastIndex(op.src_offset, op.count, op.src_batch_stride, op.cols, op.src_ld, op.rows, &last)
                     : LastIndex(op.src_offset, op.count, op.src_batch_stride, op.rows, op.src_ld, op.cols, &last)) ||
      last >= extents->src_elems) {
    return bad("reads past the end of its source (" + std::to_string(extents->src_elems) + " elements)");
  }
  return Status::Ok();
}

bool DstBatchesDisjoint(const kernels::CopyOp& op) {
  if (op.count <= 1 || op.rows == 0 || op.cols == 0) return true;
  const int64_t s = op.dst_batch_stride;
  // Whole batches one after another: each spans (rows-1)*dst_ld + cols.
  int64_t span;
  if (op.rows == 1) {
    span = op.cols;
  } else if (__builtin_mul_overflow(op.rows - 1, op.dst_ld, &span) || __builtin_add_overflow(span, op.cols, &span)) {
    return false;
  }
  if (s >= span) return true;
  // Batches side by side inside each row: all of a row's batches fit in dst_ld.
  int64_t width;
  return op.rows > 1 && s >= op.cols && !__builtin_mul_overflow(op.count - 1, s, &width) &&
         !__builtin_add_overflow(width, op.cols, &width) && width <= op.dst_ld;
}

void RunOpReference(const kernels::CopyOp& op) {
  const int64_t n = op.count * op.rows * op.cols;
  for (int64_t k = 0; k < n; ++k) kernels::RunElement(op, k);
}

}  // namespace ws
