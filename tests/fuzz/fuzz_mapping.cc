// Fuzz target: an explicit per-parameter mapping (EngineParamSpec::mapping_json).
// Bytes as mapping_json -> LayoutRegistry::ResolveExplicit with the tiny
// Llama config (whose rule file lends its vars and sources) at tp_size 2.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ws::LayoutRegistry& reg = ws::fuzz::Layouts();
  const std::string mapping(reinterpret_cast<const char*>(data), size);
  ws::ResolveOptions ro;
  ro.tp_size = 2;
  ro.tp_rank = 1;
  ro.limits.max_layout_entries = ws::fuzz::kFuzzLoopBudget;
  std::vector<ws::ExpectedSource> sources;
  auto p = reg.ResolveExplicit("p", mapping, ws::fuzz::TinyLlamaConfig(), ro, &sources);
  if (!p.ok()) return 0;
  ws::RankLayout l;
  l.params.push_back(std::move(p).value());
  l.sources = std::move(sources);
  ws::fuzz::CheckLayout(l);
  return 0;
}
