// Layout rules: how Hugging Face checkpoint tensors land in an engine rank's
// parameters. Rules are data (config/layouts/*.json, format in
// docs/layouts.md); this module loads them and resolves them for one rank.
// Pure C++.
//
// Thread-safety: LayoutRegistry is immutable after Load*(); concurrent
// Resolve() calls are safe.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "daemon/core/limits.h"
#include "daemon/core/manifest.h"
#include "daemon/core/status.h"

namespace ws {

// One rectangle of a destination parameter's 2-D view and where it comes
// from. Coordinates are elements.
//
// The source's *logical* 2-D view is its physical 2-D view, transposed when
// `transpose` is set (GPT-2 Conv1D weights are stored [in, out]).
// dst[dst_row0 + i][dst_col0 + j] = logical_src[src_row0 + i][src_col0 + j]
// for i < rows, j < cols. An empty `source` means zero-fill.
struct Fill {
  std::string source;
  bool transpose = false;
  int64_t src_row0 = 0, src_col0 = 0;
  int64_t dst_row0 = 0, dst_col0 = 0;
  int64_t rows = 0, cols = 0;
};

// A parameter one engine rank must hold, and how to fill it completely.
struct ExpectedParam {
  std::string name;
  Shape shape;
  std::vector<Fill> fills;  // together they tile the whole 2-D view exactly once
};

// A source tensor the rules expect in the trainer's manifest.
struct ExpectedSource {
  std::string name;
  Shape shape;  // global, physical (as stored by the trainer)
};

// A list of expected sources whose storage may be shared: every rank of a
// config declares the same list (tens of thousands of entries for a MoE
// model), and registrations keep one copy of it (see SharedWith). Reads as a
// const vector; a write to a shared list copies it first.
class SourceList {
 public:
  using Vec = std::vector<ExpectedSource>;
  SourceList() = default;
  SourceList(Vec v) : p_(std::make_shared<Vec>(std::move(v))) {}  // NOLINT: a list is a vector
  SourceList& operator=(Vec v) {
    p_ = std::make_shared<Vec>(std::move(v));
    return *this;
  }

  const Vec& get() const { return p_ ? *p_ : Empty(); }
  operator const Vec&() const { return get(); }  // NOLINT: reads as the vector it is
  Vec::const_iterator begin() const { return get().begin(); }
  Vec::const_iterator end() const { return get().end(); }
  size_t size() const { return get().size(); }
  bool empty() const { return get().empty(); }
  const ExpectedSource& operator[](size_t i) const { return get()[i]; }
  void push_back(ExpectedSource s) { Mutable().push_back(std::move(s)); }

  // Same names and shapes, in the same order.
  bool operator==(const SourceList& o) const;
  // Makes this list use `o`'s storage; both must be equal.
  void ShareWith(const SourceList& o) { p_ = o.p_; }
  bool SharesWith(const SourceList& o) const { return p_ == o.p_; }

 private:
  static const Vec& Empty();
  Vec& Mutable();
  std::shared_ptr<Vec> p_;  // never changed in place while another list holds it
};

// The resolved layout of one engine rank.
struct RankLayout {
  std::string architecture;
  std::string rule_file;  // which file the rules came from
  std::vector<ExpectedParam> params;
  SourceList sources;  // every source any rank of this config may read
  std::vector<std::string> skip_patterns;  // glob patterns ('*' wildcard) of ignored source names
};

struct ResolveOptions {
  uint32_t tp_size = 1;
  uint32_t tp_rank = 0;
  // Exposed to rule expressions by name; a rule file's "option_defaults"
  // supplies values the engine does not send (e.g. use_mla, enable_expert_parallel).
  std::map<std::string, int64_t> engine_options;
  // Request limits: JSON size and depth for the config and mappings,
  // max_layout_entries (rule expansions of one call: configs come from
  // engines, and nested loops such as layers x experts multiply; DeepSeek-V3
  // needs under 10^5), max_skip_patterns and max_dims of resolved shapes.
  Limits limits;
};

// The max_layout_entries a rule file's example_config must resolve within at load.
inline constexpr size_t kMaxExampleLoopIterations = size_t{1} << 15;

class LayoutRegistry {
 public:
  // Loads every *.json under `dir`. Errors name the file (and the rule).
  // Rule files nest at most limits.max_json_depth deep.
  static Result<std::shared_ptr<const LayoutRegistry>> LoadDir(const std::string& dir, const Limits& limits = {});
  // Loads rule files from in-memory JSON texts (name -> text); for tests.
  static Result<std::shared_ptr<const LayoutRegistry>> LoadTexts(
      const std::map<std::string, std::string>& files, const Limits& limits = {});

  // Resolves the rules for `architecture` against the HF config for one rank.
  // Errors (unknown architecture, a size that does not divide by the TP size,
  // a missing config key, a config that expands past opts.limits) say why,
  // naming the config key, loop or rule. Every resolved shape is within
  // kMaxTensorElements and limits.max_dims.
  Result<RankLayout> Resolve(const std::string& architecture, const std::string& hf_config_json,
                             const ResolveOptions& opts) const;

  // Resolves a single explicit per-parameter mapping (EngineParamSpec::mapping_json).
  // Source shapes come from the mapping's own "sources" list, then from the
  // rule file of the config's "architectures" if one is loaded. When
  // `sources` is given, the mapping's own declared sources are appended to it
  // (callers add them to RankLayout::sources so the planner checks their shape).
  Result<ExpectedParam> ResolveExplicit(const std::string& param_name, const std::string& mapping_json,
                                        const std::string& hf_config_json,
                                        const ResolveOptions& opts,
                                        std::vector<ExpectedSource>* sources = nullptr) const;

  std::vector<std::string> Architectures() const;

  // An example HF config for the architecture (for gen-checkpoint), or error.
  Result<std::string> ExampleConfig(const std::string& architecture) const;

  struct Impl;
  explicit LayoutRegistry(std::unique_ptr<Impl> impl);
  ~LayoutRegistry();

 private:
  std::unique_ptr<Impl> impl_;
};

// '*' matches any run of characters (including dots).
bool GlobMatch(const std::string& pattern, const std::string& name);

}  // namespace ws
