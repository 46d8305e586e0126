#include "daemon/core/manifest.h"

namespace ws {

int64_t NumElements(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

bool ShapeInRange(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    if (d < 0) return false;
    if (d == 0) continue;
    if (n > kMaxTensorElements / d) return false;
    n *= d;
  }
  return true;
}

std::string ShapeToString(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

View2D As2D(const Shape& s) {
  if (s.empty()) return {1, 1};
  if (s.size() == 1) return {s[0], 1};
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < s.size(); ++i) rows *= s[i];
  return {rows, s.back()};
}

}  // namespace ws
