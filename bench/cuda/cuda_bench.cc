// moe-bench-cuda: the CUDA backend on a synthetic bf16 checkpoint of real MoE shapes.
//
// Measures, in one run on one GPU:
//   - device-to-device copy bandwidth (bytes read + written per second) and bf16 GEMM peak
//     (cuBLAS, 8192^3, fp32 accumulation): the two ceilings;
//   - greedy decode tokens/s (argmax on the GPU) at each batch size (default 1, 8, 64) after a
//     prefill of --context tokens per sequence, and the fraction of the memory roofline: bytes
//     per step = dense weights + distinct experts touched (counted from the step's routing) x
//     expert bytes + KV read, divided by the measured copy bandwidth;
//   - prefill tokens/s of one --prefill_tokens prompt and its fraction of the GEMM peak
//     (2 x active parameters x tokens + attention FLOPs);
//   - the decode rows again with CUDA graphs off, and the graphs' speed-up at each batch size
//     (--compare_without_graphs).
// The checkpoint is written once to --dir (Mixtral layout; OLMoE-like shapes by default, with
// --layers of them). Prints a table last.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/model/synthetic_model.h"
#include "engine/ops/model_runner.h"
#include "engine/ops/offline_batch.h"

ABSL_FLAG(std::string, shape, "olmoe",
          "olmoe (hidden 2048, 64 experts top-8, FFN 1024) or "
          "qwen3 (hidden 2048, 128 experts top-8, FFN 768)");
ABSL_FLAG(int32_t, layers, 4, "decoder layers of the synthetic model");
ABSL_FLAG(std::string, dir, "/tmp/moe-cuda-bench", "where the synthetic checkpoint is written");
ABSL_FLAG(std::string, batches, "1,8,64", "decode batch sizes");
ABSL_FLAG(int32_t, context, 512, "prompt tokens per sequence before decoding");
ABSL_FLAG(int32_t, steps, 32, "decode steps per batch size (the first 4 warm up, untimed)");
ABSL_FLAG(int32_t, prefill_tokens, 2048, "tokens of the timed prefill");
ABSL_FLAG(std::string, kv_cache_dtype, "f32", "what the KV cache stores: f32 or bf16");
ABSL_FLAG(bool, compare_without_graphs, true,
          "also time the decode steps with CUDA graphs off (MOE_CUDA_GRAPH_MAX_TOKENS=0)");

namespace moe {
namespace {

#define BENCH_CHECK(expr)                                         \
  do {                                                            \
    const auto bench_status_ = (expr);                            \
    if (!bench_status_.ok()) {                                    \
      std::fprintf(stderr, "%s failed: %s\n", #expr,              \
                   std::string(bench_status_.message()).c_str()); \
      std::exit(1);                                               \
    }                                                             \
  } while (0)
#define CUDA_CHECK(expr)                                                                \
  do {                                                                                  \
    const cudaError_t bench_error_ = (expr);                                            \
    if (bench_error_ != cudaSuccess) {                                                  \
      std::fprintf(stderr, "%s failed: %s\n", #expr, cudaGetErrorString(bench_error_)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Median milliseconds of `op` on the default stream over 9 runs, after one warm-up run.
template <class Op>
double MedianMs(Op op) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < 10; ++i) {
    CUDA_CHECK(cudaEventRecord(start));
    op();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i > 0) times.push_back(ms);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Bytes moved (read + written) per second by a large device-to-device copy; median of 9.
double CopyBandwidth() {
  const size_t bytes = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  CUDA_CHECK(cudaMalloc(&a, bytes));
  CUDA_CHECK(cudaMalloc(&b, bytes));
  CUDA_CHECK(cudaMemset(a, 1, bytes));
  const double ms =
      MedianMs([&] { CUDA_CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (ms * 1e-3);
}

// bf16 x bf16 -> f32 GEMM FLOP/s through cuBLAS (random-ish data, not zeros); median of 9.
double GemmPeak() {
  const int n = 8192;
  const size_t elements = size_t{n} * n;
  void *a = nullptr, *b = nullptr, *c = nullptr;
  CUDA_CHECK(cudaMalloc(&a, elements * 2));
  CUDA_CHECK(cudaMalloc(&b, elements * 2));
  CUDA_CHECK(cudaMalloc(&c, elements * 4));
  std::vector<uint16_t> host(elements);
  for (size_t i = 0; i < elements; ++i)
    host[i] = static_cast<uint16_t>(0x3c00 + (i * 2654435761u >> 24) % 256);
  CUDA_CHECK(cudaMemcpy(a, host.data(), elements * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(b, host.data(), elements * 2, cudaMemcpyHostToDevice));
  cublasHandle_t handle;
  cublasCreate(&handle);
  const float one = 1.0f, zero = 0.0f;
  const double ms = MedianMs([&] {
    cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, a, CUDA_R_16BF, n, b, CUDA_R_16BF,
                 n, &zero, c, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  });
  cublasDestroy(handle);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * n * n * double(n) / (ms * 1e-3);
}

struct Row {
  std::string what;
  double tokens_per_second;
  double fraction;
  std::string note;
};

// Decode steps not timed: each of the two step-metadata areas is seen once (run kernel by
// kernel), then captured into a CUDA graph on its second sight.
constexpr int32_t kWarmupSteps = 4;

// What a decode step reads, for the memory roofline.
struct StepBytes {
  double dense = 0;         // non-expert weights (embedding table excluded)
  double expert = 0;        // one routed expert
  double kv_per_token = 0;  // K and V of one cached token, all layers
};

// Decode tokens/s at each batch size after a prefill of `context` tokens per sequence, and the
// fraction of the memory roofline at `bandwidth`.
std::vector<Row> MeasureDecode(ModelRunner& runner, const std::vector<int32_t>& batches,
                               int32_t context, int32_t steps, double bandwidth,
                               const StepBytes& read, const std::string& label) {
  const ModelConfig& config = runner.config();
  std::vector<Row> rows;
  for (int32_t batch_size : batches) {
    OfflineBatcher batcher(runner.block_size(), runner.num_blocks());
    std::vector<std::vector<int32_t>> next(batch_size);
    for (int32_t s = 0; s < batch_size; ++s) {
      BENCH_CHECK(batcher.AddSequence(context + steps + 1).status());
    }
    // Prefill (untimed), a few sequences per step.
    for (int32_t s = 0; s < batch_size; s += 4) {
      ForwardBatch batch;
      for (int32_t t = s; t < std::min(batch_size, s + 4); ++t) {
        std::vector<int32_t> prompt(context);
        for (int32_t i = 0; i < context; ++i)
          prompt[i] = (i * 7919 + t * 104729) % config.vocab_size;
        BENCH_CHECK(batcher.Append(batch, t, prompt, true));
      }
      auto output = runner.Forward(batch);
      BENCH_CHECK(output.status());
      for (int32_t t = s; t < std::min(batch_size, s + 4); ++t) {
        next[t] = {ArgMax(std::span<const float>(output->logits)
                              .subspan((t - s) * config.vocab_size, config.vocab_size))};
      }
    }
    double seconds = 0, bytes = 0;
    for (int32_t step = 0; step < steps; ++step) {
      ForwardBatch batch;
      for (int32_t t = 0; t < batch_size; ++t) BENCH_CHECK(batcher.Append(batch, t, next[t], true));
      // Greedy, as the engine serves greedy requests: the argmax on the GPU, no logits copied.
      batch.argmax_only.assign(batch_size, true);
      const auto start = std::chrono::steady_clock::now();
      auto output = runner.Forward(batch);
      BENCH_CHECK(output.status());
      if (step >= kWarmupSteps) seconds += Seconds(start);
      for (int32_t t = 0; t < batch_size; ++t) next[t] = {output->argmax[t]};
      if (step < kWarmupSteps) continue;
      double step_bytes = read.dense;
      for (const std::vector<int32_t>& ids : output->routing.expert_ids) {
        step_bytes += read.expert * std::set<int32_t>(ids.begin(), ids.end()).size();
      }
      step_bytes += read.kv_per_token * batch_size * (context + step);
      bytes += step_bytes;
    }
    const double roofline_seconds = bytes / bandwidth;
    rows.push_back({"decode batch " + std::to_string(batch_size) + label,
                    batch_size * (steps - kWarmupSteps) / seconds, roofline_seconds / seconds,
                    "of memory roofline"});
  }
  return rows;
}

int Main() {
  SyntheticModelSpec spec;
  spec.hidden_size = 2048;
  spec.num_layers = absl::GetFlag(FLAGS_layers);
  spec.num_heads = 16;
  spec.num_kv_heads = 16;
  spec.num_experts = 64;
  spec.top_k = 8;
  spec.expert_intermediate_size = 1024;
  spec.vocab_size = 50304;
  if (absl::GetFlag(FLAGS_shape) == "qwen3") {
    spec.num_heads = 32;
    spec.num_kv_heads = 4;
    spec.num_experts = 128;
    spec.expert_intermediate_size = 768;
    spec.vocab_size = 151936;
  }
  const int32_t context = absl::GetFlag(FLAGS_context);
  const int32_t steps = absl::GetFlag(FLAGS_steps);
  if (steps <= kWarmupSteps) {
    std::fprintf(stderr, "--steps must exceed the %d warm-up steps\n", kWarmupSteps);
    return 2;
  }
  const int32_t prefill_tokens = absl::GetFlag(FLAGS_prefill_tokens);
  std::vector<int32_t> batches;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_batches), ',')) {
    int32_t value = 0;
    if (absl::SimpleAtoi(part, &value) && value > 0) batches.push_back(value);
  }
  const int32_t max_batch = *std::max_element(batches.begin(), batches.end());

  const std::string dir = absl::GetFlag(FLAGS_dir) + "/" + absl::GetFlag(FLAGS_shape) + "-" +
                          std::to_string(spec.num_layers);
  if (!std::filesystem::exists(dir + "/model.safetensors")) {
    const auto start = std::chrono::steady_clock::now();
    BENCH_CHECK(WriteSyntheticModel(spec, dir));
    std::printf("wrote %s in %.1f s\n", dir.c_str(), Seconds(start));
  }

  const double bandwidth = CopyBandwidth();
  const double peak = GemmPeak();
  std::printf("copy bandwidth %.0f GB/s (read + write), bf16 GEMM %.0f TFLOP/s\n", bandwidth / 1e9,
              peak / 1e12);

  ModelRunnerOptions options;
  options.model_dir = dir;
  options.backend = "cuda";
  const absl::StatusOr<DType> kv_cache_dtype =
      ParseKvCacheDType(absl::GetFlag(FLAGS_kv_cache_dtype));
  BENCH_CHECK(kv_cache_dtype.status());
  options.kv_cache_dtype = *kv_cache_dtype;
  const int64_t tokens_in_cache = int64_t{max_batch} * (context + steps + 16) + prefill_tokens + 64;
  const int64_t kv_bytes_per_token = int64_t{2} * spec.num_layers * spec.num_kv_heads *
                                     (spec.hidden_size / spec.num_heads) *
                                     DTypeSize(options.kv_cache_dtype);
  options.kv_cache_bytes = tokens_in_cache * kv_bytes_per_token * 5 / 4;
  auto created = ModelRunner::Create(options);
  BENCH_CHECK(created.status());
  std::unique_ptr<ModelRunner> runner = std::move(created).value();
  std::printf("%s\n", runner->backend_description().c_str());
  const ModelConfig& config = runner->config();
  const ParameterCounts& parameters = runner->parameters();
  const double expert_bytes = 2.0 * parameters.params_per_routed_expert;
  const double dense_bytes =
      2.0 * (parameters.non_expert -
             int64_t{config.vocab_size} * config.hidden_size);  // minus embedding table

  const StepBytes step_bytes{dense_bytes, expert_bytes, static_cast<double>(kv_bytes_per_token)};
  std::vector<Row> rows =
      MeasureDecode(*runner, batches, context, steps, bandwidth, step_bytes, "");
  {
    std::vector<int32_t> prompt(prefill_tokens);
    for (int32_t i = 0; i < prefill_tokens; ++i) prompt[i] = (i * 31337) % config.vocab_size;
    // Twice on fresh batchers (the same KV blocks); the second is timed.
    double seconds = 0;
    for (int repeat = 0; repeat < 2; ++repeat) {
      OfflineBatcher fresh(runner->block_size(), runner->num_blocks());
      BENCH_CHECK(fresh.AddSequence(prefill_tokens).status());
      ForwardBatch batch;
      BENCH_CHECK(fresh.Append(batch, 0, prompt, true));
      const auto start = std::chrono::steady_clock::now();
      BENCH_CHECK(runner->Forward(batch).status());
      seconds = Seconds(start);
    }
    const double head_dim = config.head_dim;
    const double attention_flops = 2.0 * config.num_layers * config.num_heads * head_dim *
                                   double(prefill_tokens) * prefill_tokens;  // QK^T + PV, causal
    const double flops = 2.0 * parameters.active_per_token * prefill_tokens + attention_flops;
    rows.push_back({"prefill " + std::to_string(prefill_tokens), prefill_tokens / seconds,
                    flops / seconds / peak, "of bf16 GEMM peak"});
  }

  std::printf("%s\n", runner->backend_execution_summary().c_str());

  // The same decode steps launched kernel by kernel, for the CUDA graphs' share.
  std::vector<std::string> speedups;
  if (absl::GetFlag(FLAGS_compare_without_graphs)) {
    runner.reset();  // one model on the GPU at a time
    setenv("MOE_CUDA_GRAPH_MAX_TOKENS", "0", 1);
    auto eager = ModelRunner::Create(options);
    BENCH_CHECK(eager.status());
    const std::vector<Row> eager_rows =
        MeasureDecode(**eager, batches, context, steps, bandwidth, step_bytes, ", no graphs");
    for (size_t i = 0; i < eager_rows.size(); ++i) {
      speedups.push_back(
          absl::StrFormat("CUDA graphs at batch %d: %.2fx the tokens/s of "
                          "kernel-by-kernel launches",
                          batches[i], rows[i].tokens_per_second / eager_rows[i].tokens_per_second));
    }
    rows.insert(rows.end(), eager_rows.begin(), eager_rows.end());
  }

  std::printf("\n%-28s %14s %10s\n", "case", "tokens/s", "fraction");
  for (const Row& row : rows) {
    std::printf("%-28s %14.1f %9.1f%% %s\n", row.what.c_str(), row.tokens_per_second,
                100 * row.fraction, row.note.c_str());
  }
  for (const std::string& line : speedups) std::printf("%s\n", line.c_str());
  return 0;
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return moe::Main();
}
