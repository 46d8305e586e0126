#include "daemon/server/logging.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <spdlog/details/log_msg.h>

namespace ws::server {
namespace {

std::string Format(const std::string& payload, spdlog::level::level_enum lvl = spdlog::level::warn) {
  spdlog::details::log_msg msg("weightsyncd", lvl, spdlog::string_view_t(payload.data(), payload.size()));
  JsonLogFormatter f;
  spdlog::memory_buf_t buf;
  f.format(msg, buf);
  return std::string(buf.data(), buf.size());
}

TEST(JsonLog, OneEscapedObjectPerLine) {
  std::string payload = "sync 1 error=\"a\\b\"\nline2\ttab \x01 caf\xc3\xa9 bad\xff end";
  std::string line = Format(payload);
  ASSERT_FALSE(line.empty());
  EXPECT_EQ(line.back(), '\n');
  EXPECT_EQ(line.find('\n'), line.size() - 1) << "exactly one line";
  auto j = nlohmann::json::parse(line);  // throws (fails the test) on invalid JSON or UTF-8
  EXPECT_EQ(j["level"], "warning");
  EXPECT_EQ(j["logger"], "weightsyncd");
  EXPECT_EQ(j["msg"], "sync 1 error=\"a\\b\"\nline2\ttab \x01 caf\xc3\xa9 bad\xef\xbf\xbd end");
  std::string ts = j["ts"];
  EXPECT_EQ(ts.size(), 24u) << ts;  // 2025-01-02T03:04:05.678Z
  EXPECT_EQ(ts.back(), 'Z');
  EXPECT_NE(line.find("\\u0001"), std::string::npos);
}

TEST(JsonLog, RejectsUnknownLevelAndFormat) {
  EXPECT_FALSE(SetupLogging(LogOptions{LogFormat::kText, "loud"}).ok());
  EXPECT_NE(SetupLogging(LogOptions{LogFormat::kText, "loud"}).message().find("\"loud\""), std::string::npos);
  EXPECT_FALSE(ParseLogFormat("xml").ok());
  EXPECT_EQ(*ParseLogFormat("json"), LogFormat::kJson);
}

}  // namespace
}  // namespace ws::server
