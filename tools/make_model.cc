// moe-make-model: writes a synthetic Mixtral-architecture checkpoint with deterministic random
// weights (the built-in demo model, benchmark models).
//
//   moe-make-model --preset=demo --out=build/demo_model [--tokenizer=tokenizer.json]
//                  [--chat_template=template.jinja]
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/common/program_usage.h"
#include "engine/model/synthetic_model.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"

ABSL_FLAG(std::string, preset, "demo", "Model shape: demo or bench-mixtral");
ABSL_FLAG(std::string, out, "", "Directory to write config.json and model.safetensors to");
ABSL_FLAG(std::string, tokenizer, "",
          "Optional tokenizer.json to copy beside the model (with the tokenizer_config.json next "
          "to it, if any); vocabulary size, BOS and EOS follow it");
ABSL_FLAG(std::string, chat_template, "",
          "Optional Jinja chat template to write beside the model as chat_template.jinja "
          "(checked to parse)");
ABSL_FLAG(int32_t, layers, 0, "Override the number of layers (0 = preset)");
ABSL_FLAG(bool, f32, false, "Write float32 weights instead of bfloat16");
ABSL_FLAG(uint64_t, seed, 1, "Random seed");

int main(int argc, char** argv) {
  moe::SetProgramUsage("tools/make_model.cc",
                       "Writes a synthetic MoE checkpoint. --out is required.");
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
  const std::filesystem::path tokenizer_config =
      std::filesystem::path(tokenizer).parent_path() / "tokenizer_config.json";
  const bool has_tokenizer_config = !tokenizer.empty() && std::filesystem::exists(tokenizer_config);
  if (!tokenizer.empty()) {
    auto loaded = moe::Tokenizer::FromFile(
        tokenizer, has_tokenizer_config ? std::optional<std::string>(tokenizer_config.string())
                                        : std::nullopt);
    if (!loaded.ok()) {
      std::cerr << "moe-make-model: " << loaded.status().message() << "\n";
      return 2;
    }
    spec->vocab_size = (*loaded)->vocab_size();
    spec->bos_token_id = (*loaded)->bos_id().value_or(-1);
    if (!(*loaded)->eos_ids().empty()) spec->eos_token_id = (*loaded)->eos_ids().front();
  }
  const std::string chat_template = absl::GetFlag(FLAGS_chat_template);
  if (!chat_template.empty()) {
    std::ifstream in(chat_template, std::ios::binary);
    const std::string source((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
    absl::StatusOr<moe::ChatTemplate> parsed = moe::ChatTemplate::Parse(source);
    if (!in.good() && !in.eof()) parsed = absl::NotFoundError("cannot read it");
    if (!parsed.ok()) {
      std::cerr << "moe-make-model: --chat_template=" << chat_template << ": "
                << parsed.status().message() << "\n";
      return 2;
    }
  }
  if (absl::Status status = moe::WriteSyntheticModel(*spec, out); !status.ok()) {
    std::cerr << "moe-make-model: " << status.message() << "\n";
    return 1;
  }
  if (!tokenizer.empty()) {
    std::error_code error;
    const auto overwrite = std::filesystem::copy_options::overwrite_existing;
    std::filesystem::copy_file(tokenizer, std::filesystem::path(out) / "tokenizer.json", overwrite,
                               error);
    if (!error && has_tokenizer_config) {
      std::filesystem::copy_file(
          tokenizer_config, std::filesystem::path(out) / "tokenizer_config.json", overwrite, error);
    }
    if (error) {
      std::cerr << "moe-make-model: copying " << tokenizer << ": " << error.message() << "\n";
      return 1;
    }
  }
  if (!chat_template.empty()) {
    std::error_code error;
    std::filesystem::copy_file(chat_template, std::filesystem::path(out) / "chat_template.jinja",
                               std::filesystem::copy_options::overwrite_existing, error);
    if (error) {
      std::cerr << "moe-make-model: copying " << chat_template << ": " << error.message() << "\n";
      return 1;
    }
  }
  std::cout << "wrote " << out << " (" << absl::GetFlag(FLAGS_preset) << ", vocab "
            << spec->vocab_size << ", " << spec->num_layers << " layers)\n";
  return 0;
}
