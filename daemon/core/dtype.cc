#include "daemon/core/dtype.h"

#include <algorithm>
#include <string>

namespace ws {

const char* DTypeName(DType d) {
  switch (d) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "f16";
  }
  return "?";
}

const char* DTypeSafetensorsName(DType d) {
  switch (d) {
    case DType::kF32: return "F32";
    case DType::kBF16: return "BF16";
    case DType::kF16: return "F16";
  }
  return "?";
}

std::optional<DType> ParseDType(std::string_view s) {
  std::string l(s);
  std::transform(l.begin(), l.end(), l.begin(), [](unsigned char c) { return std::tolower(c); });
  if (l == "f32" || l == "fp32" || l == "float32" || l == "float") return DType::kF32;
  if (l == "bf16" || l == "bfloat16") return DType::kBF16;
  if (l == "f16" || l == "fp16" || l == "float16" || l == "half") return DType::kF16;
  return std::nullopt;
}

}  // namespace ws
