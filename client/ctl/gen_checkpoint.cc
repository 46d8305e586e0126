// gen-checkpoint: a random fp32 checkpoint shaped by an architecture's layout rules.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "client/cpp/fsdp.h"
#include "client/cpp/safetensors.h"
#include "client/ctl/commands.h"
#include "client/ctl/parallel.h"

namespace ws::ctl {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

constexpr uint64_t kBlock = 1 << 20;  // elements per independently seeded block

// Block `block` of a tensor: deterministic per (seed, tensor name, block), so
// values depend neither on sharding, order nor thread count. Each value is
// the sum of four uniform 16-bit draws (Irwin-Hall, close to normal) scaled
// to a standard deviation of 0.02.
void FillBlock(uint64_t seed, uint64_t name_hash, uint64_t block, float* out, uint64_t n) {
  uint64_t s = SplitMix64(seed ^ name_hash ^ SplitMix64(block));
  if (s == 0) s = 1;
  const float scale = static_cast<float>(0.02 / (65536.0 / std::sqrt(3.0)));
  for (uint64_t i = 0; i < n; ++i) {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    const uint64_t x = s * 0x2545f4914f6cdd1dull;
    const int64_t sum = static_cast<int64_t>((x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48));
    out[i] = static_cast<float>(sum - 131070) * scale;
  }
}


struct Override {
  const char* flag;
  int64_t value;
  std::vector<const char*> keys;
};

}  // namespace

int RunGenCheckpoint(const GenCheckpointOptions& o) {
  auto fail = [](const std::string& m) {
    Err("weightsyncctl gen-checkpoint: " + m);
    return 1;
  };
  auto reg = LoadRegistry(o.layouts_dir);
  if (!reg.ok()) return fail(reg.status().ToString());
  auto example = (*reg)->ExampleConfig(o.arch);
  if (!example.ok()) return fail(example.status().ToString());
  ojson config;
  try {
    config = ojson::parse(*example);
  } catch (const std::exception& e) {
    return fail("example config of " + o.arch + " is not valid JSON: " + e.what());
  }
  if (!config.is_object()) return fail("example config of " + o.arch + " is not a JSON object");

  const std::vector<Override> overrides = {
      {"--hidden-size", o.hidden_size, {"hidden_size", "n_embd"}},
      {"--layers", o.layers, {"num_hidden_layers", "n_layer"}},
      {"--heads", o.heads, {"num_attention_heads", "n_head"}},
      {"--kv-heads", o.kv_heads, {"num_key_value_heads"}},
      {"--intermediate-size", o.intermediate_size, {"intermediate_size", "n_inner"}},
      {"--vocab-size", o.vocab_size, {"vocab_size"}},
      {"--experts", o.experts, {"n_routed_experts", "num_local_experts", "num_experts"}},
  };
  for (const Override& ov : overrides) {
    if (ov.value < 0) continue;
    bool any = false;
    std::string names;
    for (const char* k : ov.keys) {
      names += std::string(names.empty() ? "" : ", ") + k;
      if (config.contains(k)) {
        config[k] = ov.value;
        any = true;
      }
    }
    if (!any) return fail(std::string(ov.flag) + ": the " + o.arch + " example config has none of " + names);
  }
  if (o.tie >= 0) config["tie_word_embeddings"] = o.tie == 1;
  config["architectures"] = ojson::array({o.arch});
  const std::string config_text = config.dump(2);

  auto layout = (*reg)->Resolve(o.arch, config_text, ResolveOptions{});
  if (!layout.ok()) return fail(layout.status().ToString());
  // Layer-major order, as Hugging Face checkpoints are written.
  std::vector<ExpectedSource> sources;
  {
    std::vector<std::string> names;
    for (const ExpectedSource& s : layout->sources) names.push_back(s.name);
    for (const fsdp::LayerGroup& g : fsdp::GroupByLayer(names))
      for (size_t i : g.members) sources.push_back(layout->sources[i]);
  }
  if (sources.empty()) return fail("the layout rules for " + o.arch + " declare no source tensors");

  std::error_code ec;
  fs::create_directories(o.out, ec);
  if (ec) return fail("cannot create " + o.out + ": " + ec.message());
  const fs::path dir(o.out);
  {
    std::ofstream f(dir / "config.json", std::ios::trunc);
    f << config_text << "\n";
    f.close();
    if (!f) return fail("cannot write " + (dir / "config.json").string());
  }

  // Plan the files: consecutive tensors up to --shard-mb each.
  std::vector<std::vector<size_t>> files(1);
  const uint64_t limit = o.shard_mb > 0 ? static_cast<uint64_t>(o.shard_mb * 1e6) : UINT64_MAX;
  uint64_t in_file = 0, total = 0;
  for (size_t i = 0; i < sources.size(); ++i) {
    const uint64_t bytes = static_cast<uint64_t>(NumElements(sources[i].shape)) * 4;
    if (!files.back().empty() && in_file + bytes > limit) {
      files.emplace_back();
      in_file = 0;
    }
    files.back().push_back(i);
    in_file += bytes;
    total += bytes;
  }
  const bool sharded = o.shard_mb > 0;
  fs::remove(dir / (sharded ? "model.safetensors" : "model.safetensors.index.json"), ec);

  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::pair<std::string, std::string>> weight_map;
  for (size_t f = 0; f < files.size(); ++f) {
    char fname[64];
    std::snprintf(fname, sizeof fname, "model-%05zu-of-%05zu.safetensors", f + 1, files.size());
    const std::string file = sharded ? fname : "model.safetensors";
    std::vector<st::TensorHeader> headers;
    for (size_t i : files[f]) headers.push_back({sources[i].name, DType::kF32, sources[i].shape});
    auto w = st::SafetensorsWriter::Create((dir / file).string(), headers);
    if (!w.ok()) return fail(w.status().ToString());
    struct Job {
      size_t k;
      uint64_t hash, block;
    };
    std::vector<Job> jobs;
    for (size_t k = 0; k < files[f].size(); ++k) {
      const ExpectedSource& s = sources[files[f][k]];
      const uint64_t n = (*w)->tensor_bytes(k) / 4, h = Fnv1a(s.name);
      for (uint64_t b = 0; b * kBlock < n; ++b) jobs.push_back({k, h, b});
      weight_map.emplace_back(s.name, file);
    }
    ParallelFor(jobs.size(), [&](size_t j) {
      const Job& job = jobs[j];
      const uint64_t n = (*w)->tensor_bytes(job.k) / 4, begin = job.block * kBlock;
      FillBlock(o.seed, job.hash, job.block, static_cast<float*>((*w)->tensor_data(job.k)) + begin,
                std::min(kBlock, n - begin));
    });
    if (Status s = (*w)->Finish(); !s.ok()) return fail(s.ToString());
  }
  if (sharded) {
    if (Status s = st::WriteIndex(o.out, total, weight_map); !s.ok()) return fail(s.ToString());
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  Out("wrote " + o.arch + " checkpoint to " + o.out + ": " + std::to_string(sources.size()) + " tensors, " +
      std::to_string(total) + " bytes (" + HumanBytes(total) + ") in " + std::to_string(files.size()) +
      " file(s), " + std::to_string(secs) + " s");
  return 0;
}

}  // namespace ws::ctl
