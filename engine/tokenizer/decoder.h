// Decoders of tokenizer.json (decoders/ of Hugging Face `tokenizers`), in two forms:
//  - DecodeChain: the reference semantics over the whole list of token strings;
//  - streaming stages that see token text as it arrives and emit text as soon as it can no
//    longer change, so that the concatenation of everything emitted equals the whole decode.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moe::tokenizer_internal {

// A run of text in a decoder stream. `token_end` closes the current token; tokens may arrive
// in several chunks (after Fuse everything is one ever-growing token).
struct Chunk {
  std::string text;
  bool token_end = true;
};

class DecodeStage {
 public:
  virtual ~DecodeStage() = default;
  virtual absl::Status Push(Chunk chunk, std::vector<Chunk>& out) = 0;
  // End of input: emit everything held back.
  virtual absl::Status Finish(std::vector<Chunk>& out) = 0;
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual absl::Status DecodeChain(std::vector<std::string>& tokens) const = 0;
  virtual std::unique_ptr<DecodeStage> MakeStage() const = 0;
};

// Null JSON gives nullptr: tokens are then joined with spaces (the reference's default).
absl::StatusOr<std::unique_ptr<Decoder>> MakeDecoder(const nlohmann::json& config);

// A stage that joins tokens with " " (used when there is no decoder).
std::unique_ptr<DecodeStage> MakeJoinWithSpaceStage();

}  // namespace moe::tokenizer_internal
