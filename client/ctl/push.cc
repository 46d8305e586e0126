// push: a stand-in FSDP trainer. Every tensor of a checkpoint is split across
// W ranks as FSDP2 does (torch.chunk along dim 0, or dim 1 for 2-D tensors
// with --shard-dim 1); each rank's shards are packed into one shm object and
// pushed layer by layer over the rank's own connection.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>

#include <nlohmann/json.hpp>

#include "client/cpp/client.h"
#include "client/cpp/fsdp.h"
#include "client/cpp/safetensors.h"
#include "client/cpp/shm.h"
#include "client/ctl/commands.h"

namespace ws::ctl {
namespace {

struct Tensor {
  std::string name;
  Shape shape;
  DType dtype = DType::kF32;
  const uint8_t* data = nullptr;     // null for injected tensors (zeros)
  std::vector<ShardSpec> shards;     // as split (the data layout)
  std::vector<uint64_t> offset;      // per shard: byte offset in its rank's shm object
  std::vector<uint64_t> bytes;       // per shard
};

struct Layer {
  std::string key;
  std::vector<size_t> tensors;
};

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string Fixed(double v, int prec) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}

// Runs fn(i) for i in [0, n) on up to hardware_concurrency threads.
template <typename Fn>
void ParallelFor(size_t n, Fn fn) {
  const size_t k = std::min<size_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  std::atomic<size_t> next{0};
  std::vector<std::thread> ts;
  for (size_t t = 0; t < k; ++t)
    ts.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < n;) fn(i);
    });
  for (auto& t : ts) t.join();
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

}  // namespace

int RunPush(const GlobalOptions& g, const PushOptions& o) {
  auto fail = [](const std::string& m) {
    Err("weightsyncctl push: " + m);
    return 1;
  };
  const uint32_t W = o.world_size;
  auto ckpt = st::Checkpoint::Open(o.checkpoint);
  if (!ckpt.ok()) return fail(ckpt.status().ToString());

  std::vector<Tensor> tensors;
  for (const st::TensorInfo& t : ckpt->tensors()) {
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

  // Split and lay out each rank's shm object.
  std::vector<uint64_t> rank_bytes(W, 0);
  uint64_t trainer_bytes = 0;
  for (Tensor& t : tensors) {
    t.shards = fsdp::SplitTensor(t.shape, W, o.shard_dim);
    for (const ShardSpec& s : t.shards) {
      uint64_t& off = rank_bytes[s.rank];
      off = (off + 63) / 64 * 64;
      const uint64_t n = fsdp::ShardBytes(t.shape, DTypeSize(t.dtype), s);
      t.offset.push_back(off);
      t.bytes.push_back(n);
      off += n;
      trainer_bytes += n;
    }
  }
  std::vector<ShmObject> shm(W);
  for (uint32_t r = 0; r < W; ++r) {
    auto obj = ShmObject::Create(ShmObject::UniqueName("trainer" + std::to_string(r)), rank_bytes[r]);
    if (!obj.ok()) return fail(obj.status().ToString());
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

  // The metadata manifest (with --inject applied).
  pb::BeginSyncRequest begin;
  begin.set_model(o.model);
  begin.set_world_size(W);
  std::vector<bool> in_manifest(tensors.size(), true);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    pb::SourceTensor* st = begin.add_tensors();
    st->set_name(t.name);
    for (int64_t d : t.shape) st->add_shape(d);
    st->set_dtype(ToProto(t.dtype));
    for (const ShardSpec& s : t.shards) {
      pb::ShardSpec* ps = st->add_shards();
      ps->set_rank(s.rank);
      ps->set_dim(s.dim);
      ps->set_start(s.start);
      ps->set_length(s.length);
    }
  }
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
    if (i < 0) return fail("--inject " + k + ": the checkpoint has no tensor it applies to");
    Err("weightsyncctl push: --inject " + k + " applied to tensor \"" + tensors[static_cast<size_t>(i)].name + "\"");
  }

  // Layers, in checkpoint order.
  std::vector<std::string> names;
  std::vector<size_t> index;
  for (size_t i = 0; i < tensors.size(); ++i)
    if (in_manifest[i]) {
      names.push_back(tensors[i].name);
      index.push_back(i);
    }
  std::vector<Layer> layers;
  for (const fsdp::LayerGroup& lg : fsdp::GroupByLayer(names)) {
    Layer l{lg.key, {}};
    for (size_t m : lg.members) l.tensors.push_back(index[m]);
    layers.push_back(std::move(l));
  }

  // One connection per rank, made before the clock starts.
  std::vector<std::unique_ptr<WeightSyncClient>> clients;
  for (uint32_t r = 0; r < W; ++r) {
    clients.push_back(std::make_unique<WeightSyncClient>(g.daemon));
    if (Status s = clients.back()->Connect(); !s.ok()) return fail("rank " + std::to_string(r) + ": " + s.ToString());
  }

  for (uint32_t rep = 0; rep < o.repeat; ++rep) {
    const uint64_t version = o.version + rep;
    begin.set_version(version);
    const auto t0 = Clock::now();
    auto started = clients[0]->BeginSync(begin);
    if (!started.ok()) return fail("BeginSync version " + std::to_string(version) + ": " + started.status().ToString());
    const uint64_t sync_id = started->sync_id();
    const double begin_s = Since(t0);

    Failure failure;
    std::atomic<bool> aborted{false};
    auto abort_sync = [&](uint32_t r, const Status& s) {
      if (failure.Set(r, s) && !aborted.exchange(true))
        (void)clients[r]->Abort(sync_id, "trainer rank " + std::to_string(r) + ": " + s.ToString());
    };
    const auto t1 = Clock::now();
    std::vector<std::thread> threads;
    for (uint32_t r = 0; r < W; ++r) {
      threads.emplace_back([&, r] {
        auto stream = clients[r]->OpenPush();
        if (!stream.ok()) return abort_sync(r, stream.status());
        failure.Register(r, stream->get());
        int64_t acks = 0;
        bool oob_done = false;
        if (r == 0 && o.crash_after_layers == 0) {
          for (ShmObject& s : shm) ::shm_unlink(s.name().c_str());
          ::_exit(17);
        }
        for (const Layer& layer : layers) {
          if (failure.failed()) break;
          pb::LayerData msg;
          msg.set_sync_id(sync_id);
          msg.set_rank(r);
          msg.set_layer(layer.key);
          for (size_t ti : layer.tensors) {
            const Tensor& t = tensors[ti];
            for (size_t k = 0; k < t.shards.size(); ++k) {
              if (t.shards[k].rank != r) continue;
              pb::ShardData* sd = msg.add_shards();
              sd->set_tensor(t.name);
              pb::HostShmRef* ref = sd->mutable_memory()->mutable_host_shm();
              ref->set_name(shm[r].name());
              ref->set_offset(t.offset[k]);
              ref->set_length(t.bytes[k]);
              if (o.inject == "oob-memref" && r == 0 && !oob_done) {
                ref->set_offset(shm[r].size() + 64);
                oob_done = true;
                if (rep == 0) Err("weightsyncctl push: --inject oob-memref applied to tensor \"" + t.name + "\"");
              }
            }
          }
          if (msg.shards_size() == 0) continue;
          if (Status s = (*stream)->Send(msg); !s.ok()) {
            failure.Unregister(r);
            return abort_sync(r, s.WithContext("layer " + layer.key));
          }
          auto ack = (*stream)->Read();
          if (!ack.ok()) {
            failure.Unregister(r);
            return abort_sync(r, ack.status().WithContext("layer " + layer.key));
          }
          if (r == 0 && ++acks == o.crash_after_layers) {
            for (ShmObject& s : shm) ::shm_unlink(s.name().c_str());
            ::_exit(17);  // a real disconnect: nothing is closed
          }
        }
        failure.Unregister(r);
        if (failure.failed()) return;
        if (Status s = (*stream)->Finish(); !s.ok()) abort_sync(r, s);
      });
    }
    for (auto& t : threads) t.join();
    const double push_s = Since(t1);
    if (failure.failed())
      return fail("sync " + std::to_string(sync_id) + " version " + std::to_string(version) +
                  " aborted: " + failure.status().ToString());

    const auto t2 = Clock::now();
    auto committed = clients[0]->Commit(sync_id);
    if (!committed.ok()) {
      (void)clients[0]->Abort(sync_id, "commit failed: " + committed.status().ToString());
      return fail("Commit sync " + std::to_string(sync_id) + " version " + std::to_string(version) + ": " +
                  committed.status().ToString());
    }
    const double commit_s = Since(t2);
    const double client_s = Since(t0);
    const pb::SyncStats& s = committed->stats();
    if (o.json) {
      nlohmann::ordered_json j;
      j["model"] = o.model;
      j["version"] = version;
      j["sync_id"] = sync_id;
      j["world_size"] = W;
      j["engines"] = started->engines();
      j["copy_ops"] = started->copy_ops();
      j["bytes_planned"] = started->bytes_planned();
      j["bytes_written"] = s.bytes_written();
      j["bytes_read"] = s.bytes_read();
      j["trainer_bytes"] = trainer_bytes;
      j["tensors"] = begin.tensors_size();
      j["layers"] = layers.size();
      j["daemon_seconds"] = s.seconds();
      j["daemon_gbps"] = s.gbps();
      j["client_seconds"] = client_s;
      j["client_gbps"] = client_s > 0 ? static_cast<double>(s.bytes_written()) / client_s / 1e9 : 0.0;
      j["begin_seconds"] = begin_s;
      j["push_seconds"] = push_s;
      j["commit_seconds"] = commit_s;
      j["state"] = s.state();
      Out(j.dump());
    } else {
      Out("committed model " + o.model + " version " + std::to_string(version) + ": " +
          std::to_string(s.bytes_written()) + " bytes in " + Fixed(s.seconds(), 3) + " s (" + Fixed(s.gbps(), 2) +
          " GB/s)");
    }
  }
  return 0;
}

}  // namespace ws::ctl
