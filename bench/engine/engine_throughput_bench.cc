// Offline engine throughput: N concurrent requests (random prompts, greedy, ignore_eos, fixed
// output length) through Engine, for N in --concurrency; reports generated tokens/s, prompt
// tokens computed (vs taken from the prefix cache), the mean time to first token, and how the
// engine thread's time splits between scheduling, the forward pass and sampling.
// --same_prompt: the N requests share one prompt (the n completions of a Generate call);
// --prefix_caching=0 turns the cache off, for comparison.
//
// Usage: engine_throughput_bench [--model_dir=tests/fixtures/models/mixtral]
//          [--concurrency=1,4,16,64] [--prompt_len=64] [--max_tokens=64] [--threads=0]
//          [--kv_mb=256] [--same_prompt=1] [--prefix_caching=1]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "engine/engine.h"

namespace {

std::string Flag(int argc, char** argv, const std::string& name, const std::string& fallback) {
  const std::string prefix = "--" + name + "=";
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind(prefix, 0) == 0) return arg.substr(prefix.size());
  }
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string model_dir = Flag(argc, argv, "model_dir", "tests/fixtures/models/mixtral");
  const int prompt_len = std::atoi(Flag(argc, argv, "prompt_len", "64").c_str());
  const int max_tokens = std::atoi(Flag(argc, argv, "max_tokens", "64").c_str());
  const int threads = std::atoi(Flag(argc, argv, "threads", "0").c_str());
  const int64_t kv_mb = std::atoll(Flag(argc, argv, "kv_mb", "256").c_str());
  const bool same_prompt = Flag(argc, argv, "same_prompt", "0") == "1";
  const bool prefix_caching = Flag(argc, argv, "prefix_caching", "1") == "1";
  std::vector<int> concurrency;
  for (absl::string_view part : absl::StrSplit(Flag(argc, argv, "concurrency", "1,4,16,64"), ',')) {
    int n = 0;
    if (absl::SimpleAtoi(part, &n) && n > 0) concurrency.push_back(n);
  }

  std::printf("engine throughput: %s, prompt %d%s, output %d tokens, greedy, prefix cache %s\n",
              model_dir.c_str(), prompt_len, same_prompt ? " (the same for all)" : "", max_tokens,
              prefix_caching ? "on" : "off");
  std::printf("%6s %10s %12s %10s %10s %8s %12s %12s %12s %10s\n", "seqs", "wall_s", "gen_tok/s",
              "prompt_cmp", "ttft_ms", "steps", "step_ms", "sched_us", "sample_us", "sched_%");
  for (int n : concurrency) {
    moe::EngineOptions options;
    options.runner.model_dir = model_dir;
    options.runner.num_threads = threads;
    options.runner.kv_cache_bytes = kv_mb << 20;
    options.scheduler.max_num_seqs = n;
    options.scheduler.max_num_batched_tokens = std::max(512, n);
    options.max_waiting_requests = n + 1;
    options.base_seed = 1;
    options.scheduler.enable_prefix_caching = prefix_caching;
    absl::StatusOr<std::unique_ptr<moe::Engine>> engine = moe::Engine::Create(options);
    if (!engine.ok()) {
      std::fprintf(stderr, "%s\n", std::string(engine.status().message()).c_str());
      return 1;
    }
    const int32_t vocab = (*engine)->model_config().vocab_size;
    std::mt19937_64 rng(n);
    std::vector<int32_t> shared_prompt;
    for (int t = 0; t < prompt_len; ++t) {
      shared_prompt.push_back(3 + static_cast<int32_t>(rng() % (vocab - 3)));
    }
    // Time to each request's first token, written by the engine thread, read after idle.
    std::vector<double> ttft(n, 0.0);
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) {
      moe::GenerateRequest request;
      request.prompt_token_ids = shared_prompt;
      if (!same_prompt && i > 0) {
        for (int32_t& token : request.prompt_token_ids) {
          token = 3 + static_cast<int32_t>(rng() % (vocab - 3));
        }
      }
      request.sampling.temperature = 0.0f;
      request.sampling.max_tokens = max_tokens;
      request.sampling.ignore_eos = true;
      absl::StatusOr<int64_t> id =
          (*engine)->Submit(std::move(request), [&ttft, i, start](const moe::RequestEvent& event) {
            if (ttft[i] == 0.0 && !event.tokens.empty()) {
              ttft[i] =
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            }
          });
      if (!id.ok()) {
        std::fprintf(stderr, "%s\n", std::string(id.status().message()).c_str());
        return 1;
      }
    }
    (*engine)->WaitUntilIdle();
    const double wall =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const moe::EngineStats stats = (*engine)->Stats();
    const double steps = static_cast<double>(std::max<int64_t>(1, stats.steps));
    const double step_total = stats.schedule_seconds + stats.forward_seconds + stats.sample_seconds;
    double ttft_sum = 0;
    for (double t : ttft) ttft_sum += t;
    std::printf("%6d %10.3f %12.1f %10lld %10.1f %8lld %12.3f %12.1f %12.1f %10.2f\n", n, wall,
                stats.generated_tokens / wall, static_cast<long long>(stats.prompt_tokens_computed),
                1e3 * ttft_sum / n, static_cast<long long>(stats.steps), 1e3 * step_total / steps,
                1e6 * stats.schedule_seconds / steps, 1e6 * stats.sample_seconds / steps,
                step_total > 0 ? 100.0 * stats.schedule_seconds / step_total : 0.0);
  }
  return 0;
}
