// Element types weightsync moves. Pure C++, no CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace ws {

enum class DType : uint8_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline size_t DTypeSize(DType d) { return d == DType::kF32 ? 4 : 2; }

// "f32" / "bf16" / "f16".
const char* DTypeName(DType d);

// Accepts our names ("f32", "fp32", "float32", "bf16", "bfloat16", "f16",
// "fp16", "float16") and safetensors names ("F32", "BF16", "F16").
std::optional<DType> ParseDType(std::string_view s);

// Safetensors header spelling: "F32", "BF16", "F16".
const char* DTypeSafetensorsName(DType d);

}  // namespace ws
