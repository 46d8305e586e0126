#include "daemon/core/json_limits.h"

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
    return InvalidArgument(what + ": JSON nested more than " + std::to_string(max_depth) + " levels deep");
  } catch (const std::exception& e) {
    return InvalidArgument(what + ": invalid JSON: " + e.what());
  }
}

template Result<nlohmann::json> ParseJsonLimited<nlohmann::json>(std::string_view, int, const std::string&);
template Result<nlohmann::ordered_json> ParseJsonLimited<nlohmann::ordered_json>(std::string_view, int,
                                                                                  const std::string&);

}  // namespace ws
