#include "daemon/dataplane/executor.h"

#include <cstdint>

namespace ws {

Status ValidateCopyOp(const kernels::CopyOp& op, const std::string& what) {
  auto bad = [&](const std::string& m) { return InvalidArgument(what + ": invalid copy op: " + m); };
  if (op.rows < 0 || op.cols < 0) {
    return bad("negative shape " + std::to_string(op.rows) + "x" + std::to_string(op.cols));
  }
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
    return reinterpret_cast<uintptr_t>(p) % (dtype == kernels::kF32 ? 4 : 2) != 0;
  };
  if (misaligned(op.dst, op.dst_dtype)) return bad("destination address is not aligned to its element size");
  if (!op.zero_fill && misaligned(op.src, op.src_dtype)) return bad("source address is not aligned to its element size");
  if (op.rows > 1 && op.dst_ld < op.cols) {
    return bad("destination stride " + std::to_string(op.dst_ld) + " < cols " + std::to_string(op.cols) +
               " (rows would overlap)");
  }
  return Status::Ok();
}

void RunOpReference(const kernels::CopyOp& op) {
  const int64_t n = op.rows * op.cols;
  for (int64_t k = 0; k < n; ++k) kernels::RunElement(op, k);
}

}  // namespace ws
