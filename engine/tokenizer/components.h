// Normalizers, pre-tokenizers and post-processors of tokenizer.json, with the semantics of the
// Hugging Face `tokenizers` library (normalizer.rs, pre_tokenizer.rs, processors/).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moe::tokenizer_internal {

// One piece of the text on its way to the model. `added_id` >= 0 marks an added token that is
// already resolved; those pieces are left alone by later stages.
struct Piece {
  std::string text;
  // True when the piece starts at offset 0 of the original text (Metaspace "first").
  bool at_origin = false;
  int32_t added_id = -1;
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual absl::Status Normalize(std::string& text) const = 0;
};

// Null JSON gives nullptr (no normalizer).
absl::StatusOr<std::unique_ptr<Normalizer>> MakeNormalizer(const nlohmann::json& config);

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Splits/transforms every piece with added_id < 0; drops pieces that become empty.
  virtual absl::Status PreTokenize(std::vector<Piece>& pieces) const = 0;
};

absl::StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizer(const nlohmann::json& config);

// Maps a token name (as used in TemplateProcessing) to ids; used to resolve special tokens.
class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Adds the special tokens of a single sequence around `ids`.
  virtual void Process(std::vector<int32_t>& ids) const = 0;
  // The ids a single sequence gets in front of / after its own ids.
  virtual void Prefix(std::vector<int32_t>& ids) const = 0;
  virtual void Suffix(std::vector<int32_t>& ids) const = 0;
};

// Every id the post-processor adds must lie in [0, vocab_size).
absl::StatusOr<std::unique_ptr<PostProcessor>> MakePostProcessor(const nlohmann::json& config,
                                                                 int32_t vocab_size);

// TemplateProcessing "[prefix] $A [suffix]" built from explicit ids (tokenizer_config.json's
// add_bos_token / add_eos_token for Llama-family tokenizers).
std::unique_ptr<PostProcessor> MakeSimpleTemplate(std::vector<int32_t> prefix,
                                                  std::vector<int32_t> suffix);

// Byte-level alphabet of GPT-2: byte -> the UTF-8 text of its printable stand-in character.
const std::string& ByteToUnicode(uint8_t byte);
// Inverse: code point -> byte, or -1 when the code point is not in the alphabet.
int ByteFromUnicode(char32_t code_point);

}  // namespace moe::tokenizer_internal
