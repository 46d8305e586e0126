// push: a stand-in FSDP trainer. Every tensor of a checkpoint is split across
// W ranks as FSDP2 does (torch.chunk along dim 0, or dim 1 for 2-D tensors
// with --shard-dim 1); each rank's shards are packed into one buffer and
// pushed layer by layer over the rank's own connection.
//
// --device host (default): one shm object per rank, a thread per rank (or,
// with --processes, a process per rank). --device cuda[:N]: one
// cudaMalloc'ed buffer per rank, always a process per rank (a process cannot
// open its own CUDA IPC handles). Rank processes are forked before any CUDA
// or gRPC state exists (neither survives fork); rank 0 begins and commits,
// and the ranks meet at a process-shared barrier around each step of a sync.
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "client/cpp/client.h"
#include "client/cpp/fsdp.h"
#include "client/cpp/safetensors.h"
#include "client/cpp/shm.h"
#include "client/ctl/commands.h"
#include "client/ctl/parallel.h"
#include "client/ctl/cuda_buffers.h"
#include "daemon/core/posix_handles.h"

namespace ws::ctl {
namespace {

struct Tensor {
  std::string name;
  Shape shape;
  DType dtype = DType::kF32;
  const uint8_t* data = nullptr;     // null for injected tensors (zeros)
  std::vector<ShardSpec> shards;     // as split (the data layout)
  std::vector<uint64_t> offset;      // per shard: byte offset in its rank's buffer
  std::vector<uint64_t> bytes;       // per shard
};

struct Layer {
  std::string key;
  std::vector<size_t> tensors;
};

// Everything the ranks share, built before any rank starts.
struct Plan {
  std::vector<Tensor> tensors;
  std::vector<Layer> layers;
  std::vector<uint64_t> rank_bytes;  // size of each rank's buffer
  uint64_t trainer_bytes = 0;
  pb::BeginSyncRequest begin;        // the manifest (version set per sync), with rank_nodes
  std::vector<std::string> rank_daemon;  // per rank: the address of the daemon it talks to
  std::vector<int64_t> manifest_index;  // per tensor: its position in begin.tensors (-1: not sent)
};

// A 64-bit FNV-1a digest of the manifest as serialized (version unset), as
// hex: BeginSyncRequest.manifest_fingerprint.
std::string Fingerprint(const pb::BeginSyncRequest& begin) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : begin.SerializeAsString()) h = (h ^ c) * 1099511628211ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// BeginSync, naming the manifest by its fingerprint after the first sync
// (the daemon then reuses the manifest, and its plan when the engines are
// unchanged); the full manifest when the daemon keeps none under it.
Result<pb::BeginSyncResponse> Begin(WeightSyncClient& client, const pb::BeginSyncRequest& full, bool* sent_before) {
  if (*sent_before) {
    pb::BeginSyncRequest lean;
    lean.set_model(full.model());
    lean.set_version(full.version());
    lean.set_world_size(full.world_size());
    lean.set_negotiate_dtypes(full.negotiate_dtypes());
    lean.set_manifest_fingerprint(full.manifest_fingerprint());
    lean.set_reuse_manifest(true);
    *lean.mutable_rank_nodes() = full.rank_nodes();
    auto r = client.BeginSync(lean);
    if (r.ok() || r.status().code() != Code::kNotFound) return r;
  }
  auto r = client.BeginSync(full);
  if (r.ok()) *sent_before = true;
  return r;
}

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string Fixed(double v, int prec) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}


// Names in natural order: runs of digits compare as numbers
// ("experts.2." before "experts.10."), as a trainer's module walk meets them.
bool NaturalLess(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  while (i < a.size() && j < b.size()) {
    if (digit(a[i]) && digit(b[j])) {
      size_t ie = i, je = j;
      while (ie < a.size() && digit(a[ie])) ++ie;
      while (je < b.size() && digit(b[je])) ++je;
      size_t i0 = i, j0 = j;  // skip leading zeros, then longer is larger
      while (i0 + 1 < ie && a[i0] == '0') ++i0;
      while (j0 + 1 < je && b[j0] == '0') ++j0;
      if (ie - i0 != je - j0) return ie - i0 < je - j0;
      if (int c = a.compare(i0, ie - i0, b, j0, je - j0); c != 0) return c < 0;
      if (ie - i != je - j) return ie - i < je - j;
      i = ie;
      j = je;
      continue;
    }
    if (a[i] != b[j]) return a[i] < b[j];
    ++i;
    ++j;
  }
  return a.size() - i < b.size() - j;
}

// Splits the checkpoint, lays out each rank's buffer and builds the manifest
// (with --inject applied). Errors are returned as the message to print.
Result<Plan> MakePlan(const st::Checkpoint& ckpt, const PushOptions& o) {
  const uint32_t W = o.world_size;
  Plan p;
  std::vector<Tensor>& tensors = p.tensors;
  for (const st::TensorInfo& t : ckpt.tensors()) {
    if (!t.dtype) {
      Err("weightsyncctl push: skipping tensor \"" + t.name + "\" of unsupported dtype " + t.dtype_name);
      continue;
    }
    tensors.push_back({t.name, t.shape, *t.dtype, t.data, {}, {}, {}});
  }
  if (o.inject == "unknown-tensor") {
    tensors.push_back({"model.bogus.weight", {8}, DType::kF32, nullptr, {}, {}, {}});
    Err("weightsyncctl push: --inject unknown-tensor applied to tensor \"model.bogus.weight\"");
  }

  // In a trainer's order (safetensors headers sort names as strings:
  // experts 0, 1, 10, 100, ...), so that the shards of consecutive experts
  // lie at constant strides in each rank's buffer, as a trainer lays them out.
  std::stable_sort(tensors.begin(), tensors.end(),
                   [](const Tensor& a, const Tensor& b) { return NaturalLess(a.name, b.name); });

  // Split and lay out each rank's buffer.
  p.rank_bytes.assign(W, 0);
  for (Tensor& t : tensors) {
    t.shards = fsdp::SplitTensor(t.shape, W, o.shard_dim);
    for (const ShardSpec& s : t.shards) {
      uint64_t& off = p.rank_bytes[s.rank];
      off = (off + 63) / 64 * 64;
      const uint64_t n = fsdp::ShardBytes(t.shape, DTypeSize(t.dtype), s);
      t.offset.push_back(off);
      t.bytes.push_back(n);
      off += n;
      p.trainer_bytes += n;
    }
  }

  // The metadata manifest (with --inject applied).
  SourceManifest manifest;
  manifest.model = o.model;
  manifest.world_size = W;
  for (const Tensor& t : tensors) manifest.tensors.push_back(SourceTensor{t.name, t.shape, t.dtype, t.shards});
  pb::BeginSyncRequest& begin = p.begin;
  protocol::ToProto(manifest, &begin);
  std::vector<bool> in_manifest(tensors.size(), true);
  auto first = [&](auto pred) -> int {
    for (int i = 0; i < begin.tensors_size(); ++i)
      if (pred(begin.tensors(i))) return i;
    return -1;
  };
  if (const std::string& k = o.inject; !k.empty() && k != "unknown-tensor" && k != "oob-memref") {
    int i = -1;
    if (k == "wrong-shape") {
      i = first([](const pb::SourceTensor& t) { return t.shape_size() == 2; });
      if (i >= 0) begin.mutable_tensors(i)->set_shape(0, begin.tensors(i).shape(0) + 1);
    } else if (k == "wrong-dtype") {
      i = first([](const pb::SourceTensor& t) { return t.dtype() == pb::DTYPE_F32; });
      if (i >= 0) begin.mutable_tensors(i)->set_dtype(pb::DTYPE_UNSPECIFIED);
    } else if (k == "overlap" || k == "gap") {
      i = first([](const pb::SourceTensor& t) { return t.shards_size() >= 2; });
      if (i >= 0) {
        pb::ShardSpec* s = begin.mutable_tensors(i)->mutable_shards(0);
        s->set_length(s->length() + (k == "overlap" ? 1 : -1));
      }
    } else if (k == "drop-tensor") {
      i = begin.tensors_size() > 0 ? 0 : -1;
      if (i >= 0) {
        begin.mutable_tensors()->DeleteSubrange(0, 1);
        in_manifest[0] = false;
      }
    }
    if (i < 0) return InvalidArgument("--inject " + k + ": the checkpoint has no tensor it applies to");
    Err("weightsyncctl push: --inject " + k + " applied to tensor \"" + tensors[static_cast<size_t>(i)].name + "\"");
  }

  begin.set_manifest_fingerprint(Fingerprint(begin));
  p.manifest_index.assign(tensors.size(), -1);
  for (size_t i = 0, m = 0; i < tensors.size(); ++i)
    if (in_manifest[i]) p.manifest_index[i] = static_cast<int64_t>(m++);

  // Layers, in checkpoint order.
  std::vector<std::string> names;
  std::vector<size_t> index;
  for (size_t i = 0; i < tensors.size(); ++i)
    if (in_manifest[i]) {
      names.push_back(tensors[i].name);
      index.push_back(i);
    }
  for (const fsdp::LayerGroup& lg : fsdp::GroupByLayer(names)) {
    Layer l{lg.key, {}};
    for (size_t m : lg.members) l.tensors.push_back(index[m]);
    p.layers.push_back(std::move(l));
  }
  return p;
}

// Fills the memory reference of [offset, offset + length) of rank r's buffer.
using RefFn = std::function<void(uint32_t r, uint64_t offset, uint64_t length, pb::MemoryRef* ref)>;

// Rank r's message for one layer (no shards: nothing to send): its shards by
// manifest index and offset in the rank's buffer. With --inject oob-memref
// the first shard rank 0 sends points past its buffer.
pb::LayerData LayerMessage(const Plan& p, const PushOptions& o, uint64_t sync_id, uint32_t r, const Layer& layer,
                           const RefFn& ref, bool* oob_done, bool say_oob) {
  pb::LayerData msg;
  msg.set_sync_id(sync_id);
  msg.set_rank(r);
  msg.set_layer(layer.key);
  for (size_t ti : layer.tensors) {
    const Tensor& t = p.tensors[ti];
    for (size_t k = 0; k < t.shards.size(); ++k) {
      if (t.shards[k].rank != r) continue;
      uint64_t offset = t.offset[k];
      if (o.inject == "oob-memref" && r == 0 && !*oob_done) {
        offset = p.rank_bytes[r] + 64;
        *oob_done = true;
        if (say_oob) Err("weightsyncctl push: --inject oob-memref applied to tensor \"" + t.name + "\"");
      }
      msg.add_tensor_index(static_cast<uint32_t>(p.manifest_index[ti]));
      msg.add_offset(offset);
    }
  }
  if (msg.tensor_index_size() > 0) ref(r, 0, p.rank_bytes[r], msg.mutable_memory());
  return msg;
}

struct SyncReport {
  uint64_t version = 0, sync_id = 0;
  pb::BeginSyncResponse started;
  pb::SyncStats stats;
  double begin_s = 0, push_s = 0, commit_s = 0, client_s = 0;
};

void PrintSync(const PushOptions& o, const Plan& p, const SyncReport& r) {
  const pb::SyncStats& s = r.stats;
  if (o.json) {
    nlohmann::ordered_json j;
    j["model"] = o.model;
    j["version"] = r.version;
    j["sync_id"] = r.sync_id;
    j["world_size"] = o.world_size;
    j["device"] = o.device;
    j["engines"] = r.started.engines();
    j["copy_ops"] = r.started.copy_ops();
    j["plan_reused"] = r.started.plan_reused();
    j["manifest_reused"] = r.started.manifest_reused();
    j["bytes_planned"] = r.started.bytes_planned();
    j["bytes_written"] = s.bytes_written();
    j["bytes_read"] = s.bytes_read();
    j["trainer_bytes"] = p.trainer_bytes;
    j["tensors"] = p.begin.tensors_size();
    j["layers"] = p.layers.size();
    j["daemon_seconds"] = s.seconds();
    j["daemon_gbps"] = s.gbps();
    j["client_seconds"] = r.client_s;
    j["client_gbps"] = r.client_s > 0 ? static_cast<double>(s.bytes_written()) / r.client_s / 1e9 : 0.0;
    j["begin_seconds"] = r.begin_s;
    j["push_seconds"] = r.push_s;
    j["commit_seconds"] = r.commit_s;
    j["state"] = s.state();
    Out(j.dump());
  } else {
    Out("committed model " + o.model + " version " + std::to_string(r.version) + ": " +
        std::to_string(s.bytes_written()) + " bytes in " + Fixed(s.seconds(), 3) + " s (" + Fixed(s.gbps(), 2) +
        " GB/s)");
  }
}

// Collects the first failure and cancels every open stream.
class Failure {
 public:
  void Register(uint32_t rank, PushStream* s) {
    std::lock_guard<std::mutex> l(mu_);
    streams_[rank] = s;
    if (!status_.ok()) s->Cancel();
  }
  void Unregister(uint32_t rank) {
    std::lock_guard<std::mutex> l(mu_);
    streams_.erase(rank);
  }
  // Returns true for the first failure.
  bool Set(uint32_t rank, const Status& s) {
    std::lock_guard<std::mutex> l(mu_);
    if (!status_.ok()) return false;
    status_ = s.WithContext("rank " + std::to_string(rank));
    for (auto& [r, st] : streams_)
      if (r != rank) st->Cancel();
    return true;
  }
  bool failed() const {
    std::lock_guard<std::mutex> l(mu_);
    return !status_.ok();
  }
  Status status() const {
    std::lock_guard<std::mutex> l(mu_);
    return status_;
  }

 private:
  mutable std::mutex mu_;
  std::map<uint32_t, PushStream*> streams_;
  Status status_;
};

int Fail(const std::string& m) {
  Err("weightsyncctl push: " + m);
  return 1;
}

// What one rank's push loop needs from the driver that runs the ranks (a
// thread per rank, PushHost, or a process per rank, RankMain).
struct RankHooks {
  std::function<bool()> stopped;                          // another rank failed: stop sending
  std::function<void(PushStream*)> opened = [](PushStream*) {};  // the stream, valid until closed()
  std::function<void()> closed = [] {};                   // the stream is about to go away
  std::function<void()> crash;  // --crash-after-layers on rank 0: end like a killed trainer
};

// Rank r's part of one sync: its layers in order over its own Push stream,
// each acknowledged before the next is sent, then Finish. Ok when done, or
// when stopped because another rank failed (the stream is cancelled); else
// the first error, naming the layer it happened in.
// `cache` (may be null): rank r's layer messages, one per layer of p.layers,
// built on first use and reused by later syncs with only their sync_id
// changed; for memory references that stay the same across syncs.
Status PushRank(WeightSyncClient& client, const Plan& p, const PushOptions& o, uint64_t sync_id, uint32_t r,
                const RefFn& ref, bool first_sync, const RankHooks& h, std::vector<pb::LayerData>* cache = nullptr) {
  auto stream = client.OpenPush();
  if (!stream.ok()) return stream.status();
  h.opened(stream->get());
  struct Closer {
    const RankHooks& h;
    ~Closer() { h.closed(); }
  } closer{h};
  if (r == 0 && o.crash_after_layers == 0) h.crash();
  int64_t acks = 0;
  bool oob_done = false;
  for (size_t li = 0; li < p.layers.size(); ++li) {
    const Layer& layer = p.layers[li];
    if (h.stopped()) break;
    pb::LayerData fresh;
    pb::LayerData* msg = &fresh;
    if (cache != nullptr) {
      if (cache->size() == li) cache->push_back(LayerMessage(p, o, sync_id, r, layer, ref, &oob_done, first_sync));
      msg = &(*cache)[li];  // layers are visited in order: entry li is this layer's
      msg->set_sync_id(sync_id);
    } else {
      fresh = LayerMessage(p, o, sync_id, r, layer, ref, &oob_done, first_sync);
    }
    if (msg->tensor_index_size() == 0) continue;
    if (Status s = (*stream)->Send(*msg); !s.ok()) return s.WithContext("layer " + layer.key);
    auto ack = (*stream)->Read();
    if (!ack.ok()) return ack.status().WithContext("layer " + layer.key);
    if (r == 0 && ++acks == o.crash_after_layers) h.crash();  // a real disconnect: nothing is closed
  }
  if (h.stopped()) {
    (*stream)->Cancel();
    return Status::Ok();
  }
  return (*stream)->Finish();
}

// ---------------------------------------------------------------- host: a thread per rank

int PushHost(const GlobalOptions& g, const PushOptions& o, const Plan& p) {
  const uint32_t W = o.world_size;
  const std::vector<Tensor>& tensors = p.tensors;
  std::vector<ShmObject> shm(W);
  for (uint32_t r = 0; r < W; ++r) {
    auto obj = ShmObject::Create(ShmObject::UniqueName("trainer" + std::to_string(r)), p.rank_bytes[r]);
    if (!obj.ok()) return Fail(obj.status().ToString());
    shm[r] = std::move(*obj);
  }
  ParallelFor(tensors.size(), [&](size_t i) {
    const Tensor& t = tensors[i];
    for (size_t k = 0; k < t.shards.size(); ++k) {
      uint8_t* dst = shm[t.shards[k].rank].data() + t.offset[k];
      if (t.data == nullptr)
        std::memset(dst, 0, t.bytes[k]);
      else
        fsdp::PackShard(t.data, t.shape, DTypeSize(t.dtype), t.shards[k], dst);
    }
  });
  const RefFn ref = [&](uint32_t r, uint64_t offset, uint64_t length, pb::MemoryRef* m) {
    pb::HostShmRef* h = m->mutable_host_shm();
    h->set_name(shm[r].name());
    h->set_offset(offset);
    h->set_length(length);
  };

  // One connection per rank, made before the clock starts.
  std::vector<std::unique_ptr<WeightSyncClient>> clients;
  for (uint32_t r = 0; r < W; ++r) {
    clients.push_back(std::make_unique<WeightSyncClient>(p.rank_daemon[r], g.client));
    if (Status s = clients.back()->Connect(); !s.ok()) return Fail("rank " + std::to_string(r) + ": " + s.ToString());
  }

  pb::BeginSyncRequest begin = p.begin;
  bool sent_before = false;
  // Each rank's layer messages, kept across the repeated syncs (the shm
  // objects stay the same); not with --inject, whose messages are one-offs.
  std::vector<std::vector<pb::LayerData>> messages(W);
  const bool keep_messages = o.inject.empty();
  for (uint32_t rep = 0; rep < o.repeat; ++rep) {
    SyncReport rpt;
    rpt.version = o.version + rep;
    begin.set_version(rpt.version);
    const auto t0 = Clock::now();
    auto started = Begin(*clients[0], begin, &sent_before);
    if (!started.ok())
      return Fail("BeginSync version " + std::to_string(rpt.version) + ": " + started.status().ToString());
    rpt.started = *started;
    const uint64_t sync_id = rpt.sync_id = started->sync_id();
    rpt.begin_s = Since(t0);

    Failure failure;
    std::atomic<bool> aborted{false};
    auto abort_sync = [&](uint32_t r, const Status& s) {
      if (failure.Set(r, s) && !aborted.exchange(true)) {
        (void)clients[r]->Abort(sync_id, "trainer rank " + std::to_string(r) + ": " + s.ToString());
        // The leader too (rank 0's daemon), should the rank's own daemon be the one lost.
        if (p.rank_daemon[r] != p.rank_daemon[0])
          (void)clients[0]->Abort(sync_id, "trainer rank " + std::to_string(r) + ": " + s.ToString());
      }
    };
    std::vector<RankHooks> hooks(W);
    for (uint32_t r = 0; r < W; ++r) {
      hooks[r].stopped = [&] { return failure.failed(); };
      hooks[r].opened = [&, r](PushStream* s) { failure.Register(r, s); };
      hooks[r].closed = [&, r] { failure.Unregister(r); };
      hooks[r].crash = [&] {
        for (ShmObject& s : shm) ::shm_unlink(s.name().c_str());
        ::_exit(17);
      };
    }
    const auto t1 = Clock::now();
    std::vector<std::thread> threads;
    for (uint32_t r = 0; r < W; ++r) {
      threads.emplace_back([&, r] {
        if (Status s = PushRank(*clients[r], p, o, sync_id, r, ref, rep == 0, hooks[r],
                                keep_messages ? &messages[r] : nullptr);
            !s.ok())
          abort_sync(r, p.begin.rank_nodes_size() > 0 ? s.WithContext("node " + p.begin.rank_nodes(r)) : s);
      });
    }
    for (auto& t : threads) t.join();
    rpt.push_s = Since(t1);
    if (failure.failed())
      return Fail("sync " + std::to_string(sync_id) + " version " + std::to_string(rpt.version) +
                  " aborted: " + failure.status().ToString());

    const auto t2 = Clock::now();
    auto committed = clients[0]->Commit(sync_id);
    if (!committed.ok()) {
      (void)clients[0]->Abort(sync_id, "commit failed: " + committed.status().ToString());
      return Fail("Commit sync " + std::to_string(sync_id) + " version " + std::to_string(rpt.version) + ": " +
                  committed.status().ToString());
    }
    rpt.commit_s = Since(t2);
    rpt.client_s = Since(t0);
    rpt.stats = committed->stats();
    PrintSync(o, p, rpt);
  }
  return 0;
}

// ---------------------------------------------------------------- CUDA: a process per rank

// Lives in a MAP_SHARED anonymous mapping made before fork. Each flag is
// written only in the phase before the barrier after which every rank reads
// it (a flag read at a later barrier could be set while a slow rank has yet
// to read it, and the ranks would part ways).
struct Shared {
  pthread_barrier_t barrier;
  std::atomic<int> setup_failed{0};   // read after barrier S
  std::atomic<int> begin_failed{0};   // rank 0; read after barrier A
  std::atomic<int> push_failed{0};    // read after barrier B (and between layers)
  std::atomic<int> commit_failed{0};  // rank 0; read after barrier C
  std::atomic<uint64_t> sync_id{0};   // rank 0, before barrier A
  std::atomic<int> failed_rank{-1};   // first rank that recorded an error
  char error[16384];                  // its message, NUL-terminated
};

// Records the first error (message as printed after "weightsyncctl push: ").
bool RecordError(Shared* sh, uint32_t r, const std::string& msg) {
  int expected = -1;
  if (!sh->failed_rank.compare_exchange_strong(expected, static_cast<int>(r))) return false;
  const size_t n = std::min(msg.size(), sizeof(sh->error) - 1);
  std::memcpy(sh->error, msg.data(), n);
  sh->error[n] = '\0';
  return true;
}

void Barrier(Shared* sh) { pthread_barrier_wait(&sh->barrier); }

// The shard's bytes when they are contiguous in the checkpoint (dim-0 shards,
// whole tensors), else nullptr.
const uint8_t* ContiguousShard(const Tensor& t, const ShardSpec& s) {
  if (t.shape.empty()) return t.data;
  if (s.dim != 0) return nullptr;
  uint64_t row = DTypeSize(t.dtype);
  for (size_t i = 1; i < t.shape.size(); ++i) row *= static_cast<uint64_t>(t.shape[i]);
  return t.data + static_cast<uint64_t>(s.start) * row;
}

// Copies rank r's shards into its buffer through copy_in(offset, src, n).
Status LoadRank(const Plan& p, uint32_t r, const std::function<Status(uint64_t, const void*, uint64_t)>& copy_in) {
  std::vector<uint8_t> staging;
  for (const Tensor& t : p.tensors) {
    for (size_t k = 0; k < t.shards.size(); ++k) {
      const ShardSpec& s = t.shards[k];
      if (s.rank != r) continue;
      const uint8_t* src = t.data ? ContiguousShard(t, s) : nullptr;
      if (src == nullptr) {
        staging.assign(t.bytes[k], 0);  // injected tensors are zeros
        if (t.data) fsdp::PackShard(t.data, t.shape, DTypeSize(t.dtype), s, staging.data());
        src = staging.data();
      }
      if (Status st = copy_in(t.offset[k], src, t.bytes[k]); !st.ok()) return st.WithContext("tensor " + t.name);
    }
  }
  return Status::Ok();
}

// Rank r's process. `shm` is its shm object (host; made by the parent, so it
// is unlinked however the rank ends), or null: a device buffer is made here.
int RankMain(const GlobalOptions& g, const PushOptions& o, const Plan& p, const DeviceSpec& dev, uint32_t r,
             const ShmObject* shm, Shared* sh) {
  const std::string tag = "rank " + std::to_string(r);
  // Setup: every rank reaches the barrier, failed or not.
  std::unique_ptr<DeviceBuffer> buf;
  Status st;
  if (shm != nullptr) {
    st = LoadRank(p, r, [&](uint64_t off, const void* src, uint64_t n) {
      std::memcpy(shm->data() + off, src, n);
      return Status::Ok();
    });
  } else if (auto b = DeviceBuffer::Allocate(dev.ordinal, p.rank_bytes[r], "trainer " + tag); !b.ok()) {
    st = b.status();
  } else {
    buf = std::move(b).value();
    st = LoadRank(p, r, [&](uint64_t off, const void* src, uint64_t n) { return buf->CopyIn(off, src, n); });
  }
  std::unique_ptr<WeightSyncClient> client;
  if (st.ok()) {
    client = std::make_unique<WeightSyncClient>(p.rank_daemon[r], g.client);
    st = client->Connect();
  }
  if (!st.ok()) {
    RecordError(sh, r, tag + ": " + st.ToString());
    sh->setup_failed = 1;
  }
  Barrier(sh);  // S: every rank is loaded and connected (or nobody goes on)
  if (sh->setup_failed) return 1;

  const RefFn ref = [&](uint32_t, uint64_t offset, uint64_t length, pb::MemoryRef* m) {
    if (buf) return buf->Ref(offset, length, m->mutable_cuda_ipc());
    pb::HostShmRef* h = m->mutable_host_shm();
    h->set_name(shm->name());
    h->set_offset(offset);
    h->set_length(length);
  };
  pb::BeginSyncRequest begin = p.begin;
  bool sent_before = false;
  for (uint32_t rep = 0; rep < o.repeat; ++rep) {
    SyncReport rpt;
    rpt.version = o.version + rep;
    const auto t0 = Clock::now();
    if (r == 0) {
      begin.set_version(rpt.version);
      auto started = Begin(*client, begin, &sent_before);
      if (started.ok()) {
        rpt.started = *started;
        sh->sync_id = started->sync_id();
      } else {
        RecordError(sh, r, "BeginSync version " + std::to_string(rpt.version) + ": " + started.status().ToString());
        sh->begin_failed = 1;
      }
      rpt.begin_s = Since(t0);
    }
    Barrier(sh);  // A: the sync exists (or nobody goes on)
    if (sh->begin_failed) return 1;
    const uint64_t sync_id = rpt.sync_id = sh->sync_id;
    const std::string where = "sync " + std::to_string(sync_id) + " version " + std::to_string(rpt.version);
    const auto t1 = Clock::now();
    RankHooks hooks;
    hooks.stopped = [&] { return sh->push_failed != 0; };
    hooks.crash = [] { ::_exit(17); };
    if (Status s = PushRank(*client, p, o, sync_id, r, ref, rep == 0, hooks); !s.ok()) {
      if (p.begin.rank_nodes_size() > 0) s = s.WithContext("node " + p.begin.rank_nodes(r));
      sh->push_failed = 1;
      if (RecordError(sh, r, where + " aborted: rank " + std::to_string(r) + ": " + s.ToString()))
        (void)client->Abort(sync_id, "trainer rank " + std::to_string(r) + ": " + s.ToString());
    }
    Barrier(sh);  // B: every rank has pushed (or failed)
    if (sh->push_failed) return 1;
    if (r == 0) {
      rpt.push_s = Since(t1);
      const auto t2 = Clock::now();
      auto committed = client->Commit(sync_id);
      if (!committed.ok()) {
        (void)client->Abort(sync_id, "commit failed: " + committed.status().ToString());
        RecordError(sh, r, "Commit " + where + ": " + committed.status().ToString());
        sh->commit_failed = 1;
      } else {
        rpt.commit_s = Since(t2);
        rpt.client_s = Since(t0);
        rpt.stats = committed->stats();
        PrintSync(o, p, rpt);
      }
    }
    Barrier(sh);  // C: committed (or nobody goes on)
    if (sh->commit_failed) return 1;
  }
  return 0;
}

int PushProcesses(const GlobalOptions& g, const PushOptions& o, const Plan& p, const DeviceSpec& dev) {
  const uint32_t W = o.world_size;
  std::vector<ShmObject> shm;  // host: made here, unlinked when this returns
  for (uint32_t r = 0; r < W && !dev.cuda; ++r) {
    auto obj = ShmObject::Create(ShmObject::UniqueName("trainer" + std::to_string(r)), p.rank_bytes[r]);
    if (!obj.ok()) return Fail(obj.status().ToString());
    shm.push_back(std::move(*obj));
  }
  void* mem = ::mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return Fail(std::string("mmap of the ranks' shared state: ") + std::strerror(errno));
  const UniqueMapping shared_map(mem, sizeof(Shared));  // unmapped on every return
  Shared* sh = new (mem) Shared();
  pthread_barrierattr_t attr;
  pthread_barrierattr_init(&attr);
  pthread_barrierattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  if (int e = pthread_barrier_init(&sh->barrier, &attr, W); e != 0)
    return Fail(std::string("pthread_barrier_init: ") + std::strerror(e));
  pthread_barrierattr_destroy(&attr);

  const pid_t parent = ::getpid();
  std::map<pid_t, uint32_t> children;
  for (uint32_t r = 0; r < W; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      Err("weightsyncctl push: fork: " + std::string(std::strerror(errno)));
      for (auto& [c, _] : children) ::kill(c, SIGKILL);
      break;
    }
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(1);
      ::_exit(RankMain(g, o, p, dev, r, dev.cuda ? nullptr : &shm[r], sh));
    }
    children[pid] = r;
  }

  // Reap. A rank that dies outside the protocol (signal, --crash-after-layers,
  // any code but 0/1) would leave the others waiting at a barrier: kill them.
  int code = children.size() == W ? 0 : 1;
  bool killed = false;
  while (!children.empty()) {
    int ws = 0;
    const pid_t pid = ::waitpid(-1, &ws, 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    auto it = children.find(pid);
    if (it == children.end()) continue;
    const uint32_t r = it->second;
    children.erase(it);
    const bool exited = WIFEXITED(ws);
    const int rc = exited ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
    if (rc == 0) continue;
    if (code == 0) code = rc;
    if (rc != 1 && !killed) {
      if (!(exited && rc == 17 && o.crash_after_layers >= 0))
        Err("weightsyncctl push: rank " + std::to_string(r) +
            (exited ? " exited with status " + std::to_string(rc) : " killed by signal " + std::to_string(WTERMSIG(ws))));
      killed = true;
      for (auto& [c, _] : children) ::kill(c, SIGKILL);
    }
  }
  if (sh->failed_rank >= 0) Err(std::string("weightsyncctl push: ") + sh->error);
  // No pthread_barrier_destroy: it waits for waiters, and killed ranks may
  // have died waiting. Unmapping is enough.
  sh->~Shared();
  return code;
}

}  // namespace

// --rank-daemon: each rank's daemon address, and (when not all are
// --daemon) BeginSync's rank_nodes, each daemon's node name from its status.
Status PlaceRanks(const GlobalOptions& g, const PushOptions& o, Plan* p) {
  const uint32_t W = o.world_size;
  p->rank_daemon.assign(W, g.daemon);
  for (const std::string& spec : o.rank_daemons) {
    const size_t eq = spec.find('=');
    uint32_t r = 0;
    const char* end = eq == std::string::npos ? nullptr : spec.data() + eq;
    if (eq == std::string::npos || eq + 1 == spec.size() ||
        std::from_chars(spec.data(), end, r).ptr != end || eq == 0)
      return InvalidArgument("--rank-daemon " + spec + ": expected RANK=ADDR");
    if (r >= W) return InvalidArgument("--rank-daemon " + spec + ": rank " + std::to_string(r) + " is not below --world-size " + std::to_string(W));
    p->rank_daemon[r] = spec.substr(eq + 1);
  }
  bool spread = false;
  for (const auto& a : p->rank_daemon) spread = spread || a != p->rank_daemon[0];
  if (!spread) return Status::Ok();
  std::map<std::string, std::string> node_of;  // address -> node name
  for (const auto& a : p->rank_daemon) {
    if (node_of.count(a)) continue;
    WeightSyncClient c(a, g.client);
    auto st = c.GetStatus();
    if (!st.ok()) return st.status().WithContext("the daemon at " + a);
    if (st->node_name().empty())
      return FailedPrecondition("the daemon at " + a + " has no node name (--node-name): ranks on several nodes need one");
    node_of[a] = st->node_name();
  }
  p->begin.clear_rank_nodes();
  for (const auto& a : p->rank_daemon) p->begin.add_rank_nodes(node_of[a]);
  return Status::Ok();
}

int RunPush(const GlobalOptions& g, const PushOptions& o) {
  auto dev = ParseDevice(o.device);
  if (!dev.ok()) return Fail(dev.status().message());
  auto ckpt = st::Checkpoint::Open(o.checkpoint);
  if (!ckpt.ok()) return Fail(ckpt.status().ToString());
  auto plan = MakePlan(*ckpt, o);
  if (!plan.ok()) return Fail(plan.status().message());
  if (Status st = PlaceRanks(g, o, &*plan); !st.ok()) return Fail(st.message());
  return dev->cuda || o.processes ? PushProcesses(g, o, *plan, *dev) : PushHost(g, o, *plan);
}

}  // namespace ws::ctl
