// Argument parsing shared by the floor benchmarks.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <optional>

namespace ws::bench {

// A non-negative integer with an optional binary K/M/G suffix ("4G"); nullopt
// when `s` is not one.
inline std::optional<uint64_t> ParseSize(const char* s) {
  char* end = nullptr;
  unsigned long long v = std::strtoull(s, &end, 10);
  if (end == s) return std::nullopt;
  switch (*end) {
    case 'K': case 'k': v <<= 10; ++end; break;
    case 'M': case 'm': v <<= 20; ++end; break;
    case 'G': case 'g': v <<= 30; ++end; break;
    default: break;
  }
  if (*end != '\0') return std::nullopt;
  return v;
}

}  // namespace ws::bench
