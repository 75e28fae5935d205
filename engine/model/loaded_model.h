// A checkpoint directory opened and checked: config, memory-mapped tensors, bound weights.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model/model_config.h"
#include "engine/model/model_weights.h"
#include "engine/model/safetensors.h"

namespace moe {

struct LoadedModel {
  std::string directory;
  ModelConfig config;
  TensorStore tensors;   // owns the mappings that `weights` points into
  ModelWeights weights;
};

// Reads <dir>/config.json and the safetensors checkpoint, validates every tensor.
absl::StatusOr<std::unique_ptr<LoadedModel>> LoadModel(const std::string& directory);

}  // namespace moe
