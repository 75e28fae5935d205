// moe-bench-metrics: what recording metrics costs the engine thread. Runs the same workload
// through the Engine twice in one process — without observers, then with the server's
// observers (ExpertStatsAccumulator + ServingMetrics, full per-expert matrix) — and reports the
// time spent inside the observers as a fraction of the engine's step time, plus both
// throughputs. The goal is under 1% of step time.
//
//   moe-bench-metrics [--model_dir=DIR] [--sequences=16] [--prompt_len=64] [--max_tokens=64]
#include <chrono>
#include <cstdio>
#include <random>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/common/program_usage.h"
#include "engine/engine.h"
#include "engine/model/loaded_model.h"
#include "server/expert_stats.h"
#include "server/metrics/serving_metrics.h"

ABSL_FLAG(std::string, model_dir, "tests/fixtures/models/mixtral", "Model directory");
ABSL_FLAG(int32_t, sequences, 16, "Concurrent requests");
ABSL_FLAG(int32_t, prompt_len, 64, "Prompt tokens per request");
ABSL_FLAG(int32_t, max_tokens, 64, "Generated tokens per request");
ABSL_FLAG(int32_t, threads, 2, "CPU threads");

namespace moe::server {
namespace {

using Clock = std::chrono::steady_clock;

struct RunResult {
  double step_seconds = 0;      // engine thread: schedule + forward + sample
  double observer_seconds = 0;  // inside the metrics observers
  double tokens_per_second = 0;
  int64_t steps = 0;
};

RunResult Run(bool with_metrics) {
  const std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  auto loaded = LoadModel(model_dir);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", std::string(loaded.status().message()).c_str());
    std::exit(1);
  }
  const ModelConfig& config = (*loaded)->config;
  ExpertStatsAccumulator stats(config.num_moe_layers(), config.num_experts, config.top_k, 1000);
  ServingMetrics metrics({"bench", config, (*loaded)->weights.parameters, "bf16", "cpu"}, &stats,
                         ExpertMetrics::kFull);
  RunResult result;
  const int32_t sequences = absl::GetFlag(FLAGS_sequences);
  EngineOptions options;
  options.runner.model_dir = model_dir;
  options.runner.num_threads = absl::GetFlag(FLAGS_threads);
  options.runner.kv_cache_bytes = 512ll << 20;
  options.scheduler.max_num_seqs = sequences;
  options.max_waiting_requests = sequences + 1;
  options.base_seed = 1;
  if (with_metrics) {
    options.routing_observer = [&](const ForwardBatch& batch, const StepRouting& routing) {
      const auto start = Clock::now();
      stats.Record(batch, routing);
      metrics.OnRouting(batch, routing);
      result.observer_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    };
    options.step_observer = [&](const EngineStepInfo& info) {
      const auto start = Clock::now();
      metrics.OnStep(info);
      result.observer_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    };
  }
  auto engine = Engine::Create(options);
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", std::string(engine.status().message()).c_str());
    std::exit(1);
  }
  std::mt19937_64 rng(1);
  std::vector<ServingMetrics::RequestTimer> timers;
  timers.reserve(sequences);  // the sinks keep pointers into it
  const auto start = Clock::now();
  for (int32_t i = 0; i < sequences; ++i) {
    GenerateRequest request;
    for (int32_t t = 0; t < absl::GetFlag(FLAGS_prompt_len); ++t) {
      request.prompt_token_ids.push_back(static_cast<int32_t>(rng() % config.vocab_size));
    }
    request.sampling.max_tokens = absl::GetFlag(FLAGS_max_tokens);
    request.sampling.ignore_eos = true;
    timers.emplace_back(&metrics, absl::Now());
    ServingMetrics::RequestTimer* timer = &timers.back();
    // Request-side recording happens on the engine thread too (the server's sink).
    auto sink = [&, timer, with_metrics](RequestEvent event) {
      if (!with_metrics) return;
      const auto sink_start = Clock::now();
      timer->OnTokens(static_cast<int32_t>(event.tokens.size()), absl::Now());
      if (event.finished) timer->OnFinished(event, "OK", absl::Now());
      result.observer_seconds += std::chrono::duration<double>(Clock::now() - sink_start).count();
    };
    if (!(*engine)->Submit(std::move(request), sink).ok()) std::exit(1);
  }
  (*engine)->WaitUntilIdle();
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  const EngineStats engine_stats = (*engine)->Stats();
  result.step_seconds =
      engine_stats.schedule_seconds + engine_stats.forward_seconds + engine_stats.sample_seconds;
  result.tokens_per_second = engine_stats.generated_tokens / wall;
  result.steps = engine_stats.steps;
  if (with_metrics) metrics.Render();  // a scrape, as the server would do
  return result;
}

}  // namespace
}  // namespace moe::server

int main(int argc, char** argv) {
  moe::SetProgramUsage("bench/metrics/metrics_overhead_bench.cc",
                       "Cost of metrics recording on the engine thread.");
  absl::ParseCommandLine(argc, argv);
  const auto without = moe::server::Run(false);
  const auto with = moe::server::Run(true);
  std::printf("model %s, %d sequences x %d generated tokens\n",
              absl::GetFlag(FLAGS_model_dir).c_str(), absl::GetFlag(FLAGS_sequences),
              absl::GetFlag(FLAGS_max_tokens));
  std::printf("| run | steps | step time s | observer time s | observer %% of step | tokens/s |\n"
              "|---|---|---|---|---|---|\n");
  std::printf("| metrics off | %lld | %.3f | - | - | %.1f |\n",
              static_cast<long long>(without.steps), without.step_seconds,
              without.tokens_per_second);
  std::printf("| metrics on | %lld | %.3f | %.4f | %.3f%% | %.1f |\n",
              static_cast<long long>(with.steps), with.step_seconds, with.observer_seconds,
              100.0 * with.observer_seconds / with.step_seconds, with.tokens_per_second);
  return 0;
}
