#include "engine/tokenizer/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/added_vocabulary.h"
#include "engine/tokenizer/bpe_model.h"
#include "engine/tokenizer/components.h"
#include "engine/tokenizer/decoder.h"
#include "engine/tokenizer/json_util.h"
#include "engine/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using nlohmann::json;
using tokenizer_internal::JsonError;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return contents.str();
}

const json& Field(const json& object, std::string_view key) {
  static const json* null_json = new json();
  const auto it = object.find(key);
  return it == object.end() ? *null_json : *it;
}

// A token in tokenizer_config.json: a string, or an AddedToken object with "content".
absl::StatusOr<std::optional<std::string>> ConfigToken(const json& config, std::string_view key) {
  const json& value = Field(config, key);
  if (value.is_null()) return std::optional<std::string>();
  if (value.is_string()) return std::optional<std::string>(value.get<std::string>());
  if (value.is_object() && value.contains("content") && value["content"].is_string()) {
    return std::optional<std::string>(value["content"].get<std::string>());
  }
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer_config.json: '", tokenizer_internal::Sv(key),
                   "' must be a string or {\"content\": ...}, got ", value.dump()));
}

}  // namespace

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(
    const std::string& tokenizer_json_path,
    const std::optional<std::string>& tokenizer_config_json_path) {
  ASSIGN_OR_RETURN(const std::string tokenizer_json, ReadFile(tokenizer_json_path));
  std::optional<std::string> config_json;
  if (tokenizer_config_json_path.has_value()) {
    ASSIGN_OR_RETURN(config_json, ReadFile(*tokenizer_config_json_path));
  }
  auto tokenizer = FromJson(tokenizer_json, config_json);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat(tokenizer_json_path, ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromModelDir(const std::string& dir) {
  const std::filesystem::path base(dir);
  const std::filesystem::path config = base / "tokenizer_config.json";
  std::error_code error;
  std::optional<std::string> config_path;
  if (std::filesystem::exists(config, error)) config_path = config.string();
  ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer,
                   FromFile((base / "tokenizer.json").string(), config_path));
  const std::filesystem::path chat_template = base / "chat_template.jinja";
  if (std::filesystem::exists(chat_template, error)) {
    absl::StatusOr<std::string> source = ReadFile(chat_template.string());
    if (source.ok()) {
      tokenizer->SetChatTemplate(*source, chat_template.string());
    } else {
      tokenizer->chat_template_status_ = absl::FailedPreconditionError(source.status().message());
    }
  }
  return tokenizer;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    std::string_view tokenizer_json, std::optional<std::string_view> tokenizer_config_json) {
  const json root = json::parse(tokenizer_json, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: not a JSON object");
  }
  auto tokenizer = std::unique_ptr<Tokenizer>(new Tokenizer());
  const json& model = Field(root, "model");
  if (model.is_null()) return JsonError("model", "is missing");
  ASSIGN_OR_RETURN(tokenizer->model_, tokenizer_internal::BpeModel::FromJson(model));
  ASSIGN_OR_RETURN(tokenizer->normalizer_,
                   tokenizer_internal::MakeNormalizer(Field(root, "normalizer")));
  ASSIGN_OR_RETURN(tokenizer->pre_tokenizer_,
                   tokenizer_internal::MakePreTokenizer(Field(root, "pre_tokenizer")));
  ASSIGN_OR_RETURN(tokenizer->decoder_, tokenizer_internal::MakeDecoder(Field(root, "decoder")));

  std::vector<tokenizer_internal::AddedToken> added_tokens;
  const json& added = Field(root, "added_tokens");
  if (!added.is_null() && !added.is_array()) {
    return JsonError("added_tokens", "must be an array");
  }
  int64_t max_id = tokenizer->model_->id_end() - 1;
  for (const json& entry : added.is_array() ? added : json::array()) {
    constexpr char kWhere[] = "added_tokens";
    if (!entry.is_object()) return JsonError(kWhere, "each entry must be an object");
    tokenizer_internal::AddedToken token;
    ASSIGN_OR_RETURN(token.content, tokenizer_internal::GetString(entry, "content", kWhere));
    RETURN_IF_ERROR(tokenizer_internal::ValidateUtf8(token.content, "added token content"));
    ASSIGN_OR_RETURN(const int64_t id, tokenizer_internal::GetInt(entry, "id", -1, kWhere));
    ASSIGN_OR_RETURN(token.single_word,
                     tokenizer_internal::GetBool(entry, "single_word", false, kWhere));
    ASSIGN_OR_RETURN(token.lstrip, tokenizer_internal::GetBool(entry, "lstrip", false, kWhere));
    ASSIGN_OR_RETURN(token.rstrip, tokenizer_internal::GetBool(entry, "rstrip", false, kWhere));
    ASSIGN_OR_RETURN(token.special, tokenizer_internal::GetBool(entry, "special", false, kWhere));
    ASSIGN_OR_RETURN(token.normalized,
                     tokenizer_internal::GetBool(entry, "normalized", !token.special, kWhere));
    // A token of the model's vocab keeps its model id (as the reference resolves it).
    if (const auto model_id = tokenizer->model_->TokenToId(token.content)) {
      token.id = *model_id;
    } else if (id >= 0 && id <= INT32_MAX && id < (int64_t{1} << 24) + max_id) {
      token.id = static_cast<int32_t>(id);
    } else {
      return JsonError(kWhere, absl::StrCat("token '", token.content,
                                            "' needs a non-negative 'id' near the vocab"));
    }
    if (tokenizer->added_id_by_content_.contains(token.content)) continue;  // duplicate
    max_id = std::max<int64_t>(max_id, token.id);
    tokenizer->added_id_by_content_[token.content] = token.id;
    tokenizer->added_content_by_id_[token.id] = token.content;
    added_tokens.push_back(std::move(token));
  }
  tokenizer->vocab_size_ = static_cast<int32_t>(max_id + 1);
  tokenizer->is_special_.assign(tokenizer->vocab_size_, false);
  for (const auto& token : added_tokens) {
    if (!token.special) continue;
    // Decode skips every id whose token string is a special token's content.
    tokenizer->is_special_[token.id] = true;
  }
  // After added_tokens: the post-processor's ids may name added tokens.
  ASSIGN_OR_RETURN(
      tokenizer->post_processor_,
      tokenizer_internal::MakePostProcessor(Field(root, "post_processor"), tokenizer->vocab_size_));
  tokenizer->added_ = std::make_unique<tokenizer_internal::AddedVocabulary>();
  RETURN_IF_ERROR(tokenizer->added_->Init(std::move(added_tokens), tokenizer->normalizer_.get()));

  if (tokenizer_config_json.has_value()) {
    RETURN_IF_ERROR(tokenizer->ApplyConfig(*tokenizer_config_json));
  }
  return tokenizer;
}

absl::Status Tokenizer::ApplyConfig(std::string_view tokenizer_config_json) {
  const json config = json::parse(tokenizer_config_json, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError("tokenizer_config.json: not a JSON object");
  }
  auto resolve = [this](std::string_view key,
                        const std::optional<std::string>& token) -> absl::StatusOr<int32_t> {
    const auto id = TokenToId(*token);
    if (!id.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer_config.json: ", tokenizer_internal::Sv(key), " '", *token,
                       "' is not in the vocabulary"));
    }
    return *id;
  };
  ASSIGN_OR_RETURN(const auto bos, ConfigToken(config, "bos_token"));
  ASSIGN_OR_RETURN(const auto eos, ConfigToken(config, "eos_token"));
  if (bos.has_value()) {
    ASSIGN_OR_RETURN(bos_id_, resolve("bos_token", bos));
  }
  if (eos.has_value()) {
    ASSIGN_OR_RETURN(const int32_t eos_id, resolve("eos_token", eos));
    eos_ids_ = {eos_id};
  }
  bos_token_ = bos;
  eos_token_ = eos;
  // A string, or (transformers' multiple templates) a list of {"name", "template"} of which
  // apply_chat_template takes the one named "default".
  const json& chat_template = Field(config, "chat_template");
  constexpr char kOrigin[] = "tokenizer_config.json chat_template";
  if (chat_template.is_string()) {
    SetChatTemplate(chat_template.get_ref<const std::string&>(), kOrigin);
  } else if (chat_template.is_array()) {
    std::vector<std::string> names;
    bool found_default = false;
    for (const json& entry : chat_template) {
      const json& name = Field(entry, "name");
      const json& source = Field(entry, "template");
      if (!name.is_string() || !source.is_string()) continue;
      if (name.get_ref<const std::string&>() == "default") {
        SetChatTemplate(source.get_ref<const std::string&>(), kOrigin);
        found_default = true;
        break;
      }
      names.push_back(name.get<std::string>());
    }
    if (!found_default && !names.empty()) {
      chat_template_status_ = absl::FailedPreconditionError(
          absl::StrCat(kOrigin, " names templates (", absl::StrJoin(names, ", "),
                       ") but none 'default', the one transformers uses"));
    }
  } else if (!chat_template.is_null()) {
    chat_template_status_ = absl::FailedPreconditionError(
        absl::StrCat(kOrigin, " must be a string or a list of {\"name\", \"template\"}"));
  }
  // Llama-family tokenizers in transformers rebuild the post-processor from add_bos_token /
  // add_eos_token (LlamaTokenizerFast.update_post_processor); others keep tokenizer.json's.
  const json& tokenizer_class = Field(config, "tokenizer_class");
  if (tokenizer_class.is_string()) {
    std::string name = tokenizer_class.get<std::string>();
    if (name.ends_with("Fast")) name.resize(name.size() - 4);
    if (name == "LlamaTokenizer" || name == "CodeLlamaTokenizer" || name == "GemmaTokenizer") {
      ASSIGN_OR_RETURN(
          const bool add_bos,
          tokenizer_internal::GetBool(config, "add_bos_token", true, "tokenizer_config.json"));
      ASSIGN_OR_RETURN(
          const bool add_eos,
          tokenizer_internal::GetBool(config, "add_eos_token", false, "tokenizer_config.json"));
      if (add_bos && !bos_id_.has_value()) {
        return absl::InvalidArgumentError(
            "tokenizer_config.json: add_bos_token is true but bos_token is not set");
      }
      if (add_eos && eos_ids_.empty()) {
        return absl::InvalidArgumentError(
            "tokenizer_config.json: add_eos_token is true but eos_token is not set");
      }
      std::vector<int32_t> prefix, suffix;
      if (add_bos) prefix.push_back(*bos_id_);
      if (add_eos) suffix.push_back(eos_ids_.front());
      post_processor_ = tokenizer_internal::MakeSimpleTemplate(prefix, suffix);
    }
  }
  return absl::OkStatus();
}

void Tokenizer::SetChatTemplate(std::string_view source, std::string_view origin) {
  absl::StatusOr<ChatTemplate> parsed = ChatTemplate::Parse(source);
  if (parsed.ok()) {
    chat_template_ = *std::move(parsed);
    chat_template_status_ = absl::OkStatus();
  } else {
    chat_template_.reset();
    chat_template_status_ = absl::FailedPreconditionError(
        absl::StrCat("the model's chat template (", tokenizer_internal::Sv(origin),
                     ") is not supported: ", parsed.status().message()));
  }
}

absl::StatusOr<std::string> Tokenizer::ApplyChatTemplate(
    const nlohmann::ordered_json& messages, const ChatOptions& options,
    const nlohmann::ordered_json& variables) const {
  RETURN_IF_ERROR(chat_template_status_);
  // What apply_chat_template passes: tools and documents (None unless given), the special
  // tokens, the caller's variables, then messages and add_generation_prompt.
  nlohmann::ordered_json context = {{"tools", nullptr}, {"documents", nullptr}};
  if (variables.is_object()) context.update(variables);
  context["messages"] = messages;
  context["add_generation_prompt"] = options.add_generation_prompt;
  if (bos_token_.has_value()) context["bos_token"] = *bos_token_;
  if (eos_token_.has_value()) context["eos_token"] = *eos_token_;
  if (!options.continue_final_message) return chat_template_->Render(context);

  // transformers' way: render with a marker after the last message's content and cut the
  // text at the marker.
  constexpr std::string_view kTag = "CONTINUE_FINAL_MESSAGE_TAG ";
  constexpr std::string_view kTagStripped = "CONTINUE_FINAL_MESSAGE_TAG";
  if (options.add_generation_prompt) {
    return absl::InvalidArgumentError(
        "continue_final_message and add_generation_prompt exclude each other: one continues the "
        "last message, the other opens a new assistant turn");
  }
  if (!messages.is_array() || messages.empty() || !messages.back().is_object() ||
      !messages.back().contains("content") || !messages.back()["content"].is_string()) {
    return absl::InvalidArgumentError(
        "continue_final_message needs a last message with text content");
  }
  const std::string final_content = messages.back()["content"].get<std::string>();
  context["messages"].back()["content"] = absl::StrCat(final_content, tokenizer_internal::Sv(kTag));
  ASSIGN_OR_RETURN(std::string rendered, chat_template_->Render(context));
  // Python's str.strip() of ASCII whitespace (the other Unicode spaces it strips are not
  // expected around a message's content).
  constexpr std::string_view kSpace = " \t\n\r\f\v";
  const std::string_view content(final_content);
  const size_t first = content.find_first_not_of(kSpace);
  const std::string_view stripped =
      first == std::string_view::npos
          ? std::string_view()
          : content.substr(first, content.find_last_not_of(kSpace) - first + 1);
  const size_t tag_at = rendered.rfind(kTagStripped);
  if (tag_at == std::string::npos || rendered.find(stripped) == std::string::npos) {
    return absl::InvalidArgumentError(
        "continue_final_message: the chat template does not write the last message's content "
        "as given, so the text cannot end inside it");
  }
  if (std::string_view(rendered).substr(tag_at, kTag.size()) == kTag) {
    rendered.resize(tag_at);  // the template kept the content's spacing
  } else {
    // The template trimmed the content's trailing spacing (and the tag's): cut before the tag
    // and strip the spacing left there.
    rendered.resize(tag_at);
    const size_t last = rendered.find_last_not_of(kSpace);
    rendered.resize(last == std::string::npos ? 0 : last + 1);
  }
  return rendered;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text,
                                                       const EncodeOptions& options) const {
  RETURN_IF_ERROR(tokenizer_internal::ValidateUtf8(text));
  std::vector<tokenizer_internal::Piece> pieces;
  RETURN_IF_ERROR(
      added_->ExtractAndNormalize(text, normalizer_.get(), options.parse_special_tokens, pieces));
  if (pre_tokenizer_ != nullptr) RETURN_IF_ERROR(pre_tokenizer_->PreTokenize(pieces));
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  for (const auto& piece : pieces) {
    if (piece.added_id >= 0) {
      ids.push_back(piece.added_id);
    } else {
      RETURN_IF_ERROR(model_->Tokenize(piece.text, ids));
    }
  }
  if (options.add_special_tokens && post_processor_ != nullptr) post_processor_->Process(ids);
  return ids;
}

const std::string* Tokenizer::TokenString(int32_t id) const {
  if (const auto it = added_content_by_id_.find(id); it != added_content_by_id_.end()) {
    return &it->second;
  }
  return model_->IdToToken(id);
}

bool Tokenizer::IsSpecial(int32_t id) const {
  if (id < 0 || id >= vocab_size_) return false;
  if (is_special_[id]) return true;
  // A model token whose string equals a special token's content counts as special.
  const std::string* token = model_->IdToToken(id);
  if (token == nullptr) return false;
  const auto it = added_id_by_content_.find(*token);
  return it != added_id_by_content_.end() && is_special_[it->second];
}

absl::StatusOr<std::string> Tokenizer::Decode(std::span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    const std::string* token = TokenString(id);
    if (token == nullptr) continue;
    if (skip_special_tokens && IsSpecial(id)) continue;
    tokens.push_back(*token);
  }
  std::string text;
  if (decoder_ != nullptr) {
    RETURN_IF_ERROR(decoder_->DecodeChain(tokens));
    for (const std::string& token : tokens) text.append(token);
    return text;
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (i > 0) text.push_back(' ');
    text.append(tokens[i]);
  }
  return text;
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (const auto it = added_id_by_content_.find(tokenizer_internal::Sv(token));
      it != added_id_by_content_.end()) {
    return it->second;
  }
  return model_->TokenToId(token);
}

std::optional<std::string> Tokenizer::IdToToken(int32_t id) const {
  const std::string* token = TokenString(id);
  if (token == nullptr) return std::nullopt;
  return *token;
}

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

StreamingDecoder::~StreamingDecoder() = default;

std::string StreamingDecoder::Collect(bool finish, const std::string* token) {
  if (stage_ == nullptr) {
    stage_ = tokenizer_.decoder_ != nullptr ? tokenizer_.decoder_->MakeStage()
                                            : tokenizer_internal::MakeJoinWithSpaceStage();
  }
  std::vector<tokenizer_internal::Chunk> out;
  absl::Status status = finish ? stage_->Finish(out) : stage_->Push({*token, true}, out);
  if (!status.ok() && status_.ok()) status_ = std::move(status);
  std::string text;
  for (const auto& chunk : out) text.append(chunk.text);
  if (finish) stage_.reset();
  return text;
}

std::string StreamingDecoder::Push(int32_t id) {
  const std::string* token = tokenizer_.TokenString(id);
  if (token == nullptr) return std::string();
  if (skip_special_tokens_ && tokenizer_.IsSpecial(id)) return std::string();
  return Collect(/*finish=*/false, token);
}

std::string StreamingDecoder::Flush() { return Collect(/*finish=*/true, nullptr); }

}  // namespace moe
