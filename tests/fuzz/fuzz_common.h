// Shared fixtures of the fuzz targets: the committed layout rules and the
// engine ranks of a tiny Llama (tests/reference/hf_checkpoints/llama) at
// tp_size 2. A broken fixture aborts at startup: fuzzing against it would only
// report noise.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "daemon/core/layout.h"
#include "daemon/core/planner.h"

namespace ws::fuzz {

[[noreturn]] inline void Die(const std::string& what) {
  std::fprintf(stderr, "fuzz: %s\n", what.c_str());
  std::abort();
}

// Aborts with `what` when `cond` is false: an invariant the code under test broke.
inline void Check(bool cond, const std::string& what) {
  if (!cond) Die("invariant broken: " + what);
}

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Die("cannot read " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline const LayoutRegistry& Layouts() {
  static const std::shared_ptr<const LayoutRegistry> reg = [] {
    auto r = LayoutRegistry::LoadDir(WS_SOURCE_DIR "/config/layouts");
    if (!r.ok()) Die(r.status().ToString());
    return *r;
  }();
  return *reg;
}

inline const std::string& TinyLlamaConfig() {
  static const std::string cfg = ReadFile(WS_SOURCE_DIR "/tests/reference/hf_checkpoints/llama/config.json");
  return cfg;
}

// Loop budget of the fuzzers' resolutions (ResolveOptions::limits.max_layout_entries).
// An iteration costs ~50 us under ASan with coverage tracing, so the default
// budget could run past -timeout; the budget logic is the same at any size.
inline constexpr int64_t kFuzzLoopBudget = int64_t{1} << 15;

inline constexpr uint32_t kTinyTp = 2;
inline constexpr uint32_t kTinyReplicas = 2;

// Every engine rank of two tiny-Llama replicas at tp_size 2, registered with
// exactly the params their layout expects (bf16).
inline const std::vector<PlanEngine>& TinyLlamaEngines() {
  static const std::vector<PlanEngine> engines = [] {
    std::vector<PlanEngine> out;
    for (uint32_t replica = 0; replica < kTinyReplicas; ++replica) {
      for (uint32_t rank = 0; rank < kTinyTp; ++rank) {
        ResolveOptions ro;
        ro.tp_size = kTinyTp;
        ro.tp_rank = rank;
        auto layout = Layouts().Resolve("LlamaForCausalLM", TinyLlamaConfig(), ro);
        if (!layout.ok()) Die(layout.status().ToString());
        PlanEngine pe;
        pe.engine_id = "r" + std::to_string(replica) + "t" + std::to_string(rank);
        pe.spec.model = "tiny";
        pe.spec.architecture = "LlamaForCausalLM";
        pe.spec.hf_config_json = TinyLlamaConfig();
        pe.spec.replica_id = replica;
        pe.spec.tp_rank = rank;
        pe.spec.tp_size = kTinyTp;
        for (const ExpectedParam& p : layout->params) {
          EngineParamSpec ps;
          ps.name = p.name;
          ps.shape = p.shape;
          ps.dtype = DType::kBF16;
          pe.spec.params.push_back(std::move(ps));
        }
        pe.layout = std::move(layout).value();
        if (Status st = ValidateEngine(pe.spec, pe.layout); !st.ok()) Die(st.ToString());
        out.push_back(std::move(pe));
      }
    }
    return out;
  }();
  return engines;
}

// The invariants every resolved layout keeps: shapes in range, fills inside
// their param's 2-D view with non-negative extents.
inline void CheckLayout(const RankLayout& l) {
  for (const ExpectedSource& s : l.sources) Check(ShapeInRange(s.shape), "source " + s.name + " shape in range");
  for (const ExpectedParam& p : l.params) {
    Check(ShapeInRange(p.shape), "param " + p.name + " shape " + ShapeToString(p.shape) + " in range");
    View2D v = As2D(p.shape);
    for (const Fill& f : p.fills) {
      Check(f.rows >= 0 && f.cols >= 0 && f.dst_row0 >= 0 && f.dst_col0 >= 0 && f.src_row0 >= 0 &&
                f.src_col0 >= 0,
            "param " + p.name + " fill extents non-negative");
      Check(f.dst_row0 + f.rows <= v.rows && f.dst_col0 + f.cols <= v.cols, "param " + p.name + " fill inside");
    }
  }
}

}  // namespace ws::fuzz
