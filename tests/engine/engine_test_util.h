// Helpers for the engine tests: real tiny checkpoints from tests/fixtures/models, a thread-safe
// event collector, and a toy detokenizer (text only; the tokens come from the real model).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "engine/backend/backend.h"
#include "engine/engine.h"
#include "engine/model/model_config.h"
#include "gtest/gtest.h"

namespace moe::testing {

inline std::string ModelDir(const std::string& name) {
  return std::string(MOE_SOURCE_DIR) + "/tests/fixtures/models/" + name;
}

// Engine options for `model` with a KV pool of exactly `num_blocks` blocks.
inline EngineOptions OptionsFor(const std::string& model, int32_t num_blocks,
                                int32_t block_size = 16) {
  EngineOptions options;
  options.runner.model_dir = ModelDir(model);
  options.runner.block_size = block_size;
  options.runner.num_threads = 1;
  absl::StatusOr<ModelConfig> config = LoadModelConfig(options.runner.model_dir);
  EXPECT_TRUE(config.ok()) << config.status();
  if (config.ok()) {
    KvCacheShape shape{.num_layers = config->num_layers,
                       .block_size = block_size,
                       .num_kv_heads = config->num_kv_heads,
                       .head_dim = config->head_dim};
    options.runner.kv_cache_bytes = shape.bytes_per_block() * num_blocks;
  }
  options.base_seed = 1234;
  options.check_invariants = true;
  return options;
}

// Token t reads as a short letter string: a toy "detokenizer" so that stop strings can be
// tested on real model output (the text is arbitrary but a deterministic function of ids).
inline std::string ToyText(int32_t token) {
  std::string text(1, static_cast<char>('a' + token % 26));
  if (token % 3 == 0) text += ' ';
  return text;
}
class ToyDetokenizer : public IncrementalDetokenizer {
 public:
  std::string Push(int32_t token_id) override { return ToyText(token_id); }
  std::string Flush() override { return ""; }
};
inline DetokenizerFactory ToyDetokenizerFactory() {
  return [](absl::Span<const int32_t>) { return std::make_unique<ToyDetokenizer>(); };
}

// Collects the events of many requests, keyed by a test-chosen key (events may arrive before
// Submit returns the engine's id).
class Collector {
 public:
  struct Result {
    std::vector<int32_t> tokens;
    std::vector<GeneratedToken> generated;
    std::string text;
    std::vector<TokenRouting> routing;
    std::vector<PromptTokenLogprob> prompt_logprobs;
    int num_events = 0;
    int num_final_events = 0;
    bool events_after_final = false;
    RequestEvent final_event;
  };

  EventSink Sink(int64_t key) {
    return [this, key](RequestEvent event) {
      absl::MutexLock lock(&mu_);
      Result& r = results_[key];
      if (r.num_final_events > 0) r.events_after_final = true;
      ++r.num_events;
      for (const GeneratedToken& t : event.tokens) {
        r.tokens.push_back(t.token_id);
        r.generated.push_back(t);
      }
      r.text += event.text;
      for (TokenRouting& routing : event.routing) r.routing.push_back(std::move(routing));
      r.prompt_logprobs.insert(r.prompt_logprobs.end(), event.prompt_logprobs.begin(),
                               event.prompt_logprobs.end());
      if (event.finished) {
        ++r.num_final_events;
        r.final_event = std::move(event);
      }
    };
  }

  Result Get(int64_t key) {
    absl::MutexLock lock(&mu_);
    return results_[key];
  }
  bool Finished(int64_t key) {
    absl::MutexLock lock(&mu_);
    auto it = results_.find(key);
    return it != results_.end() && it->second.num_final_events > 0;
  }

 private:
  absl::Mutex mu_;
  absl::flat_hash_map<int64_t, Result> results_;
};

}  // namespace moe::testing
