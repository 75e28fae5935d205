// Chat templates: the Jinja2 templates of tokenizer_config.json ("chat_template") that turn a
// conversation into the model's prompt text, rendered the way transformers'
// `apply_chat_template` renders them (jinja2's ImmutableSandboxedEnvironment with trim_blocks
// and lstrip_blocks, the loopcontrols extension, transformers' `tojson` and
// `raise_exception`). Implements the subset of Jinja2 that Hugging Face chat templates use;
// verified against transformers' jinja2 environment on published templates (Mistral's [INST]
// template, Qwen's ChatML, Qwen3's thinking/tools template, a tulu-style one) and on probes of
// single constructs (tests/tokenizer/chat_template_test.cc, tests/fixtures/chat_templates/).
//
// Templates come from the model directory and the variables from clients, so parsing and
// rendering never crash: every failure is an InvalidArgument naming the template line and
// column and what was wrong, and rendering is bounded (output size, loop iterations, call
// depth) so a template cannot hang the server.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moe {

namespace chat_template_internal {
struct Program;
}  // namespace chat_template_internal

struct ChatTemplateLimits {
  // Rendered text larger than this fails (bytes).
  size_t max_output_bytes = 16 << 20;
  // Statements, loop iterations and expression evaluations together.
  size_t max_steps = 10'000'000;
  // Nested macro calls and nested expression depth.
  int max_depth = 256;
};

class ChatTemplate {
 public:
  // Parses a template. InvalidArgument on a syntax error or an unsupported construct:
  // "chat template line L, column C: <what>".
  static absl::StatusOr<ChatTemplate> Parse(std::string_view source);

  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ~ChatTemplate();

  // Renders with `context`'s top-level keys as variables, as jinja2's
  // `template.render(**context)`; chat templates expect `messages` (an array of objects with
  // "role" and "content"), `add_generation_prompt`, `bos_token`, `eos_token` and optional
  // extras (`tools`, `enable_thinking`, ...). JSON maps to Python values: objects to dicts
  // (insertion order kept), arrays to lists, integers to int, other numbers to float, null to
  // None. `raise_exception(message)` in the template gives InvalidArgument with `message`;
  // other render errors name the line and column.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context,
                                     const ChatTemplateLimits& limits = {}) const;

 private:
  explicit ChatTemplate(std::unique_ptr<chat_template_internal::Program> program);
  std::unique_ptr<chat_template_internal::Program> program_;
};

}  // namespace moe
