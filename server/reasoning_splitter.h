// Splits a streamed completion into the model's reasoning and its answer, at the <think> ...
// </think> block that reasoning models (Qwen3, DeepSeek-R1, QwQ) write before answering.
// GenerateRequest.separate_reasoning: reasoning text goes to GenerateResponse.reasoning_text,
// the rest to text. Reasoning and answer with the two markers put back are the model's text,
// but for whitespace before the block, which is dropped. Only a block at the start of the
// output counts; a "<think>" later in an answer is answer text, and a second block is too.
#pragma once

#include <string>
#include <string_view>

namespace moe::server {

inline constexpr std::string_view kThinkStart = "<think>";
inline constexpr std::string_view kThinkEnd = "</think>";

// Whether generation begins inside a reasoning block: the prompt (its decoded tail) ends with
// <think> and whitespace, as Qwen3 thinking templates end the generation prompt.
bool PromptOpensReasoning(std::string_view prompt_tail);

class ReasoningSplitter {
 public:
  explicit ReasoningSplitter(bool starts_in_reasoning)
      : state_(starts_in_reasoning ? State::kReasoning : State::kBeforeAnswer) {}

  // Appends what `text` (the next piece of output) adds to the answer and to the reasoning.
  // Text that may be the beginning of a marker is held back until the next Push or Flush.
  void Push(std::string_view text, std::string* answer, std::string* reasoning);
  // The output ended: what was held back goes where it was headed.
  void Flush(std::string* answer, std::string* reasoning);

 private:
  enum class State {
    kBeforeAnswer,  // nothing but whitespace yet: a <think> may open the reasoning
    kReasoning,     // inside the block: until </think>
    kAnswer,        // everything else is answer
  };
  State state_;
  std::string held_;
};

}  // namespace moe::server
