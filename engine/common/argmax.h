// Greedy choice over a row of logits, defined once for the sampler, the backends' device-side
// argmax and the offline tools.
#pragma once

#include <cstdint>
#include <span>

namespace moe {

// Index of the largest value, the lowest index among equals; a scan that moves on only to a
// strictly larger value, so a NaN never wins unless it is values[0] (then nothing beats it).
// 0 for an empty row.
inline int32_t ArgMax(std::span<const float> values) {
  int32_t best = 0;
  for (int32_t i = 1; i < static_cast<int32_t>(values.size()); ++i) {
    if (values[i] > values[best]) best = i;
  }
  return best;
}

}  // namespace moe
