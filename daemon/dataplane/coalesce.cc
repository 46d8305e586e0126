#include "daemon/dataplane/coalesce.h"

#include <climits>

#include "daemon/dataplane/executor.h"

namespace ws {

using kernels::CopyOp;

namespace {

// Back-to-back rows on both sides become one row.
void JoinRows(CopyOp* n) {
  if (!n->transpose && n->rows > 1 && n->dst_ld == n->cols && (n->zero_fill || n->src_ld == n->cols)) {
    n->cols *= n->rows;
    n->rows = 1;
  }
  if (!n->transpose && n->rows == 1) n->src_ld = n->dst_ld = n->cols;  // unused for one row
}

}  // namespace

CopyOp Canonical(const CopyOp& op) {
  CopyOp n = op;
  if (n.rows <= 0 || n.cols <= 0 || n.count < 1) return n;
  if (n.zero_fill) n.transpose = 0;
  if (n.count == 1) n.src_batch_stride = n.dst_batch_stride = 0;
  JoinRows(&n);
  if (!n.transpose && n.rows == 1 && n.count > 1) {  // batches of one row are rows
    n.rows = n.count;
    n.src_ld = n.src_batch_stride;
    n.dst_ld = n.dst_batch_stride;
    n.count = 1;
    n.src_batch_stride = n.dst_batch_stride = 0;
    JoinRows(&n);
  }
  return n;
}

bool AppendToBatch(CopyOp* run, const CopyOp& next) {
  const bool zero = run->zero_fill != 0;
  if (next.count != 1 || run->count >= INT32_MAX || run->dst != next.dst || run->zero_fill != next.zero_fill ||
      run->src_dtype != next.src_dtype || run->dst_dtype != next.dst_dtype || run->transpose != next.transpose ||
      run->rows != next.rows || run->cols != next.cols || run->dst_ld != next.dst_ld || run->rows <= 0 ||
      run->cols <= 0)
    return false;
  if (!zero && (run->src != next.src || run->src_ld != next.src_ld)) return false;
  const int64_t ds = next.dst_offset - run->dst_offset;  // offsets are >= 0: no overflow
  const int64_t ss = zero ? 0 : next.src_offset - run->src_offset;
  CopyOp cand = *run;
  if (run->count == 1) {
    if (ds <= 0 || ss < 0) return false;
    cand.dst_batch_stride = ds;
    cand.src_batch_stride = ss;
  } else {
    int64_t want_d, want_s;
    if (__builtin_mul_overflow(run->dst_batch_stride, static_cast<int64_t>(run->count), &want_d) ||
        __builtin_mul_overflow(run->src_batch_stride, static_cast<int64_t>(run->count), &want_s) || ds != want_d ||
        ss != want_s)
      return false;
  }
  cand.count = run->count + 1;
  if (!DstBatchesDisjoint(cand)) return false;
  *run = cand;
  return true;
}

CoalescedOps CoalesceOps(const std::vector<CopyOp>& ops) {
  CoalescedOps out;
  out.ops.reserve(ops.size());
  for (uint32_t i = 0; i < ops.size(); ++i) {
    const CopyOp c = Canonical(ops[i]);
    if (!out.ops.empty() && AppendToBatch(&out.ops.back(), c)) continue;
    if (!out.ops.empty()) out.ops.back() = Canonical(out.ops.back());
    out.ops.push_back(c);
    out.first.push_back(i);
  }
  if (!out.ops.empty()) out.ops.back() = Canonical(out.ops.back());
  out.first.push_back(static_cast<uint32_t>(ops.size()));
  return out;
}

}  // namespace ws
