// Bounded text for errors and logs: an untrusted string (a name, a reason, a
// list of problems) must not turn into an unbounded message or log line.
//
// Thread-safety: pure functions and a plain value type.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace ws {

// Problems listed in one error message; the rest are counted ("... and N more").
inline constexpr size_t kMaxListedErrors = 20;
// Bytes of a name quoted inside a message about that name being too long.
inline constexpr size_t kMaxQuotedNameBytes = 64;
// Bytes kept of a free-text reason (an abort reason, an engine's error).
inline constexpr size_t kMaxReasonBytes = 4096;

// The longest prefix of `s` of at most `max_bytes` bytes that does not end in
// the middle of a UTF-8 sequence.
std::string_view Utf8Prefix(std::string_view s, size_t max_bytes);

// `s` when it has at most `max_bytes` bytes; otherwise a UTF-8-safe prefix
// followed by "... (N more bytes)", N counting what was left out, the whole
// at most max(max_bytes, 40) bytes.
std::string Truncate(std::string_view s, size_t max_bytes);

// Collects the lines of a multi-problem error message: keeps the first `keep`
// and counts the others.
class ErrorList {
 public:
  explicit ErrorList(size_t keep = kMaxListedErrors) : keep_(keep) {}
  void Add(std::string line);
  size_t size() const { return count_; }  // all added, kept or not
  bool empty() const { return count_ == 0; }
  // The kept lines, each preceded by `sep` except the first when `lead` is
  // false, then "... and N more" when lines were left out.
  std::string Join(std::string_view sep = "\n", bool lead = false) const;

 private:
  size_t keep_;
  size_t count_ = 0;
  std::vector<std::string> lines_;
};

// "a, b, c" of at most `keep` items, then ", ... and N more".
std::string JoinCapped(const std::vector<std::string>& items, size_t keep = kMaxListedErrors);

}  // namespace ws
