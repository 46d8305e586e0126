#include "daemon/core/text.h"

namespace ws {

std::string_view Utf8Prefix(std::string_view s, size_t max_bytes) {
  if (s.size() <= max_bytes) return s;
  size_t cut = max_bytes;
  // s[cut] is the first byte left out: while it continues a sequence, the
  // sequence started inside the prefix; drop it (at most 3 bytes back).
  for (int i = 0; i < 3 && cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80; ++i) --cut;
  return s.substr(0, cut);
}

std::string Truncate(std::string_view s, size_t max_bytes) {
  if (s.size() <= max_bytes) return std::string(s);
  constexpr size_t kSuffix = 40;  // "... (" + 20 digits + " more bytes)" fits
  std::string_view keep = Utf8Prefix(s, max_bytes > kSuffix ? max_bytes - kSuffix : 0);
  std::string out(keep);
  out += "... (" + std::to_string(s.size() - keep.size()) + " more bytes)";
  return out;
}

void ErrorList::Add(std::string line) {
  ++count_;
  if (lines_.size() < keep_) lines_.push_back(std::move(line));
}

std::string ErrorList::Join(std::string_view sep, bool lead) const {
  std::string out;
  for (size_t i = 0; i < lines_.size(); ++i) {
    if (i || lead) out += sep;
    out += lines_[i];
  }
  if (count_ > lines_.size()) {
    if (!lines_.empty() || lead) out += sep;
    out += "... and " + std::to_string(count_ - lines_.size()) + " more";
  }
  return out;
}

std::string JoinCapped(const std::vector<std::string>& items, size_t keep) {
  std::string out;
  for (size_t i = 0; i < items.size() && i < keep; ++i) out += (i ? ", " : "") + items[i];
  if (items.size() > keep) out += (out.empty() ? "... and " : ", ... and ") + std::to_string(items.size() - keep) + " more";
  return out;
}

}  // namespace ws
