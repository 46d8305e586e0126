#include "daemon/core/json_limits.h"

#include <algorithm>
#include <climits>

#include "daemon/core/text.h"

namespace ws {

namespace {
struct TooDeep {};
}  // namespace

template <typename Json>
Result<Json> ParseJsonLimited(std::string_view text, int max_depth, const std::string& what) {
  // The callback sees each array/object as it opens, with `depth` enclosing
  // containers; throwing stops the parser before it goes any deeper.
  auto limit = [max_depth](int depth, typename Json::parse_event_t ev, Json&) {
    if ((ev == Json::parse_event_t::object_start || ev == Json::parse_event_t::array_start) && depth >= max_depth)
      throw TooDeep{};
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), limit);
  } catch (const TooDeep&) {
    return InvalidArgument(what + ": JSON nested more than " + std::to_string(max_depth) +
                           " levels deep (limit max_json_depth = " + std::to_string(max_depth) + ")");
  } catch (const std::exception& e) {
    // The parser's message quotes the last token read, which may be long.
    return InvalidArgument(what + ": invalid JSON: " + Truncate(e.what(), 512));
  }
}

template <typename Json>
Result<Json> ParseJsonLimited(std::string_view text, const std::string& what, size_t max_depth, size_t max_bytes) {
  if (text.size() > max_bytes)
    return InvalidArgument(what + " is " + std::to_string(text.size()) + " bytes, more than " +
                           std::to_string(max_bytes) + " (limit max_json_bytes = " + std::to_string(max_bytes) + ")");
  return ParseJsonLimited<Json>(text, static_cast<int>(std::min<size_t>(max_depth, INT_MAX)), what);
}

template Result<nlohmann::json> ParseJsonLimited<nlohmann::json>(std::string_view, int, const std::string&);
template Result<nlohmann::ordered_json> ParseJsonLimited<nlohmann::ordered_json>(std::string_view, int,
                                                                                  const std::string&);
template Result<nlohmann::json> ParseJsonLimited<nlohmann::json>(std::string_view, const std::string&, size_t, size_t);
template Result<nlohmann::ordered_json> ParseJsonLimited<nlohmann::ordered_json>(std::string_view, const std::string&,
                                                                                  size_t, size_t);

}  // namespace ws
