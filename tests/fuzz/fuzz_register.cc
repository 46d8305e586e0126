// Fuzz target: an engine's registration. Bytes -> RegisterEngineRequest ->
// FromProto -> the layout resolution Coordinator::RegisterEngine does (the
// architecture's rules, explicit per-param mappings, their declared sources)
// -> ValidateEngine, against the committed rules in config/layouts.
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "daemon/core/json_limits.h"
#include "daemon/server/convert.h"
#include "tests/fuzz/fuzz_common.h"

namespace ws::fuzz {
namespace {

// Mirrors the resolution steps of Coordinator::RegisterEngine (without its
// memory mapping and model bookkeeping).
void Register(const EngineRankSpec& spec) {
  if (spec.tp_size == 0 || spec.tp_rank >= spec.tp_size || spec.params.empty()) return;
  auto cfg = ParseJsonLimited(spec.hf_config_json, kMaxJsonDepth, "hf_config_json");
  if (!cfg.ok() || !cfg->is_object()) return;
  ResolveOptions ro;
  ro.tp_size = spec.tp_size;
  ro.tp_rank = spec.tp_rank;
  ro.engine_options = spec.options;
  ro.limits.max_layout_entries = kFuzzLoopBudget;  // the daemon uses the default
  size_t n_explicit = 0;
  for (const auto& p : spec.params) n_explicit += p.mapping_json.empty() ? 0 : 1;
  const LayoutRegistry& reg = Layouts();
  RankLayout layout;
  auto r = reg.Resolve(spec.architecture, spec.hf_config_json, ro);
  if (r.ok()) CheckLayout(*r);
  if (n_explicit < spec.params.size()) {
    if (!r.ok()) return;
    layout = std::move(r).value();
  } else {
    if (r.ok()) {
      layout.sources = std::move(r->sources);
      layout.skip_patterns = std::move(r->skip_patterns);
    }
    layout.architecture = spec.architecture;
  }
  std::vector<ExpectedSource> explicit_sources;
  for (const auto& p : spec.params) {
    if (p.mapping_json.empty()) continue;
    auto e = reg.ResolveExplicit(p.name, p.mapping_json, spec.hf_config_json, ro, &explicit_sources);
    if (!e.ok()) return;
    std::erase_if(layout.params, [&](const ExpectedParam& x) { return x.name == p.name; });
    layout.params.push_back(std::move(e).value());
  }
  for (auto& src : explicit_sources) {
    auto it = std::find_if(layout.sources.begin(), layout.sources.end(),
                           [&](const ExpectedSource& e) { return e.name == src.name; });
    if (it == layout.sources.end()) layout.sources.push_back(std::move(src));
    else if (it->shape != src.shape) return;
  }
  CheckLayout(layout);
  if (!ValidateEngine(spec, layout).ok()) return;
  for (const EngineParamSpec& p : spec.params) Check(ShapeInRange(p.shape), "validated param " + p.name + " shape");
}

}  // namespace
}  // namespace ws::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  weightsync::v1::RegisterEngineRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto reg = ws::server::FromProto(req);
  if (!reg.ok()) return 0;
  ws::fuzz::Check(reg->memory.size() == reg->spec.params.size(), "one memory reference per param");
  ws::fuzz::Register(reg->spec);
  return 0;
}
