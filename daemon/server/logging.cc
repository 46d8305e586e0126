#include "daemon/server/logging.h"

#include <chrono>
#include <ctime>

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "daemon/core/text.h"

namespace ws::server {

Result<LogFormat> ParseLogFormat(const std::string& s) {
  if (s == "text") return LogFormat::kText;
  if (s == "json") return LogFormat::kJson;
  return InvalidArgument("log format \"" + s + "\" is not one of: text, json");
}

namespace {

// Length of the valid UTF-8 sequence starting at s[i], or 0 if invalid.
size_t Utf8SeqLen(std::string_view s, size_t i) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  auto cont = [&](size_t k) { return k < s.size() && (b(k) & 0xC0) == 0x80; };
  unsigned char c = b(i);
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (!cont(i + 1) || !cont(i + 2)) return 0;
    if (c == 0xE0 && b(i + 1) < 0xA0) return 0;  // overlong
    if (c == 0xED && b(i + 1) >= 0xA0) return 0;  // surrogates
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (!cont(i + 1) || !cont(i + 2) || !cont(i + 3)) return 0;
    if (c == 0xF0 && b(i + 1) < 0x90) return 0;
    if (c == 0xF4 && b(i + 1) >= 0x90) return 0;
    return 4;
  }
  return 0;
}

}  // namespace

void AppendJsonString(std::string_view s, std::string& out) {
  static const char* kHex = "0123456789abcdef";
  out.push_back('"');
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    switch (c) {
      case '"': out += "\\\""; ++i; continue;
      case '\\': out += "\\\\"; ++i; continue;
      case '\n': out += "\\n"; ++i; continue;
      case '\r': out += "\\r"; ++i; continue;
      case '\t': out += "\\t"; ++i; continue;
      case '\b': out += "\\b"; ++i; continue;
      case '\f': out += "\\f"; ++i; continue;
      default: break;
    }
    if (c < 0x20 || c == 0x7f) {
      out += "\\u00";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 15]);
      ++i;
      continue;
    }
    size_t n = Utf8SeqLen(s, i);
    if (n == 0) {
      out += "\\ufffd";
      ++i;
      continue;
    }
    out.append(s.data() + i, n);
    i += n;
  }
  out.push_back('"');
}

void JsonLogFormatter::format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) {
  using namespace std::chrono;
  auto t = msg.time;
  std::time_t secs = system_clock::to_time_t(t);
  auto ms = duration_cast<milliseconds>(t.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char ts[40];
  size_t n = std::strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
  std::snprintf(ts + n, sizeof(ts) - n, ".%03dZ", static_cast<int>(ms));

  std::string line;
  line.reserve(msg.payload.size() + 96);
  line += "{\"ts\":\"";
  line += ts;
  line += "\",\"level\":";
  auto lv = spdlog::level::to_string_view(msg.level);
  AppendJsonString(std::string_view(lv.data(), lv.size()), line);
  line += ",\"logger\":";
  AppendJsonString(std::string_view(msg.logger_name.data(), msg.logger_name.size()), line);
  line += ",\"msg\":";
  AppendJsonString(std::string_view(msg.payload.data(), msg.payload.size()), line);
  line += "}\n";
  dest.append(line.data(), line.data() + line.size());
}

std::unique_ptr<spdlog::formatter> JsonLogFormatter::clone() const {
  return std::make_unique<JsonLogFormatter>();
}

void CappedFormatter::format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) {
  if (msg.payload.size() <= max_bytes_) return inner_->format(msg, dest);
  const std::string capped = Truncate(std::string_view(msg.payload.data(), msg.payload.size()), max_bytes_);
  spdlog::details::log_msg copy = msg;
  copy.payload = spdlog::string_view_t(capped.data(), capped.size());
  inner_->format(copy, dest);
}

std::unique_ptr<spdlog::formatter> CappedFormatter::clone() const {
  return std::make_unique<CappedFormatter>(inner_->clone(), max_bytes_);
}

Status SetupLogging(const LogOptions& opts) {
  static const char* kLevels[] = {"trace", "debug", "info", "warn", "warning", "error", "err", "critical", "off"};
  bool known = false;
  for (const char* l : kLevels) known = known || opts.level == l;
  if (!known)
    return InvalidArgument("log level \"" + opts.level +
                           "\" is not one of: trace, debug, info, warn, error, critical, off");
  auto level = spdlog::level::from_str(opts.level == "warning" ? "warn" : opts.level);

  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>(
      opts.format == LogFormat::kJson ? spdlog::color_mode::never : spdlog::color_mode::automatic);
  auto logger = std::make_shared<spdlog::logger>("weightsyncd", sink);
  std::unique_ptr<spdlog::formatter> inner;
  if (opts.format == LogFormat::kJson)
    inner = std::make_unique<JsonLogFormatter>();
  else
    inner = std::make_unique<spdlog::pattern_formatter>("%Y-%m-%dT%H:%M:%S.%e%z %^%-5l%$ [%n] %v");
  logger->set_formatter(std::make_unique<CappedFormatter>(std::move(inner), kMaxLogMessageBytes));
  logger->set_level(level);
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
  return Status::Ok();
}

}  // namespace ws::server
