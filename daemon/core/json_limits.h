// Parsing JSON from peers and files with a nesting (and size) limit.
// nlohmann::json parses iteratively, but dump(), comparison and copies
// recurse, so a document nested 100000 deep parses fine and then overflows the
// stack; such documents are refused while parsing, before that depth is built.
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "daemon/core/status.h"

namespace ws {

// Deepest nesting of arrays/objects accepted in configs, rule files and
// mappings by default (real ones nest a handful of levels); the daemon's
// Limits::max_json_depth.
inline constexpr int kMaxJsonDepth = 64;

// Parses `text` (nlohmann::json or nlohmann::ordered_json) or returns
// InvalidArgument naming `what`: invalid JSON, or arrays/objects nested more
// than `max_depth` deep (a top-level [] or {} is depth 1; the message names
// max_json_depth).
template <typename Json = nlohmann::json>
Result<Json> ParseJsonLimited(std::string_view text, int max_depth, const std::string& what);

// The same for JSON from peers, which is also refused when longer than
// `max_bytes` (the message names max_json_bytes) before any parsing.
template <typename Json = nlohmann::json>
Result<Json> ParseJsonLimited(std::string_view text, const std::string& what, size_t max_depth, size_t max_bytes);

extern template Result<nlohmann::json> ParseJsonLimited<nlohmann::json>(std::string_view, int, const std::string&);
extern template Result<nlohmann::ordered_json> ParseJsonLimited<nlohmann::ordered_json>(std::string_view, int,
                                                                                         const std::string&);
extern template Result<nlohmann::json> ParseJsonLimited<nlohmann::json>(std::string_view, const std::string&, size_t,
                                                                         size_t);
extern template Result<nlohmann::ordered_json> ParseJsonLimited<nlohmann::ordered_json>(std::string_view,
                                                                                         const std::string&, size_t,
                                                                                         size_t);

}  // namespace ws
