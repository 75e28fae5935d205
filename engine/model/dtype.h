// Element types of checkpoint tensors and the conversions the kernels need.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include "absl/strings/string_view.h"

namespace moe {

enum class DType : uint8_t { kBF16, kF16, kF32, kI32, kI64 };

// Bytes per element.
inline constexpr int64_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
    case DType::kF16:
      return 2;
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
  }
  return 0;
}

// The safetensors spelling ("BF16", "F16", "F32", "I32", "I64").
absl::string_view DTypeName(DType dtype);
std::optional<DType> ParseSafetensorsDType(absl::string_view name);

inline bool IsFloatingWeightType(DType dtype) {
  return dtype == DType::kBF16 || dtype == DType::kF16 || dtype == DType::kF32;
}

// bf16 is the top half of an IEEE float32.
inline float Bf16ToFloat(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// Round to nearest even, as torch does when casting float32 to bfloat16.
inline uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float F16ToFloat(uint16_t bits);

}  // namespace moe
