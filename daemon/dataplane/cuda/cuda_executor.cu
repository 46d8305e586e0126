// CUDA executor: per destination device a few streams ("lanes", so Runs of
// different trainer ranks overlap); all kernel-path ops of a Run() go out as
// ONE launch per device; large same-dtype pieces go to the copy engines
// (cudaMemcpy2DAsync), large zero fills to cudaMemset2DAsync.
//
// The kernel works in tiles of kTile consecutive destination elements of one
// op: a block finds its tile's op once (binary search over a prefix sum of
// tile counts), splits the flat index into (row, col) once per thread and
// then steps through the tile, loads before stores, with the per-element
// casts of kernels:: (bit-identical to the host executor). Transposed ops
// instead go in square tiles through shared memory (kernels::
// TransposeTileOrigin/LoadIndex/StoreIndex), so reads and writes both
// coalesce.
//
// A Run is enqueued on one lane under that lane's lock but waited for outside
// it, so the next Run's work is queued while the current one executes; each
// in-flight Run holds one of the lane's kSlots op-upload slots. Waits use
// blocking-sync events (the waiting thread sleeps rather than spins), and
// nothing on the hot path frees device memory (cudaFree synchronizes the
// whole device): outgrown upload buffers are kept until the executor goes.
//
// After a sticky CUDA error (illegal or misaligned address, launch failure)
// the context is unusable: health() reports it and every Run is refused.
#include <algorithm>
#include <array>
#include <atomic>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "daemon/core/thread_annotations.h"
#include "daemon/kernels/copy_math.h"
#include "daemon/dataplane/device_executor.h"
#include "daemon/platform/cuda/cuda_platform.h"
#include "daemon/platform/cuda/cuda_util.h"

namespace ws::cuda {
namespace {

using kernels::CopyOp;

constexpr int kThreads = 256;       // threads per block
constexpr int kUnroll = 4;          // elements loaded per thread before storing
constexpr int64_t kTile = 8192;     // destination elements per tile
constexpr int kLanes = 4;           // streams per device
constexpr int kSlots = 4;           // Runs in flight per lane
constexpr size_t kInitialUpload = 64 << 10;  // op-upload bytes per slot at start
constexpr unsigned kEventFlags = cudaEventDisableTiming | cudaEventBlockingSync;

constexpr int kTT = static_cast<int>(kernels::kTransposeTile);
static_assert(kThreads % kTT == 0, "a block covers whole rows of a transpose tile");

__host__ __device__ inline bool TransposedTiles(const CopyOp& op) { return op.transpose && !op.zero_fill; }

int64_t TilesOf(const CopyOp& op) {
  return TransposedTiles(op) ? op.count * kernels::TransposeTileCount(op)
                             : (op.count * op.rows * op.cols + kTile - 1) / kTile;
}

// Elements [k0, k1) of `op` (flat destination order, k = (b * rows + i) * cols + j).
// S/D: source/destination dtype; T: transpose; Z: zero fill (S unused).
template <uint8_t S, uint8_t D, bool T, bool Z>
__device__ __forceinline__ void CopyTile(const CopyOp& op, int64_t k0, int64_t k1) {
  using Raw = std::conditional_t<S == kernels::kF32, uint32_t, uint16_t>;
  using Out = std::conditional_t<D == kernels::kF32, uint32_t, uint16_t>;
  int64_t k = k0 + threadIdx.x;
  if (k >= k1) return;
  const int64_t cols = op.cols, rows = op.rows;
  int64_t b, i, j;
  kernels::SplitIndex(op, k, &b, &i, &j);
  // (b, i, j) step per kThreads elements
  int64_t db, di, dj;
  kernels::SplitIndex(op, kThreads, &db, &di, &dj);
  const Raw* __restrict__ src = static_cast<const Raw*>(op.src);
  Out* __restrict__ dst = static_cast<Out*>(op.dst);
  for (; k < k1; k += kUnroll * kThreads) {
    Raw v[kUnroll];
    int64_t d[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      d[u] = -1;
      if (k + u * kThreads < k1) {
        d[u] = kernels::DstIndex(op, b, i, j);
        if constexpr (!Z) v[u] = src[kernels::SrcIndex(op, b, i, j)];
      }
      b += db;
      i += di;
      j += dj;
      if (j >= cols) {
        j -= cols;
        ++i;
      }
      if (i >= rows) {
        i -= rows;
        ++b;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (d[u] < 0) continue;
      if constexpr (Z) {
        kernels::StoreFromF32(dst, D, d[u], 0.0f);
      } else if constexpr (S == D) {
        dst[d[u]] = v[u];  // bit copy, as kernels::CopyElement
      } else {
        float f;
        if constexpr (S == kernels::kF32) {
          f = kernels::BitsFloat(v[u]);
        } else if constexpr (S == kernels::kBF16) {
          f = kernels::BF16ToF32(v[u]);
        } else {
          f = kernels::F16ToF32(v[u]);
        }
        kernels::StoreFromF32(dst, D, d[u], f);
      }
    }
  }
}

// Non-transposed ops only (transposes go through TransposeTile).
template <uint8_t S, uint8_t D>
__device__ __forceinline__ void CopyTileT(const CopyOp& op, int64_t k0, int64_t k1) {
  CopyTile<S, D, false, false>(op, k0, k1);
}

// Tile `tile` of a transposed op through `buf` (the block's shared memory):
// both passes are indexed as in kernels::Transpose*Index. Called by the
// whole block (it synchronizes).
template <uint8_t S, uint8_t D>
__device__ __forceinline__ void TransposeTile(const CopyOp& op, int64_t tile, uint32_t (*buf)[kTT + 1]) {
  using Raw = std::conditional_t<S == kernels::kF32, uint32_t, uint16_t>;
  using Out = std::conditional_t<D == kernels::kF32, uint32_t, uint16_t>;
  int64_t i0, j0;
  kernels::TransposeTileOrigin(op, tile, &i0, &j0);
  const int b = threadIdx.x % kTT;
  const Raw* __restrict__ src = static_cast<const Raw*>(op.src);
  Out* __restrict__ dst = static_cast<Out*>(op.dst);
  for (int a = threadIdx.x / kTT; a < kTT; a += kThreads / kTT) {
    int64_t si;
    if (kernels::TransposeLoadIndex(op, i0, j0, a, b, &si)) buf[a][b] = src[si];
  }
  __syncthreads();
  for (int a = threadIdx.x / kTT; a < kTT; a += kThreads / kTT) {
    int64_t di;
    if (!kernels::TransposeStoreIndex(op, i0, j0, a, b, &di)) continue;
    const Raw v = static_cast<Raw>(buf[b][a]);
    if constexpr (S == D) {
      dst[di] = v;  // bit copy, as kernels::CopyElement
    } else {
      float f;
      if constexpr (S == kernels::kF32) {
        f = kernels::BitsFloat(v);
      } else if constexpr (S == kernels::kBF16) {
        f = kernels::BF16ToF32(v);
      } else {
        f = kernels::F16ToF32(v);
      }
      kernels::StoreFromF32(dst, D, di, f);
    }
  }
  __syncthreads();  // buf is reused by the block's next tile
}

__device__ __forceinline__ void RunTransposeTile(const CopyOp& op, int64_t tile, uint32_t (*buf)[kTT + 1]) {
  using namespace kernels;
  switch (op.src_dtype * 3 + op.dst_dtype) {
    case kF32 * 3 + kF32: return TransposeTile<kF32, kF32>(op, tile, buf);
    case kF32 * 3 + kBF16: return TransposeTile<kF32, kBF16>(op, tile, buf);
    case kF32 * 3 + kF16: return TransposeTile<kF32, kF16>(op, tile, buf);
    case kBF16 * 3 + kF32: return TransposeTile<kBF16, kF32>(op, tile, buf);
    case kBF16 * 3 + kBF16: return TransposeTile<kBF16, kBF16>(op, tile, buf);
    case kBF16 * 3 + kF16: return TransposeTile<kBF16, kF16>(op, tile, buf);
    case kF16 * 3 + kF32: return TransposeTile<kF16, kF32>(op, tile, buf);
    case kF16 * 3 + kBF16: return TransposeTile<kF16, kBF16>(op, tile, buf);
    case kF16 * 3 + kF16: return TransposeTile<kF16, kF16>(op, tile, buf);
    default: return;
  }
}

// Dtype codes were checked on the host (ValidateCopyOp); others write nothing.
__device__ __forceinline__ void RunTile(const CopyOp& op, int64_t k0, int64_t k1) {
  using namespace kernels;
  if (op.zero_fill) {
    if (op.dst_dtype == kF32) CopyTile<kF32, kF32, false, true>(op, k0, k1);
    if (op.dst_dtype == kBF16) CopyTile<kF32, kBF16, false, true>(op, k0, k1);
    if (op.dst_dtype == kF16) CopyTile<kF32, kF16, false, true>(op, k0, k1);
    return;
  }
  switch (op.src_dtype * 3 + op.dst_dtype) {
    case kF32 * 3 + kF32: return CopyTileT<kF32, kF32>(op, k0, k1);
    case kF32 * 3 + kBF16: return CopyTileT<kF32, kBF16>(op, k0, k1);
    case kF32 * 3 + kF16: return CopyTileT<kF32, kF16>(op, k0, k1);
    case kBF16 * 3 + kF32: return CopyTileT<kBF16, kF32>(op, k0, k1);
    case kBF16 * 3 + kBF16: return CopyTileT<kBF16, kBF16>(op, k0, k1);
    case kBF16 * 3 + kF16: return CopyTileT<kBF16, kF16>(op, k0, k1);
    case kF16 * 3 + kF32: return CopyTileT<kF16, kF32>(op, k0, k1);
    case kF16 * 3 + kBF16: return CopyTileT<kF16, kBF16>(op, k0, k1);
    case kF16 * 3 + kF16: return CopyTileT<kF16, kF16>(op, k0, k1);
    default: return;
  }
}

// tile_starts[o]: first tile of op o (every op has at least one tile).
__global__ void __launch_bounds__(kThreads) BatchedCopyKernel(const CopyOp* __restrict__ ops,
                                                              const int64_t* __restrict__ tile_starts, int n,
                                                              int64_t total_tiles) {
  __shared__ uint32_t buf[kTT][kTT + 1];  // +1: no bank conflicts on the column pass
  for (int64_t t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    int lo = 0, hi = n - 1;  // last op with tile_starts[op] <= t (uniform across the block)
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (tile_starts[mid] <= t) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const CopyOp op = ops[lo];
    if (TransposedTiles(op)) {  // uniform across the block, so its barriers are safe
      const int64_t per = kernels::TransposeTileCount(op), lt = t - tile_starts[lo];
      RunTransposeTile(kernels::BatchSlice(op, lt / per), lt % per, buf);
      continue;
    }
    const int64_t k0 = (t - tile_starts[lo]) * kTile;
    const int64_t n = op.count * op.rows * op.cols;
    RunTile(op, k0, k0 + kTile < n ? k0 + kTile : n);
  }
}

using kernels::ElemSize;

std::string LabelsOf(const std::vector<std::string>& labels) {
  std::string s;
  for (size_t i = 0; i < labels.size() && i < 3; ++i) s += (i ? ", " : "") + labels[i];
  if (labels.size() > 3) s += ", ... (" + std::to_string(labels.size()) + " ops)";
  return s;
}

// Op-upload buffers of one in-flight Run. `done` is recorded after the
// Run's last piece; the slot is reused only once it has fired.
struct Slot {
  cudaEvent_t done = nullptr;
  bool used = false;          // `done` has been recorded at least once
  void* dev_buf = nullptr;
  void* host_buf = nullptr;   // pinned staging for the op array
  size_t cap = 0;
  // Outgrown buffers, freed with the executor: cudaFree/cudaFreeHost would
  // synchronize the device on the hot path.
  std::vector<std::pair<void*, void*>> retired;

  Slot() = default;
  Slot(const Slot&) = delete;  // owns device/pinned buffers and an event, freed by Free()
  Slot& operator=(const Slot&) = delete;

  Status Reserve(size_t bytes, const std::string& what) {
    if (bytes <= cap) return Status::Ok();
    size_t want = std::max(bytes, cap * 2);
    void* d = nullptr;
    void* h = nullptr;
    WS_CUDA_RETURN(cudaMalloc(&d, want), what);
    if (cudaError_t e = cudaMallocHost(&h, want); e != cudaSuccess) {
      retired.emplace_back(d, nullptr);
      return CudaError(e, "cudaMallocHost", what);
    }
    if (dev_buf || host_buf) retired.emplace_back(dev_buf, host_buf);
    dev_buf = d;
    host_buf = h;
    cap = want;
    return Status::Ok();
  }

  void Free() {
    retired.emplace_back(dev_buf, host_buf);
    for (auto [d, h] : retired) {
      if (d) cudaFree(d);
      if (h) cudaFreeHost(h);
    }
    retired.clear();
    dev_buf = host_buf = nullptr;
    if (done) cudaEventDestroy(done);
    done = nullptr;
  }
};

// One stream of a device and its upload slots. `mu` is held while a Run
// enqueues (slots are handed out one at a time), not while it waits.
struct Lane {
  Mutex mu;
  cudaStream_t stream = nullptr;  // set by Init, before any Run
  std::array<Slot, kSlots> slots WS_GUARDED_BY(mu);
  size_t next_slot WS_GUARDED_BY(mu) = 0;

  // The next slot, once its previous Run has completed.
  Result<Slot*> TakeSlot(const std::string& what) WS_REQUIRES(mu) {
    Slot* s = &slots[next_slot];
    next_slot = (next_slot + 1) % kSlots;
    if (s->used) WS_CUDA_RETURN(cudaEventSynchronize(s->done), what + " (waiting for an upload slot)");
    return s;
  }
};

struct DeviceState {
  int device = -1;
  int sms = 1;
  int blocks_per_sm = 1;  // resident BatchedCopyKernel blocks per SM
  std::array<Lane, kLanes> lanes;
  std::atomic<unsigned> next_lane{0};

  // Init and the destructor run while no Run can: the lanes' locks are not taken.
  ~DeviceState() WS_NO_THREAD_SAFETY_ANALYSIS {
    ScopedDevice scoped(device);
    for (Lane& l : lanes) {
      if (l.stream) cudaStreamSynchronize(l.stream);
      for (Slot& s : l.slots) s.Free();
      if (l.stream) cudaStreamDestroy(l.stream);
    }
  }

  Status Init(int d) WS_NO_THREAD_SAFETY_ANALYSIS {
    device = d;
    const std::string what = "CUDA executor on device " + std::to_string(d);
    ScopedDevice scoped(d);
    WS_CUDA_RETURN(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d), what);
    WS_CUDA_RETURN(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, BatchedCopyKernel, kThreads, 0), what);
    blocks_per_sm = std::max(1, blocks_per_sm);
    for (Lane& l : lanes) {
      WS_CUDA_RETURN(cudaStreamCreateWithFlags(&l.stream, cudaStreamNonBlocking), what);
      for (Slot& s : l.slots) {
        WS_CUDA_RETURN(cudaEventCreateWithFlags(&s.done, kEventFlags), what);
        WS_RETURN_IF_ERROR(s.Reserve(kInitialUpload, what));
      }
    }
    return Status::Ok();
  }

  Lane& NextLane() { return lanes[next_lane.fetch_add(1, std::memory_order_relaxed) % kLanes]; }
};

struct DeviceWork {
  std::vector<CopyOp> kernel_ops;
  std::vector<std::string> kernel_labels;
  std::vector<std::pair<CopyOp, std::string>> engine_ops;  // memcpy / memset pieces
};

class CudaExecutor final : public Executor {
 public:
  explicit CudaExecutor(const DeviceExecutorOptions& opts) : opts_(opts) {}

  Status Init(int n) {
    for (int d = 0; d < n; ++d) {
      devs_.push_back(std::make_unique<DeviceState>());
      WS_RETURN_IF_ERROR(devs_.back()->Init(d));
    }
    // Kernels read peer memory directly where the topology allows it; ops
    // that would need a pair without peer access are refused per op.
    peer_.assign(n, std::vector<bool>(n, false));
    for (int a = 0; a < n; ++a) {
      peer_[a][a] = true;
      for (int b = 0; b < n; ++b) {
        int can = 0;
        if (a == b || cudaDeviceCanAccessPeer(&can, a, b) != cudaSuccess || !can) continue;
        ScopedDevice scoped(a);
        cudaError_t e = cudaDeviceEnablePeerAccess(b, 0);
        peer_[a][b] = e == cudaSuccess || e == cudaErrorPeerAccessAlreadyEnabled;
        cudaGetLastError();
      }
    }
    return Status::Ok();
  }

  Result<uint64_t> RunValidated(const std::vector<CopyOp>& ops, const OpNamer& name) override {
    if (Status h = health(); !h.ok()) return h;
    std::vector<DeviceWork> work(devs_.size());
    uint64_t bytes = 0;
    for (size_t i = 0; i < ops.size(); ++i) {
      std::string label = name(i);
      CopyOp op = ops[i];
      if (op.rows <= 0 || op.cols <= 0) continue;
      const uint64_t op_bytes = static_cast<uint64_t>(op.count * op.rows * op.cols) * ElemSize(op.dst_dtype);
      const int dd = PointerDevice(op.dst);
      const int sd = op.zero_fill ? -1 : PointerDevice(op.src);
      const int dev = dd >= 0 ? dd : sd;
      if (dev < 0 || dev >= static_cast<int>(devs_.size())) {
        return InvalidArgument(label + ": neither source nor destination is memory of a visible CUDA device");
      }
      if (opts_.pin_host) {  // host memory is pinned when a device copy first needs it
        const std::array<const void*, 2> host_sides = {dd < 0 ? op.dst : nullptr,
                                                       !op.zero_fill && sd < 0 ? op.src : nullptr};
        for (const void* p : host_sides) {
          if (p == nullptr) continue;
          Status st = opts_.pin_host(p);
          if (!st.ok() && st.code() != Code::kNotFound) return st.WithContext(label);
        }
      }
      const bool contiguous_src = op.rows == 1 || op.src_ld >= op.cols;
      // Batched ops always go to the kernel (cudaMemcpy2D has no third dimension).
      const bool engine = op_bytes >= opts_.memcpy_min_bytes && !op.transpose && op.count == 1 &&
                          ((op.zero_fill && dd >= 0) || (!op.zero_fill && op.src_dtype == op.dst_dtype && contiguous_src));
      if (engine) {
        work[dev].engine_ops.emplace_back(op, std::move(label));
      } else {
        WS_RETURN_IF_ERROR(ResolveForKernel(&op, dev, dd, sd, label));
        work[dev].kernel_ops.push_back(op);
        work[dev].kernel_labels.push_back(std::move(label));
      }
      bytes += op_bytes;
    }

    // Enqueue on every device (one lock at a time), then wait for each
    // Run's own completion event without holding any lock.
    Status first_error;
    std::vector<std::pair<int, cudaEvent_t>> enqueued;
    for (size_t d = 0; d < devs_.size(); ++d) {
      if (work[d].kernel_ops.empty() && work[d].engine_ops.empty()) continue;
      auto ev = Enqueue(*devs_[d], work[d], &first_error);
      if (ev.ok()) {
        enqueued.emplace_back(static_cast<int>(d), *ev);  // wait even after a failure: pieces may be in flight
      } else if (first_error.ok()) {
        first_error = ev.status();
      }
    }
    for (auto [d, done] : enqueued) {
      ScopedDevice scoped(d);
      cudaError_t e = cudaEventSynchronize(done);
      cudaEventDestroy(done);
      if (e != cudaSuccess && first_error.ok()) {
        std::vector<std::string> all = work[d].kernel_labels;
        for (auto& [op, l] : work[d].engine_ops) all.push_back(l);
        (void)(first_error = CudaError(e, "cudaEventSynchronize",
                                       "copies into device " + std::to_string(d) + " for " + LabelsOf(all)));
      }
    }
    if (!first_error.ok()) return first_error;
    return bytes;
  }

  int threads() const override { return static_cast<int>(devs_.size()); }

  Status health() const override {
    const auto e = static_cast<cudaError_t>(FirstStickyError().load());
    if (e == cudaSuccess) return Status::Ok();
    return Internal(std::string("the CUDA context is unusable after ") + cudaGetErrorName(e) + ": " +
                    cudaGetErrorString(e) + " (a sticky error: every later CUDA call fails; restart the process)");
  }

 private:
  // Kernel-path pointers must be device-addressable: peer memory needs peer
  // access, host memory must be registered (PinHostRange) and is replaced by
  // its device alias.
  Status ResolveForKernel(CopyOp* op, int dev, int dd, int sd, const std::string& label) {
    auto host_alias = [&](const void* p, const char* side) -> Result<void*> {
      cudaPointerAttributes attr;
      cudaError_t e = cudaPointerGetAttributes(&attr, p);
      if (e != cudaSuccess || attr.type != cudaMemoryTypeHost || attr.devicePointer == nullptr) {
        cudaGetLastError();
        std::string why = PinFailureFor(p);
        return FailedPrecondition(label + ": " + side +
                                  " is host memory not registered with CUDA, so the copy kernel cannot read it" +
                                  (why.empty() ? std::string(" (map it through the CUDA-enabled memory domain)")
                                               : "; " + why));
      }
      return attr.devicePointer;
    };
    auto peer_ok = [&](int other, const char* side) -> Status {
      if (!peer_[dev][other]) {
        return FailedPrecondition(label + ": " + side + " is on device " + std::to_string(other) + " and device " +
                                  std::to_string(dev) + " has no peer access to it");
      }
      return Status::Ok();
    };
    if (dd < 0) {
      WS_ASSIGN_OR_RETURN(op->dst, host_alias(op->dst, "destination"));
    }
    if (!op->zero_fill) {
      if (sd < 0) {
        WS_ASSIGN_OR_RETURN(void* s, host_alias(op->src, "source"));
        op->src = s;
      } else {
        WS_RETURN_IF_ERROR(peer_ok(sd, "source"));
      }
    }
    return Status::Ok();
  }

  // Queues `w` on the device's stream and returns a new event recorded after
  // it (the caller waits on and destroys it). The event is recorded even
  // after a failed enqueue, so the caller waits for whatever did get queued;
  // the failure goes to *error. No event (an error) means nothing to wait for.
  Result<cudaEvent_t> Enqueue(DeviceState& ds, const DeviceWork& w, Status* error) {
    const std::string what = "device " + std::to_string(ds.device);
    ScopedDevice scoped(ds.device);
    cudaEvent_t done = nullptr;
    WS_CUDA_RETURN(cudaEventCreateWithFlags(&done, kEventFlags), what);
    Lane& lane = ds.NextLane();
    MutexLock lock(&lane.mu);
    Status st = EnqueueBody(ds, lane, w);
    if (!st.ok() && error->ok()) *error = st;
    cudaError_t e = cudaEventRecord(done, lane.stream);
    if (e != cudaSuccess) {
      cudaEventDestroy(done);
      // Nothing marks the end of what was queued: wait for the whole stream.
      cudaStreamSynchronize(lane.stream);
      return CudaError(e, "cudaEventRecord", what);
    }
    return done;
  }

  Status EnqueueBody(const DeviceState& ds, Lane& lane, const DeviceWork& w) WS_REQUIRES(lane.mu) {
    cudaStream_t stream = lane.stream;
    for (const auto& [op, label] : w.engine_ops) {
      const size_t es = ElemSize(op.dst_dtype);
      char* dst = static_cast<char*>(op.dst) + op.dst_offset * es;
      const size_t width = static_cast<size_t>(op.cols) * es;
      const size_t dpitch = static_cast<size_t>(op.rows > 1 ? op.dst_ld : op.cols) * es;
      if (op.zero_fill) {
        WS_CUDA_RETURN(cudaMemset2DAsync(dst, dpitch, 0, width, op.rows, stream), label);
        continue;
      }
      const char* src = static_cast<const char*>(op.src) + op.src_offset * es;
      const size_t spitch = static_cast<size_t>(op.rows > 1 ? op.src_ld : op.cols) * es;
      if (dpitch == width && spitch == width) {
        WS_CUDA_RETURN(cudaMemcpyAsync(dst, src, width * op.rows, cudaMemcpyDefault, stream), label);
      } else {
        WS_CUDA_RETURN(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, op.rows, cudaMemcpyDefault, stream), label);
      }
    }
    if (!w.kernel_ops.empty()) {
      const std::string what = "copy kernel on device " + std::to_string(ds.device) + " for " + LabelsOf(w.kernel_labels);
      const int n = static_cast<int>(w.kernel_ops.size());
      const size_t ops_bytes = n * sizeof(CopyOp);
      WS_ASSIGN_OR_RETURN(Slot * slot, lane.TakeSlot(what));
      WS_RETURN_IF_ERROR(slot->Reserve(ops_bytes + n * sizeof(int64_t), what));
      auto* hops = static_cast<CopyOp*>(slot->host_buf);
      auto* hstarts = reinterpret_cast<int64_t*>(static_cast<char*>(slot->host_buf) + ops_bytes);
      int64_t tiles = 0;
      for (int i = 0; i < n; ++i) {
        hops[i] = w.kernel_ops[i];
        hstarts[i] = tiles;
        tiles += TilesOf(w.kernel_ops[i]);
      }
      WS_CUDA_RETURN(cudaMemcpyAsync(slot->dev_buf, slot->host_buf, ops_bytes + n * sizeof(int64_t),
                                     cudaMemcpyHostToDevice, stream),
                     what);
      const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t{ds.sms} * ds.blocks_per_sm));
      // Clear errors left on this thread by earlier calls, so the check
      // below reports this launch only (a sticky error would show anyway).
      cudaGetLastError();
      BatchedCopyKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          static_cast<const CopyOp*>(slot->dev_buf),
          reinterpret_cast<const int64_t*>(static_cast<const char*>(slot->dev_buf) + ops_bytes), n, tiles);
      const cudaError_t launched = cudaGetLastError();
      slot->used = true;  // busy until everything queued before its event has run
      WS_CUDA_RETURN(cudaEventRecord(slot->done, stream), what);
      if (launched != cudaSuccess) return CudaError(launched, "BatchedCopyKernel<<<...>>>", what);
    }
    return Status::Ok();
  }

  DeviceExecutorOptions opts_;
  std::vector<std::unique_ptr<DeviceState>> devs_;
  std::vector<std::vector<bool>> peer_;  // peer_[a][b]: kernels on a may read b's memory
};

}  // namespace

}  // namespace ws::cuda

namespace ws {

Result<std::unique_ptr<Executor>> MakeDeviceExecutor(const DeviceExecutorOptions& opts) {
  WS_ASSIGN_OR_RETURN(int n, cuda::DeviceCount());
  auto ex = std::make_unique<cuda::CudaExecutor>(opts);
  WS_RETURN_IF_ERROR(ex->Init(n));
  return std::unique_ptr<Executor>(std::move(ex));
}

}  // namespace ws
