// Host executor: ops are cut into rectangular work items of about
// chunk_bytes destination bytes and run on a shared thread pool. Per item:
// the row loops of host_rows.h (copy or cast, built for the widest
// instruction set present; ops of at least stream_min_bytes write with
// non-temporal stores), a cache-blocked transpose, or memset for zero fill. Every item runs under a SIGBUS fault guard (see
// executor.h): a peer that truncates a mapped shm object mid-copy (or a
// full /dev/shm) fails the Run with an error naming the op and, from the
// memory domain, the cause, instead of killing the process.

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>

#include "daemon/dataplane/coalesce.h"
#include "daemon/dataplane/executor.h"
#include "daemon/dataplane/host_rows.h"
#include "daemon/dataplane/thread_pool.h"
#include "daemon/mem/memory.h"

namespace ws {
namespace {

using kernels::CopyOp;

using kernels::ElemSize;

// Batches [b0, b1) of rows [r0, r1) and cols [c0, c1) of one op.
struct Item {
  const CopyOp* op;
  int64_t b0, b1, r0, r1, c0, c1;
};

constexpr int64_t kTile = 64;

// How items are run: the row loops of one instruction set, and which ops
// stream their destination.
struct RunMode {
  rows::Isa isa;
  uint64_t stream_min_bytes;
};

void TransposeItem(const Item& it, rows::RowFn row, const char* s, char* d);

void CastItem(const Item& it, rows::Isa isa, bool stream) {
  const CopyOp& op = *it.op;
  const size_t ss = ElemSize(op.src_dtype), ds = ElemSize(op.dst_dtype);
  const rows::RowFn row = op.transpose ? rows::Row(isa, op.src_dtype, op.dst_dtype) : nullptr;
  const rows::RectFn rect = op.transpose ? nullptr : rows::Rect(isa, op.src_dtype, op.dst_dtype);
  for (int64_t b = it.b0; b < it.b1; ++b) {
    const char* s = static_cast<const char*>(op.src) + (op.src_offset + b * op.src_batch_stride) * ss;
    char* d = static_cast<char*>(op.dst) + (op.dst_offset + b * op.dst_batch_stride) * ds;
    if (op.transpose) {
      TransposeItem(it, row, s, d);
      continue;
    }
    rect(s + (it.r0 * op.src_ld + it.c0) * ss, op.src_ld * static_cast<int64_t>(ss),
         d + (it.r0 * op.dst_ld + it.c0) * ds, op.dst_ld * static_cast<int64_t>(ds), it.r1 - it.r0, it.c1 - it.c0,
         stream);
  }
}

// One batch of a transposed item; s and d point at the batch's origin.
void TransposeItem(const Item& it, rows::RowFn row, const char* s, char* d) {
  const CopyOp& op = *it.op;
  const size_t ss = ElemSize(op.src_dtype), ds = ElemSize(op.dst_dtype);
  // dst(i, j) = src(j, i), one kTile x kTile block at a time: convert source
  // rows contiguously into a small tile (no cache-set conflicts from large
  // power-of-two strides), then write destination rows contiguously.
  alignas(64) char tile[kTile][kTile * 4];  // row j: converted src(jb + j, ib .. ib + ni)
  for (int64_t ib = it.r0; ib < it.r1; ib += kTile) {
    const int64_t ni = std::min(kTile, it.r1 - ib);
    for (int64_t jb = it.c0; jb < it.c1; jb += kTile) {
      const int64_t nj = std::min(kTile, it.c1 - jb);
      for (int64_t j = 0; j < nj; ++j) row(s + ((jb + j) * op.src_ld + ib) * ss, tile[j], ni, false);
      for (int64_t i = 0; i < ni; ++i) {
        if (ds == 4) {
          uint32_t* __restrict dr = reinterpret_cast<uint32_t*>(d) + (ib + i) * op.dst_ld + jb;
          for (int64_t j = 0; j < nj; ++j) std::memcpy(&dr[j], &tile[j][i * 4], 4);
        } else {
          uint16_t* __restrict dr = reinterpret_cast<uint16_t*>(d) + (ib + i) * op.dst_ld + jb;
          for (int64_t j = 0; j < nj; ++j) std::memcpy(&dr[j], &tile[j][i * 2], 2);
        }
      }
    }
  }
}

void CopyItem(const Item& it, const RunMode& mode) {
  const CopyOp& op = *it.op;
  const size_t es = ElemSize(op.dst_dtype);
  char* d = static_cast<char*>(op.dst);
  const size_t row_bytes = static_cast<size_t>(it.c1 - it.c0) * es;
  if (op.zero_fill) {  // +0.0 is all-zero bits in f32, bf16 and f16
    for (int64_t b = it.b0; b < it.b1; ++b)
      for (int64_t i = it.r0; i < it.r1; ++i)
        std::memset(d + (op.dst_offset + b * op.dst_batch_stride + i * op.dst_ld + it.c0) * es, 0, row_bytes);
    return;
  }
  // The destination is not read again by the daemon: large ops stream it.
  const bool stream =
      !op.transpose && static_cast<uint64_t>(op.count * op.rows * op.cols) * es >= mode.stream_min_bytes;
  CastItem(it, mode.isa, stream);
  if (stream) rows::StreamFence();
}

void SplitBatch(const CopyOp* op, int64_t b, int64_t chunk, std::vector<Item>* items);

void Split(const CopyOp* op, size_t chunk_bytes, std::vector<Item>* items) {
  const int64_t chunk = std::max<int64_t>(64, static_cast<int64_t>(chunk_bytes / ElemSize(op->dst_dtype)));
  const int64_t per_batch = op->rows * op->cols;
  if (op->count > 1 && per_batch <= chunk) {  // whole batches per item
    const int64_t per = std::max<int64_t>(1, chunk / per_batch);
    for (int64_t b = 0; b < op->count; b += per)
      items->push_back({op, b, std::min<int64_t>(b + per, op->count), 0, op->rows, 0, op->cols});
    return;
  }
  for (int64_t b = 0; b < op->count; ++b) SplitBatch(op, b, chunk, items);
}

// Items of batch b of an op.
void SplitBatch(const CopyOp* op, int64_t b, int64_t chunk, std::vector<Item>* items) {
  if (op->transpose) {
    // Square-ish blocks: splitting by whole rows would stride through the source.
    int64_t side = static_cast<int64_t>(std::sqrt(static_cast<double>(chunk)));
    side = std::max<int64_t>(kTile, side / kTile * kTile);
    for (int64_t r = 0; r < op->rows; r += side)
      for (int64_t c = 0; c < op->cols; c += side)
        items->push_back({op, b, b + 1, r, std::min(r + side, op->rows), c, std::min(c + side, op->cols)});
    return;
  }
  if (op->cols <= chunk) {
    const int64_t per = std::max<int64_t>(1, chunk / op->cols);
    for (int64_t r = 0; r < op->rows; r += per) items->push_back({op, b, b + 1, r, std::min(r + per, op->rows), 0, op->cols});
    return;
  }
  for (int64_t r = 0; r < op->rows; ++r)
    for (int64_t c = 0; c < op->cols; c += chunk) items->push_back({op, b, b + 1, r, r + 1, c, std::min(c + chunk, op->cols)});
}

// SIGBUS fault guard. One process-wide handler; each thread's guard is
// armed only while that thread runs a work item. Constant-initialized so the
// handler touches no lazily-constructed TLS (the arming thread has already
// touched it anyway).
struct FaultGuard {
  sigjmp_buf jump;
  volatile sig_atomic_t active;
  void* volatile addr;  // faulting address of the last caught fault
};
thread_local FaultGuard t_guard{};
struct sigaction g_prev_sigbus;  // disposition before ours, for unguarded faults

// Async-signal-safe only: no allocation, no locks.
void OnSigbus(int sig, siginfo_t* info, void* ctx) {
  FaultGuard& g = t_guard;
  if (g.active) {
    g.active = 0;
    g.addr = info != nullptr ? info->si_addr : nullptr;
    siglongjmp(g.jump, 1);
  }
  // Not ours: a genuine bug. Hand it to the previous handler, or die with the
  // default action (core dump) once this handler returns.
  if ((g_prev_sigbus.sa_flags & SA_SIGINFO) != 0 && g_prev_sigbus.sa_sigaction != nullptr) {
    g_prev_sigbus.sa_sigaction(sig, info, ctx);
    return;
  }
  if (g_prev_sigbus.sa_handler != SIG_DFL && g_prev_sigbus.sa_handler != SIG_IGN) {
    g_prev_sigbus.sa_handler(sig);
    return;
  }
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, nullptr);
  raise(SIGBUS);  // blocked until return; a fault also re-faults on return
}

void InstallSigbusHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = OnSigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &g_prev_sigbus);
  });
}

// Runs items[0, n) with the guard armed once. Returns false (with the
// faulting item and address) when one hit SIGBUS; that item is then partly
// written and the rest not run. The jump target is this frame, live for the
// whole copy; CopyItem holds no locks and no objects with destructors, so
// abandoning it is safe.
bool GuardedCopyItems(const Item* items, size_t n, const RunMode& mode, size_t* fault_item, void** fault_addr) {
  volatile size_t cur = 0;  // read after the jump
  if (sigsetjmp(t_guard.jump, 0) != 0) {
    // Jumped out of the handler: SIGBUS is still blocked in this thread
    // (savemask 0 keeps the fast path free of syscalls); unblock it.
    sigset_t bus;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, nullptr);
    *fault_addr = t_guard.addr;
    *fault_item = cur;
    return false;
  }
  t_guard.active = 1;
  std::atomic_signal_fence(std::memory_order_seq_cst);  // no copy access before arming
  for (size_t i = 0; i < n; ++i) {
    cur = i;
    CopyItem(items[i], mode);
  }
  std::atomic_signal_fence(std::memory_order_seq_cst);  // nor after disarming
  t_guard.active = 0;
  return true;
}

// Whether `p` lies in the destination rows op `o` writes.
bool InDestination(const CopyOp& o, const void* p) {
  const size_t es = ElemSize(o.dst_dtype);
  const char* lo = static_cast<const char*>(o.dst) + o.dst_offset * es;
  const char* hi = lo + ((o.count - 1) * o.dst_batch_stride + (o.rows - 1) * o.dst_ld + o.cols) * es;
  return p >= lo && p < hi;
}

class HostExecutor final : public Executor {
 public:
  explicit HostExecutor(const ExecutorOptions& opts)
      : threads_(opts.threads > 0 ? opts.threads : std::max(1u, std::thread::hardware_concurrency())),
        chunk_bytes_(std::max<size_t>(opts.chunk_bytes, 1)),
        mode_{opts.host_isa >= 0 ? static_cast<rows::Isa>(opts.host_isa) : rows::Best(), opts.stream_min_bytes},
        pool_(threads_ - 1) {
    if (opts.host_isa >= rows::kIsaCount || !rows::Supported(mode_.isa)) {
      std::fprintf(stderr, "weightsync: host executor: instruction set %d is not supported here\n", opts.host_isa);
      std::abort();
    }
    InstallSigbusHandler();
  }

  int threads() const override { return threads_; }

 protected:
  Result<uint64_t> RunValidated(const std::vector<CopyOp>& ops, const OpNamer& what) override {
    std::vector<CopyOp> norm;
    std::vector<size_t> index;  // norm[k] is ops[index[k]]
    norm.reserve(ops.size());
    index.reserve(ops.size());
    uint64_t bytes = 0;
    for (size_t i = 0; i < ops.size(); ++i) {
      if (ops[i].rows == 0 || ops[i].cols == 0) continue;
      norm.push_back(Canonical(ops[i]));
      index.push_back(i);
      bytes += static_cast<uint64_t>(ops[i].count * ops[i].rows * ops[i].cols) * ElemSize(ops[i].dst_dtype);
    }
    std::vector<Item> items;
    for (const CopyOp& op : norm) Split(&op, chunk_bytes_, &items);
    // Consecutive small items run as one task (one dispatch, one guard):
    // tasks of about chunk_bytes / 4 destination bytes, or single items.
    std::vector<size_t> task{0};  // items[task[k], task[k + 1]) is task k
    const uint64_t task_bytes = std::max<uint64_t>(chunk_bytes_ / 4, 1);
    uint64_t acc = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const Item& it = items[i];
      acc += static_cast<uint64_t>((it.b1 - it.b0) * (it.r1 - it.r0) * (it.c1 - it.c0)) * ElemSize(it.op->dst_dtype);
      if (acc >= task_bytes || i + 1 == items.size()) {
        task.push_back(i + 1);
        acc = 0;
      }
    }
    constexpr size_t kNone = std::numeric_limits<size_t>::max();
    std::atomic<size_t> failed{kNone};  // norm index of the first faulted op
    std::atomic<void*> failed_addr{nullptr};
    pool_.ParallelFor(task.size() - 1, [&](size_t k) {
      if (failed.load(std::memory_order_relaxed) != kNone) return;  // already failing: skip the rest
      void* addr = nullptr;
      size_t item = 0;
      if (GuardedCopyItems(&items[task[k]], task[k + 1] - task[k], mode_, &item, &addr)) return;
      size_t expect = kNone;
      if (failed.compare_exchange_strong(expect, static_cast<size_t>(items[task[k] + item].op - norm.data()))) {
        failed_addr.store(addr);
      }
    });
    if (const size_t k = failed.load(); k != kNone) {
      const CopyOp& op = ops[index[k]];
      const void* addr = failed_addr.load();
      const bool dst = op.zero_fill || InDestination(op, addr);
      char where[32];
      std::snprintf(where, sizeof where, "%p", addr);
      // The memory's domain knows whether its object shrank or ran out of space.
      std::string cause = DiagnoseMemoryFault(addr, dst);
      if (cause.empty()) cause = "shared memory object was truncated while being copied";
      return FailedPrecondition(what(index[k]) + ": " + cause + " (SIGBUS " +
                                (dst ? "writing the destination" : "reading the source") + " at " + where +
                                "); the copy is incomplete");
    }
    return bytes;
  }

 private:
  int threads_;
  size_t chunk_bytes_;
  RunMode mode_;
  ThreadPool pool_;
};

}  // namespace

std::unique_ptr<Executor> MakeHostExecutor(const ExecutorOptions& opts) { return std::make_unique<HostExecutor>(opts); }

}  // namespace ws
