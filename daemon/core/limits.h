// Bounds on what one peer's request may make the daemon parse, allocate or
// iterate. Every refusal names the limit ("limit max_json_depth = 64"); a
// limit a request exceeds is InvalidArgument (retrying cannot help).
//
// Where they are enforced:
//   - request counts and sizes: daemon/server/convert.cc (FromProto), before
//     any domain object is built;
//   - JSON depth and size: ParseJsonLimited (daemon/core/json_limits.h), before
//     a DOM exists;
//   - layout expansion and derived shapes: LayoutRegistry::Resolve*, before the
//     loop that would exceed them runs.
// Shapes are also bounded by kMaxTensorElements (daemon/core/manifest.h), which
// keeps all shape and range arithmetic inside int64.
//
// Thread-safety: a plain value type.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ws {

struct Limits {
  // Bytes of one name: model, architecture, tensor, param, tied_to, layer,
  // engine option, engine label, shm object or device UUID.
  size_t max_name_bytes = 1024;
  // Bytes of one JSON document from a peer (hf_config_json, each mapping_json).
  // HF config.json files are a few KB; some carry large label maps.
  size_t max_json_bytes = 1 << 20;
  // Nesting of arrays and objects in any JSON the daemon parses (peer JSON and
  // rule files). HF configs nest about 3 deep, rule files about 6.
  size_t max_json_depth = 64;
  // Tensors of one BeginSync manifest; also shards of one pushed layer.
  // DeepSeek-V3 / Kimi-K2 class checkpoints have 45k-90k tensors.
  size_t max_tensors_per_manifest = 262144;
  // Shards of one manifest tensor (one per trainer rank holding a piece).
  size_t max_shards_per_tensor = 65536;
  // Shards of one whole manifest: 90k tensors x 256 ranks fit (about 23M),
  // and so does the default --max-message-bytes worth of shards.
  size_t max_shards_per_manifest = size_t{1} << 25;
  // Parameters of one RegisterEngine.
  size_t max_params_per_registration = 65536;
  // Engine options (name -> integer) of one RegisterEngine.
  size_t max_engine_options = 256;
  // Dimensions of one tensor or parameter shape (also of resolved layouts).
  size_t max_dims = 8;
  // tp_size of one registration (BeginSync walks every tp rank of a model).
  uint32_t max_tp_size = 4096;
  // Rule expansions while resolving one layout (or one explicit mapping):
  // every iteration of a `for` loop counts, at every nesting level, and so
  // does each rule without loops. A loop is refused before it runs when its
  // range would take the total past this. A 61-layer, 384-expert MoE needs
  // about 200k.
  size_t max_layout_entries = 1000000;
  // Distinct skip patterns of one resolved layout (every unknown manifest
  // tensor is matched against each).
  size_t max_skip_patterns = 1024;
};

}  // namespace ws
