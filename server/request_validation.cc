#include "server/request_validation.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/sampling/sampling_params.h"
#include "google/protobuf/unknown_field_set.h"
#include "nlohmann/json.hpp"
#include "server/json_nesting.h"

namespace moe::server {
namespace {

namespace v1 = ::moe::serving::v1;

absl::Status Invalid(absl::string_view field, const auto& value, absl::string_view allowed) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", value, " is not allowed; ", allowed));
}

absl::Status CheckSampling(const v1::SamplingParams& in, int32_t vocab, SamplingParams& out) {
  if (in.has_temperature()) {
    const float t = in.temperature();
    if (!std::isfinite(t) || t < 0.0f) {
      return Invalid("sampling.temperature", t, "must be finite and >= 0 (0 = greedy)");
    }
    out.temperature = t;
  }
  if (in.has_top_k()) {
    if (in.top_k() < 0 || in.top_k() > vocab) {
      return Invalid("sampling.top_k", in.top_k(),
                     absl::StrCat("must be in [0, ", vocab, "] (0 = no limit)"));
    }
    out.top_k = in.top_k();
  }
  if (in.has_top_p()) {
    if (!(in.top_p() > 0.0f && in.top_p() <= 1.0f)) {
      return Invalid("sampling.top_p", in.top_p(), "must be in (0, 1]");
    }
    out.top_p = in.top_p();
  }
  if (in.has_min_p()) {
    if (!(in.min_p() >= 0.0f && in.min_p() <= 1.0f)) {
      return Invalid("sampling.min_p", in.min_p(), "must be in [0, 1]");
    }
    out.min_p = in.min_p();
  }
  if (in.has_repetition_penalty()) {
    const float p = in.repetition_penalty();
    if (!std::isfinite(p) || p <= 0.0f) {
      return Invalid("sampling.repetition_penalty", p, "must be finite and > 0 (1 = off)");
    }
    out.repetition_penalty = p;
  }
  if (in.has_presence_penalty()) {
    const float p = in.presence_penalty();
    if (!(p >= -2.0f && p <= 2.0f)) {
      return Invalid("sampling.presence_penalty", p, "must be in [-2, 2]");
    }
    out.presence_penalty = p;
  }
  if (in.has_frequency_penalty()) {
    const float p = in.frequency_penalty();
    if (!(p >= -2.0f && p <= 2.0f)) {
      return Invalid("sampling.frequency_penalty", p, "must be in [-2, 2]");
    }
    out.frequency_penalty = p;
  }
  if (in.has_seed()) out.seed = in.seed();
  if (in.logit_bias_size() > kMaxLogitBias) {
    return Invalid("sampling.logit_bias", absl::StrCat(in.logit_bias_size(), " entries"),
                   absl::StrCat("at most ", kMaxLogitBias));
  }
  for (const auto& [id, bias] : in.logit_bias()) {
    if (id < 0 || id >= vocab) {
      return Invalid("sampling.logit_bias", absl::StrCat("token ", id),
                     absl::StrCat("token ids must be in [0, ", vocab, ")"));
    }
    if (!(bias >= -kMaxLogitBiasValue && bias <= kMaxLogitBiasValue)) {
      return Invalid("sampling.logit_bias", absl::StrCat("bias ", bias, " of token ", id),
                     "biases must be in [-100, 100]");
    }
    out.logit_bias.emplace_back(id, bias);
  }
  return absl::OkStatus();
}

absl::Status CheckStop(const v1::StopParams& in, int32_t vocab, int32_t max_new_tokens,
                       bool has_tokenizer, SamplingParams& out) {
  // max_new_tokens = context_length - prompt tokens >= 1.
  if (in.has_max_tokens()) {
    if (in.max_tokens() < 1 || in.max_tokens() > max_new_tokens) {
      return Invalid("stop.max_tokens", in.max_tokens(),
                     absl::StrCat("must be in [1, ", max_new_tokens,
                                  "] (the context length minus the prompt tokens)"));
    }
    out.max_tokens = in.max_tokens();
  } else {
    out.max_tokens = std::min(kDefaultMaxTokens, max_new_tokens);
  }
  if (in.has_min_tokens()) {
    if (in.min_tokens() < 0 || in.min_tokens() > out.max_tokens) {
      return Invalid("stop.min_tokens", in.min_tokens(),
                     absl::StrCat("must be in [0, max_tokens = ", out.max_tokens, "]"));
    }
    out.min_tokens = in.min_tokens();
  }
  out.ignore_eos = in.ignore_eos();
  if (in.stop_token_ids_size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(
        absl::StrCat("stop.stop_token_ids: ", in.stop_token_ids_size(),
                     " stop token ids is not allowed; at most ", kMaxStopTokenIds));
  }
  for (int i = 0; i < in.stop_token_ids_size(); ++i) {
    const int32_t id = in.stop_token_ids(i);
    if (id < 0 || id >= vocab) {
      return Invalid(absl::StrCat("stop.stop_token_ids[", i, "]"), id,
                     absl::StrCat("token ids must be in [0, ", vocab, ")"));
    }
    out.stop_token_ids.push_back(id);
  }
  if (in.stop_strings_size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat("stop.stop_strings: ", in.stop_strings_size(),
                                                   " stop strings is not allowed; at most ",
                                                   kMaxStopStrings));
  }
  if (in.stop_strings_size() > 0 && !has_tokenizer) {
    return absl::FailedPreconditionError(
        "stop.stop_strings: stop strings need text, but the model directory has no "
        "tokenizer.json; use stop.stop_token_ids");
  }
  for (int i = 0; i < in.stop_strings_size(); ++i) {
    const std::string& stop = in.stop_strings(i);
    const std::string field = absl::StrCat("stop.stop_strings[", i, "]");
    if (stop.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": the empty string is not allowed; stop strings must be 1..",
                       kMaxStopStringBytes, " bytes"));
    }
    if (stop.size() > static_cast<size_t>(kMaxStopStringBytes)) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": ", stop.size(),
                                                     " bytes is not allowed; at most ",
                                                     kMaxStopStringBytes, " bytes"));
    }
    if (const int64_t bad = FindInvalidUtf8(stop); bad >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": invalid UTF-8 at byte ", bad, "; stop strings must be UTF-8"));
    }
    out.stop_strings.push_back(stop);
  }
  return absl::OkStatus();
}

// The name (with index) of the first string field along `path` whose bytes are not UTF-8, and
// the offset of the bad byte; empty when none.
std::string FindBadString(const std::string& bytes, const StringField& field, size_t depth,
                          int64_t* offset) {
  google::protobuf::UnknownFieldSet fields;
  if (!fields.ParseFromString(bytes)) return "";
  int index = 0;
  for (int i = 0; i < fields.field_count(); ++i) {
    const google::protobuf::UnknownField& f = fields.field(i);
    if (f.number() != field.path[depth] ||
        f.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) {
      continue;
    }
    if (depth + 1 < field.path.size()) {
      std::string found = FindBadString(f.length_delimited(), field, depth + 1, offset);
      if (!found.empty()) return found;
      continue;
    }
    if (const int64_t bad = FindInvalidUtf8(f.length_delimited()); bad >= 0) {
      *offset = bad;
      return field.repeated ? absl::StrCat(field.name, "[", index, "]") : field.name;
    }
    ++index;
  }
  return "";
}

// `fields` plus the string fields of the ChatPrompt at field number `chat` of the request.
std::vector<StringField> WithChatPromptFields(std::vector<StringField> fields, int chat) {
  const StringField in_chat[] = {{{1, 1}, "chat.messages.role", false},
                                 {{1, 2}, "chat.messages.content", false},
                                 {{3, 1}, "chat.template_variables (a name)", false},
                                 {{3, 2}, "chat.template_variables (a value)", false}};
  for (const StringField& field : in_chat) {
    StringField at_chat = field;
    at_chat.path.insert(at_chat.path.begin(), chat);
    fields.push_back(std::move(at_chat));
  }
  return fields;
}

}  // namespace

const std::vector<StringField> kGenerateRequestStringFields = WithChatPromptFields(
    {{{1}, "text", false}, {{4}, "request_id", false}, {{6, 5}, "stop.stop_strings", true}},
    /*chat=*/13);

const std::vector<StringField> kTokenizeRequestStringFields =
    WithChatPromptFields({{{1}, "text", false}}, /*chat=*/4);

absl::Status ExplainParseFailure(const std::string& bytes,
                                 absl::Span<const StringField> string_fields,
                                 const std::string& message_name) {
  for (const StringField& field : string_fields) {
    int64_t offset = -1;
    const std::string name = FindBadString(bytes, field, 0, &offset);
    if (!name.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": invalid UTF-8 at byte ", offset,
                                                     "; string fields must be valid UTF-8"));
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("the request is not a valid ", message_name, " message"));
}

absl::StatusOr<GenerateRequest> ParseGenerateRequest(const std::string& bytes,
                                                     const Tokenizer* tokenizer,
                                                     const RequestLimits& limits,
                                                     v1::GenerateRequest* parsed) {
  v1::GenerateRequest local;
  v1::GenerateRequest& request = parsed != nullptr ? *parsed : local;
  if (!request.ParseFromString(bytes)) {
    return ExplainParseFailure(bytes, kGenerateRequestStringFields,
                               v1::GenerateRequest::descriptor()->full_name());
  }
  return BuildEngineRequest(request, tokenizer, limits);
}

int64_t FindInvalidUtf8(const std::string& text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    size_t len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return static_cast<int64_t>(i);
    }
    if (i + len > n) return static_cast<int64_t>(i);
    for (size_t k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return static_cast<int64_t>(i);
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    const bool overlong =
        (len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return static_cast<int64_t>(i);
    }
    i += len;
  }
  return -1;
}

absl::Status ValidateRequestId(const std::string& request_id) {
  if (request_id.size() > static_cast<size_t>(kMaxRequestIdBytes)) {
    return absl::InvalidArgumentError(absl::StrCat("request_id: ", request_id.size(),
                                                   " bytes is not allowed; at most ",
                                                   kMaxRequestIdBytes, " bytes"));
  }
  for (size_t i = 0; i < request_id.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(request_id[i]);
    if (c < 0x21 || c > 0x7E) {
      return absl::InvalidArgumentError(
          absl::StrCat("request_id: byte ", i, " (0x", absl::Hex(c),
                       ") is not allowed; only printable ASCII without spaces (0x21..0x7E)"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckTokenizerIds(const std::vector<int32_t>& ids, int32_t vocab,
                               absl::string_view field) {
  if (ids.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": the prompt encodes to no tokens"));
  }
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": the tokenizer produced token id ",
                                                     id, ", outside the model's vocabulary [0, ",
                                                     vocab, "): tokenizer and model do not match"));
    }
  }
  return absl::OkStatus();
}

namespace {

bool IsIdentifier(const std::string& name) {
  if (name.empty() || std::isdigit(static_cast<unsigned char>(name[0]))) return false;
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_') return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<EncodedChat> EncodeChatPrompt(const v1::ChatPrompt& chat, const Tokenizer* tokenizer,
                                             const RequestLimits& limits) {
  if (tokenizer == nullptr) {
    return absl::FailedPreconditionError(
        "chat: chat prompts need a tokenizer and a chat template, but the model directory has no "
        "tokenizer.json; send token_ids instead");
  }
  if (const absl::Status& usable = tokenizer->chat_template_status(); !usable.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("chat: ", usable.message(), "; send text or token_ids instead"));
  }
  if (chat.messages_size() == 0 || chat.messages_size() > kMaxChatMessages) {
    return Invalid("chat.messages", absl::StrCat(chat.messages_size(), " messages"),
                   absl::StrCat("give 1..", kMaxChatMessages, " messages"));
  }
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  int64_t content_bytes = 0;
  for (int i = 0; i < chat.messages_size(); ++i) {
    const v1::ChatMessage& message = chat.messages(i);
    const std::string field = absl::StrCat("chat.messages[", i, "]");
    if (message.role().empty() || message.role().size() > kMaxChatRoleBytes) {
      return Invalid(absl::StrCat(field, ".role"), absl::StrCat("'", message.role(), "'"),
                     absl::StrCat("a role is 1..", kMaxChatRoleBytes,
                                  " bytes (system, user, assistant, tool)"));
    }
    content_bytes += static_cast<int64_t>(message.content().size());
    messages.push_back({{"role", message.role()}, {"content", message.content()}});
  }
  if (limits.max_prompt_text_bytes > 0 && content_bytes > limits.max_prompt_text_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chat.messages: ", content_bytes, " bytes of content is too long; at most ",
                     limits.max_prompt_text_bytes, " bytes (max_prompt_tokens x ",
                     kMaxPromptBytesPerToken, ")"));
  }
  if (chat.template_variables_size() > kMaxChatTemplateVariables) {
    return Invalid("chat.template_variables",
                   absl::StrCat(chat.template_variables_size(), " variables"),
                   absl::StrCat("at most ", kMaxChatTemplateVariables));
  }
  // Sorted by name: protobuf maps have no order, and the rendering must not depend on one.
  std::map<std::string, std::string> sorted(chat.template_variables().begin(),
                                            chat.template_variables().end());
  nlohmann::ordered_json variables = nlohmann::ordered_json::object();
  for (const auto& [name, value] : sorted) {
    const std::string field = absl::StrCat("chat.template_variables[", name, "]");
    if (!IsIdentifier(name) || name.size() > 64) {
      return Invalid("chat.template_variables", absl::StrCat("the name '", name, "'"),
                     "names are identifiers ([A-Za-z_][A-Za-z0-9_]*, at most 64 bytes)");
    }
    if (name == "messages" || name == "add_generation_prompt" || name == "bos_token" ||
        name == "eos_token") {
      return Invalid("chat.template_variables", absl::StrCat("the name '", name, "'"),
                     "messages, add_generation_prompt, bos_token and eos_token are set by the "
                     "server");
    }
    if (value.size() > kMaxChatTemplateVariableBytes || JsonNesting(value) > kMaxJsonNesting) {
      return Invalid(field, absl::StrCat(value.size(), " bytes"),
                     absl::StrCat("a value is at most ", kMaxChatTemplateVariableBytes,
                                  " bytes of JSON nested at most ", kMaxJsonNesting, " deep"));
    }
    nlohmann::ordered_json parsed =
        nlohmann::ordered_json::parse(value, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_discarded()) {
      return Invalid(field, absl::StrCat("'", value.substr(0, 64), "'"),
                     "values are JSON texts, e.g. false, \"text\", [{\"type\": \"function\"}]");
    }
    variables[name] = std::move(parsed);
  }
  Tokenizer::ChatOptions chat_options;
  chat_options.continue_final_message = chat.continue_final_message();
  chat_options.add_generation_prompt = chat.has_add_generation_prompt()
                                           ? chat.add_generation_prompt()
                                           : !chat_options.continue_final_message;
  EncodedChat out;
  absl::StatusOr<std::string> text =
      tokenizer->ApplyChatTemplate(messages, chat_options, variables);
  if (!text.ok()) {
    return absl::Status(text.status().code(), absl::StrCat("chat: ", text.status().message()));
  }
  out.text = *std::move(text);
  // As transformers' apply_chat_template(tokenize=True): the template wrote the special tokens.
  EncodeOptions options;
  options.add_special_tokens = false;
  options.parse_special_tokens = true;
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer->Encode(out.text, options);
  if (!ids.ok()) {
    return absl::Status(ids.status().code(), absl::StrCat("chat: ", ids.status().message()));
  }
  out.token_ids = *std::move(ids);
  RETURN_IF_ERROR(CheckTokenizerIds(out.token_ids, limits.vocab_size, "chat"));
  return out;
}

absl::StatusOr<GenerateRequest> BuildEngineRequest(const v1::GenerateRequest& request,
                                                   const Tokenizer* tokenizer,
                                                   const RequestLimits& limits) {
  const int32_t vocab = limits.vocab_size;
  RETURN_IF_ERROR(ValidateRequestId(request.request_id()));
  GenerateRequest out;
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      const std::string& text = request.text();
      if (text.empty()) {
        return absl::InvalidArgumentError(
            "text: the empty prompt is not allowed; give at least one character (or token_ids)");
      }
      if (limits.max_prompt_text_bytes > 0 &&
          static_cast<int64_t>(text.size()) > limits.max_prompt_text_bytes) {
        return absl::InvalidArgumentError(absl::StrCat(
            "text: ", text.size(), " bytes is too long; at most ", limits.max_prompt_text_bytes,
            " bytes (max_prompt_tokens x ", kMaxPromptBytesPerToken, ")"));
      }
      if (const int64_t bad = FindInvalidUtf8(text); bad >= 0) {
        return absl::InvalidArgumentError(absl::StrCat("text: invalid UTF-8 at byte ", bad,
                                                       "; the prompt text must be valid UTF-8"));
      }
      if (tokenizer == nullptr) {
        return absl::FailedPreconditionError(
            "text: text prompts need a tokenizer, but the model directory has no "
            "tokenizer.json; send token_ids instead");
      }
      EncodeOptions options;
      options.add_special_tokens =
          request.has_add_special_tokens() ? request.add_special_tokens() : true;
      absl::StatusOr<std::vector<int32_t>> ids = tokenizer->Encode(text, options);
      if (!ids.ok()) {
        return absl::Status(ids.status().code(), absl::StrCat("text: ", ids.status().message()));
      }
      RETURN_IF_ERROR(CheckTokenizerIds(*ids, vocab, "text"));
      out.prompt_token_ids = *std::move(ids);
      break;
    }
    case v1::GenerateRequest::kChat: {
      ASSIGN_OR_RETURN(EncodedChat chat, EncodeChatPrompt(request.chat(), tokenizer, limits));
      out.prompt_token_ids = std::move(chat.token_ids);
      break;
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      if (ids.empty()) {
        return absl::InvalidArgumentError(
            "token_ids.ids: the empty prompt is not allowed; give at least one token id");
      }
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || ids[i] >= vocab) {
          return Invalid(absl::StrCat("token_ids.ids[", i, "]"), ids[i],
                         absl::StrCat("token ids must be in [0, ", vocab, ")"));
        }
      }
      out.prompt_token_ids.assign(ids.begin(), ids.end());
      break;
    }
    case v1::GenerateRequest::PROMPT_NOT_SET:
      return absl::InvalidArgumentError(
          "prompt: no prompt given; set exactly one of `text`, `token_ids` or `chat`");
  }
  for (const auto& [set, field] : {std::pair(request.separate_reasoning(), "separate_reasoning"),
                                   std::pair(request.parse_tool_calls(), "parse_tool_calls")}) {
    if (set && tokenizer == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(field,
                       ": reading the output text needs a tokenizer, but the model "
                       "directory has no tokenizer.json"));
    }
  }
  const int32_t prompt_len = static_cast<int32_t>(out.prompt_token_ids.size());
  if (prompt_len > limits.max_prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt: ", prompt_len,
        " tokens is too long; at most max_prompt_tokens = ", limits.max_prompt_tokens, " tokens"));
  }
  RETURN_IF_ERROR(CheckSampling(request.sampling(), vocab, out.sampling));
  RETURN_IF_ERROR(CheckStop(request.stop(), vocab, limits.context_length - prompt_len,
                            tokenizer != nullptr, out.sampling));
  if (request.logprobs() < 0 || request.logprobs() > kMaxLogprobs) {
    return Invalid("logprobs", request.logprobs(),
                   absl::StrCat("must be in [0, ", kMaxLogprobs, "] (0 = none)"));
  }
  out.sampling.logprobs = request.logprobs();
  if (request.return_prompt_routing() && !request.return_routing()) {
    return absl::InvalidArgumentError(
        "return_prompt_routing: true is not allowed without return_routing = true");
  }
  out.return_routing = request.return_routing();
  if (request.priority() < -kMaxPriority || request.priority() > kMaxPriority) {
    return Invalid("priority", request.priority(),
                   absl::StrCat("must be in [", -kMaxPriority, ", ", kMaxPriority, "]"));
  }
  out.priority = request.priority();
  out.prompt_logprobs = request.prompt_logprobs();
  if (request.n() < 0 || request.n() > kMaxCompletions) {
    return Invalid("n", request.n(),
                   absl::StrCat("must be in [0, ", kMaxCompletions, "] (0 = 1 completion)"));
  }
  return out;
}

}  // namespace moe::server
