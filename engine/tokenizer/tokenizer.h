// Hugging Face tokenizer.json (+ tokenizer_config.json) for moe-serve: byte-level BPE
// (GPT-2 / Qwen2 / Llama-3 / OLMoE style) and SentencePiece-style BPE with byte fallback
// (Mixtral / Llama style). Encode and Decode give exactly the ids and text of the Hugging Face
// `tokenizers` library (verified against it in tests/tokenizer/). Thread-safe: one Tokenizer
// can serve many threads; each request uses its own StreamingDecoder.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/tokenizer/chat_template.h"
#include "nlohmann/json.hpp"

namespace moe {

namespace tokenizer_internal {
class AddedVocabulary;
class BpeModel;
class Decoder;
class DecodeStage;
class Normalizer;
class PostProcessor;
class PreTokenizer;
}  // namespace tokenizer_internal

struct EncodeOptions {
  // Adds what the post-processor adds around a single sequence (e.g. BOS for Llama/Mixtral).
  bool add_special_tokens = true;
  // Special-token strings in the text ("<|im_start|>", "<s>") become their ids only when true;
  // by default they are tokenized as ordinary text. Non-special added tokens always match.
  bool parse_special_tokens = false;
};

class Tokenizer {
 public:
  // Reads tokenizer.json and, when given, tokenizer_config.json (BOS/EOS, add_bos_token, the
  // chat template).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(
      const std::string& tokenizer_json_path,
      const std::optional<std::string>& tokenizer_config_json_path = std::nullopt);
  // `dir`/tokenizer.json plus `dir`/tokenizer_config.json when that file exists, and
  // `dir`/chat_template.jinja when that exists (it takes precedence over the config's
  // chat_template, as in transformers).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromModelDir(const std::string& dir);
  // From file contents (tests, fuzzing).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      std::string_view tokenizer_json,
      std::optional<std::string_view> tokenizer_config_json = std::nullopt);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // InvalidArgument when `text` is not valid UTF-8 (the message names the byte offset).
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              const EncodeOptions& options = {}) const;
  // Ids the tokenizer does not know are skipped, as in the reference.
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids,
                                     bool skip_special_tokens = false) const;

  // One past the largest id (model vocab and added tokens).
  int32_t vocab_size() const { return vocab_size_; }
  std::optional<int32_t> bos_id() const { return bos_id_; }
  const std::vector<int32_t>& eos_ids() const { return eos_ids_; }
  std::optional<int32_t> TokenToId(std::string_view token) const;
  std::optional<std::string> IdToToken(int32_t id) const;
  bool IsSpecial(int32_t id) const;

  // Whether ApplyChatTemplate can run: OK with a chat template that parsed, else
  // FailedPrecondition saying why not (the model has none, or its template did not parse: a
  // broken or unsupported template does not stop the tokenizer from loading).
  const absl::Status& chat_template_status() const { return chat_template_status_; }
  // Renders a conversation with the chat template as transformers' apply_chat_template(...,
  // tokenize=False) does: `messages` (an array of {"role", "content", ...} objects), the
  // options, the config's bos_token / eos_token strings, and `variables` (an object of further
  // template variables, e.g. "enable_thinking", "tools"). The caller encodes the text with
  // add_special_tokens false and parse_special_tokens true, as transformers does.
  struct ChatOptions {
    // End with the opening of an assistant turn.
    bool add_generation_prompt = true;
    // End inside the last message instead (the model continues it): its content is the end of
    // the text, the template's end-of-turn markup after it cut off. Not with
    // add_generation_prompt.
    bool continue_final_message = false;
  };
  absl::StatusOr<std::string> ApplyChatTemplate(
      const nlohmann::ordered_json& messages, const ChatOptions& options,
      const nlohmann::ordered_json& variables = nlohmann::ordered_json::object()) const;

 private:
  friend class StreamingDecoder;
  Tokenizer();
  absl::Status ApplyConfig(std::string_view tokenizer_config_json);
  // Parses `source` as the chat template; `origin` names where it came from in messages.
  void SetChatTemplate(std::string_view source, std::string_view origin);
  // The token string Decode uses for `id`, or nullptr for an unknown id.
  const std::string* TokenString(int32_t id) const;

  std::unique_ptr<tokenizer_internal::Normalizer> normalizer_;
  std::unique_ptr<tokenizer_internal::PreTokenizer> pre_tokenizer_;
  std::unique_ptr<tokenizer_internal::BpeModel> model_;
  std::unique_ptr<tokenizer_internal::PostProcessor> post_processor_;
  std::unique_ptr<tokenizer_internal::Decoder> decoder_;
  std::unique_ptr<tokenizer_internal::AddedVocabulary> added_;
  absl::flat_hash_map<int32_t, std::string> added_content_by_id_;
  absl::flat_hash_map<std::string, int32_t> added_id_by_content_;
  std::vector<bool> is_special_;  // by id
  int32_t vocab_size_ = 0;
  std::optional<int32_t> bos_id_;
  std::vector<int32_t> eos_ids_;
  // tokenizer_config.json's bos_token / eos_token strings (template variables).
  std::optional<std::string> bos_token_;
  std::optional<std::string> eos_token_;
  std::optional<ChatTemplate> chat_template_;
  absl::Status chat_template_status_ = absl::FailedPreconditionError(
      "the model has no chat template (neither chat_template.jinja nor a chat_template in "
      "tokenizer_config.json)");
};

// Incremental detokenization for one generated sequence. Push returns only text that later
// ids cannot change (never part of a UTF-8 character, byte-fallback runs held until complete,
// SentencePiece's leading space handled); Push for every id followed by Flush concatenates to
// exactly Tokenizer::Decode of all ids. The Tokenizer must outlive the decoder.
class StreamingDecoder {
 public:
  explicit StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);
  ~StreamingDecoder();

  std::string Push(int32_t id);
  // Emits what is held back and resets the decoder for a new sequence.
  std::string Flush();
  // Not OK if a decoder step failed (regex resource limits only); text may then be missing.
  const absl::Status& status() const { return status_; }

 private:
  std::string Collect(bool finish, const std::string* token);

  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::unique_ptr<tokenizer_internal::DecodeStage> stage_;
  absl::Status status_;
};

}  // namespace moe
