// Fuzz target: an engine's HF config.json. Bytes as hf_config_json ->
// LayoutRegistry::Resolve for a dense (Llama), an MoE+MLA (DeepSeek-V2) and a
// Conv1D (GPT-2) rule file, at tp_size 1 and at the last rank of tp_size 2.
#include <cstddef>
#include <cstdint>
#include <string>

#include "tests/fuzz/fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ws::LayoutRegistry& reg = ws::fuzz::Layouts();
  const std::string cfg(reinterpret_cast<const char*>(data), size);
  for (const char* arch : {"LlamaForCausalLM", "DeepseekV2ForCausalLM", "GPT2LMHeadModel"}) {
    for (uint32_t tp : {1u, 2u}) {
      ws::ResolveOptions ro;
      ro.tp_size = tp;
      ro.tp_rank = tp - 1;
      ro.limits.max_layout_entries = ws::fuzz::kFuzzLoopBudget;
      auto r = reg.Resolve(arch, cfg, ro);
      if (!r.ok()) break;  // the other tp_size fails the same way, mostly
      ws::fuzz::CheckLayout(*r);
    }
  }
  return 0;
}
