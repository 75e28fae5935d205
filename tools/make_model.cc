// moe-make-model: writes a synthetic Mixtral-architecture checkpoint with deterministic random
// weights (the built-in demo model, benchmark models).
//
//   moe-make-model --preset=demo --out=build/demo_model [--tokenizer=tokenizer.json]
#include <filesystem>
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "engine/model/synthetic_model.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, preset, "demo", "Model shape: demo or bench-mixtral");
ABSL_FLAG(std::string, out, "", "Directory to write config.json and model.safetensors to");
ABSL_FLAG(std::string, tokenizer, "",
          "Optional tokenizer.json to copy beside the model; the vocabulary size follows it");
ABSL_FLAG(int32_t, layers, 0, "Override the number of layers (0 = preset)");
ABSL_FLAG(bool, f32, false, "Write float32 weights instead of bfloat16");
ABSL_FLAG(uint64_t, seed, 1, "Random seed");

namespace {

// The id space of a tokenizer.json: max id of model.vocab and added_tokens, plus one.
int32_t TokenizerVocabSize(const std::string& path) {
  std::ifstream in(path);
  const nlohmann::json json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) return -1;
  int64_t max_id = -1;
  if (json.contains("model") && json["model"].contains("vocab") && json["model"]["vocab"].is_object()) {
    for (const auto& [token, id] : json["model"]["vocab"].items()) {
      if (id.is_number_integer()) max_id = std::max<int64_t>(max_id, id.get<int64_t>());
    }
  }
  if (json.contains("added_tokens") && json["added_tokens"].is_array()) {
    for (const auto& token : json["added_tokens"]) {
      if (token.contains("id") && token["id"].is_number_integer()) {
        max_id = std::max<int64_t>(max_id, token["id"].get<int64_t>());
      }
    }
  }
  return static_cast<int32_t>(max_id + 1);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Writes a synthetic MoE checkpoint. --out is required.");
  absl::ParseCommandLine(argc, argv);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) {
    std::cerr << "moe-make-model: --out is required\n";
    return 2;
  }
  auto spec = moe::SyntheticPreset(absl::GetFlag(FLAGS_preset));
  if (!spec.ok()) {
    std::cerr << "moe-make-model: " << spec.status().message() << "\n";
    return 2;
  }
  if (absl::GetFlag(FLAGS_layers) > 0) spec->num_layers = absl::GetFlag(FLAGS_layers);
  spec->f32_weights = absl::GetFlag(FLAGS_f32);
  spec->seed = absl::GetFlag(FLAGS_seed);
  const std::string tokenizer = absl::GetFlag(FLAGS_tokenizer);
  if (!tokenizer.empty()) {
    const int32_t vocab = TokenizerVocabSize(tokenizer);
    if (vocab <= 0) {
      std::cerr << "moe-make-model: " << tokenizer << ": not a tokenizer.json with a vocabulary\n";
      return 2;
    }
    spec->vocab_size = vocab;
  }
  if (absl::Status status = moe::WriteSyntheticModel(*spec, out); !status.ok()) {
    std::cerr << "moe-make-model: " << status.message() << "\n";
    return 1;
  }
  if (!tokenizer.empty()) {
    std::error_code error;
    std::filesystem::copy_file(tokenizer, std::filesystem::path(out) / "tokenizer.json",
                               std::filesystem::copy_options::overwrite_existing, error);
    if (error) {
      std::cerr << "moe-make-model: copying " << tokenizer << ": " << error.message() << "\n";
      return 1;
    }
  }
  std::cout << "wrote " << out << " (" << absl::GetFlag(FLAGS_preset) << ", vocab "
            << spec->vocab_size << ", " << spec->num_layers << " layers)\n";
  return 0;
}
