// Fuzz target: a layout rule file. Bytes as one rule file's JSON ->
// LayoutRegistry::LoadTexts (parses it and resolves its example_config) ->
// on success, Resolve of its first architecture with that example config at
// tp_size 2, both ranks.
#include <cstddef>
#include <cstdint>
#include <string>

#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto reg = ws::LayoutRegistry::LoadTexts({{"fuzz.json", text}});
  if (!reg.ok()) return 0;
  const auto archs = (*reg)->Architectures();
  ws::fuzz::Check(!archs.empty(), "a loaded rule file has an architecture");
  auto cfg = (*reg)->ExampleConfig(archs[0]);
  if (!cfg.ok()) return 0;
  for (uint32_t rank = 0; rank < 2; ++rank) {
    ws::ResolveOptions ro;
    ro.tp_size = 2;
    ro.tp_rank = rank;
    ro.limits.max_layout_entries = ws::fuzz::kFuzzLoopBudget;
    auto r = (*reg)->Resolve(archs[0], *cfg, ro);
    if (r.ok()) ws::fuzz::CheckLayout(*r);
  }
  return 0;
}
