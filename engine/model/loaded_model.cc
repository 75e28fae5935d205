#include "engine/model/loaded_model.h"

#include "engine/common/status_macros.h"

namespace moe {

absl::StatusOr<std::unique_ptr<LoadedModel>> LoadModel(const std::string& directory) {
  auto model = std::make_unique<LoadedModel>();
  model->directory = directory;
  ASSIGN_OR_RETURN(model->config, LoadModelConfig(directory));
  ASSIGN_OR_RETURN(model->tensors, TensorStore::OpenDirectory(directory));
  ASSIGN_OR_RETURN(model->weights, BindModelWeights(model->config, model->tensors));
  return model;
}

}  // namespace moe
