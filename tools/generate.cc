// moe-generate: offline greedy generation on one prompt, printing the tokens and tokens/s.
//
//   moe-generate --model=DIR --prompt="text" [--max_tokens=32] [--backend=cpu]
//   moe-generate --model=DIR --prompt_ids=1,2,3
// Text needs the model directory's tokenizer.json.
#include <chrono>
#include <iostream>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/common/program_usage.h"
#include "engine/ops/model_runner.h"
#include "engine/ops/offline_batch.h"
#include "engine/tokenizer/tokenizer.h"

ABSL_FLAG(std::string, model, "", "Model directory (config.json + *.safetensors)");
ABSL_FLAG(std::string, prompt, "", "Prompt text (tokenized with the model's tokenizer.json)");
ABSL_FLAG(std::string, prompt_ids, "", "Comma-separated prompt token ids (instead of --prompt)");
ABSL_FLAG(int32_t, max_tokens, 32, "Tokens to generate");
ABSL_FLAG(std::string, backend, "auto", "auto, cpu or cuda");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0 = all)");

int main(int argc, char** argv) {
  moe::SetProgramUsage("tools/generate.cc", "Greedy generation from prompt token ids.");
  absl::ParseCommandLine(argc, argv);
  std::vector<int32_t> prompt;
  for (absl::string_view piece :
       absl::StrSplit(absl::GetFlag(FLAGS_prompt_ids), ',', absl::SkipWhitespace())) {
    int32_t id;
    if (!absl::SimpleAtoi(piece, &id)) {
      std::cerr << "moe-generate: --prompt_ids: '" << piece << "' is not an integer\n";
      return 2;
    }
    prompt.push_back(id);
  }
  std::unique_ptr<moe::Tokenizer> tokenizer;
  const std::string text = absl::GetFlag(FLAGS_prompt);
  if (!text.empty() || prompt.empty()) {
    auto loaded = moe::Tokenizer::FromModelDir(absl::GetFlag(FLAGS_model));
    if (!loaded.ok()) {
      std::cerr << "moe-generate: --prompt needs a tokenizer: " << loaded.status().message()
                << "\n";
      return 2;
    }
    tokenizer = std::move(loaded).value();
  }
  if (!text.empty()) {
    auto ids = tokenizer->Encode(text);
    if (!ids.ok()) {
      std::cerr << "moe-generate: --prompt: " << ids.status().message() << "\n";
      return 2;
    }
    prompt = std::move(ids).value();
  }
  if (prompt.empty()) {
    std::cerr << "moe-generate: give --prompt text or --prompt_ids (at least one token)\n";
    return 2;
  }
  moe::ModelRunnerOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model);
  options.backend = absl::GetFlag(FLAGS_backend);
  options.num_threads = absl::GetFlag(FLAGS_threads);
  const int32_t max_tokens = absl::GetFlag(FLAGS_max_tokens);
  auto runner = moe::ModelRunner::Create(options);
  if (!runner.ok()) {
    std::cerr << "moe-generate: " << runner.status().message() << "\n";
    return 1;
  }
  moe::OfflineBatcher batcher((*runner)->block_size(), (*runner)->num_blocks());
  auto seq = batcher.AddSequence(static_cast<int32_t>(prompt.size()) + max_tokens);
  if (!seq.ok()) {
    std::cerr << "moe-generate: " << seq.status().message() << "\n";
    return 1;
  }
  using Clock = std::chrono::steady_clock;
  std::vector<int32_t> generated;
  std::vector<int32_t> next = prompt;
  double prefill_seconds = 0, decode_seconds = 0;
  for (int32_t step = 0; step < max_tokens; ++step) {
    moe::ForwardBatch batch;
    if (absl::Status status = batcher.Append(batch, *seq, next, true); !status.ok()) {
      std::cerr << "moe-generate: " << status.message() << "\n";
      return 1;
    }
    const auto start = Clock::now();
    auto output = (*runner)->Forward(batch);
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    (step == 0 ? prefill_seconds : decode_seconds) += seconds;
    if (!output.ok()) {
      std::cerr << "moe-generate: " << output.status().message() << "\n";
      return 1;
    }
    generated.push_back(moe::ArgMax(output->logits));
    next = {generated.back()};
  }
  std::cout << "backend: " << (*runner)->backend_description() << "\n";
  std::cout << "tokens: " << absl::StrJoin(generated, ",") << "\n";
  if (tokenizer != nullptr) {
    auto decoded = tokenizer->Decode(generated);
    if (decoded.ok()) std::cout << "text: " << *decoded << "\n";
  }
  std::cout << "prefill: " << prompt.size() << " tokens, " << prompt.size() / prefill_seconds
            << " tokens/s\n";
  if (max_tokens > 1) {
    std::cout << "decode: " << max_tokens - 1 << " tokens, " << (max_tokens - 1) / decode_seconds
              << " tokens/s\n";
  }
  return 0;
}
