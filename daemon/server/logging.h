// Process-wide logging setup: spdlog to stderr, as human-readable text or as
// one JSON object per line ({"ts","level","logger","msg"}) for log shippers.
// Every message is capped at kMaxLogMessageBytes, whichever format.
// Thread-safety: SetupLogging() is meant to run once at start-up, before other
// threads log; the installed loggers are thread-safe.
#pragma once

#include <memory>
#include <string>

#include <spdlog/formatter.h>

#include "daemon/core/status.h"

namespace ws::server {

enum class LogFormat { kText, kJson };

// Bytes of one log message (before the line's own formatting); a longer one
// is cut UTF-8-safely and ends in "... (N more bytes)".
inline constexpr size_t kMaxLogMessageBytes = 8192;

struct LogOptions {
  LogFormat format = LogFormat::kText;
  std::string level = "info";  // trace | debug | info | warn | error | critical | off
};

Result<LogFormat> ParseLogFormat(const std::string& s);

// Installs the default logger ("weightsyncd"). Errors name a bad level.
Status SetupLogging(const LogOptions& opts);

// Formatter emitting {"ts":"2025-01-02T03:04:05.678Z","level":"info","logger":"weightsyncd","msg":"..."}
// plus a newline. Strings are escaped per RFC 8259; invalid UTF-8 becomes U+FFFD.
class JsonLogFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override;
  std::unique_ptr<spdlog::formatter> clone() const override;
};

// Wraps another formatter: messages longer than `max_bytes` reach it cut to
// max_bytes (UTF-8-safe, "... (N more bytes)" at the end).
class CappedFormatter final : public spdlog::formatter {
 public:
  CappedFormatter(std::unique_ptr<spdlog::formatter> inner, size_t max_bytes)
      : inner_(std::move(inner)), max_bytes_(max_bytes) {}
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override;
  std::unique_ptr<spdlog::formatter> clone() const override;

 private:
  std::unique_ptr<spdlog::formatter> inner_;
  size_t max_bytes_;
};

// Appends `s` as a JSON string literal (with quotes) to `out`.
void AppendJsonString(std::string_view s, std::string& out);

}  // namespace ws::server
