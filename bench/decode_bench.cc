// moe-bench-decode: engine forward-pass throughput on a synthetic Mixtral-shaped model, next
// to the machine's memory read bandwidth measured in the same run.
//
//   moe-bench-decode [--model=DIR] [--threads=2] [--steps=32] [--sequences=1,4,16]
//                    [--prefill_tokens=512] [--bf16_activations] [--kernel_tokens=1,4,8]
//                    [--context=32] [--kv_cache_dtype=f32|bf16]
//
// Without --model it writes the bench-mixtral preset (hidden 1024, 8 layers, 16/4 heads,
// 8 experts top-2, expert FFN 2816, vocab 32000, bf16) to build/bench_models/ first.
// Decode roofline: per step the bytes of weights actually read (all non-expert weights, the
// LM head, and each distinct expert touched in each layer, counted from the engine's routing
// record) plus the KV cache read, divided by the measured bandwidth. --kernel_tokens also
// measures the matmul kernel alone at those token counts (the bandwidth a batched decode's
// experts can reach).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <set>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "engine/backend/cpu/kernels.h"
#include "engine/backend/cpu/thread_pool.h"
#include "engine/model/loaded_model.h"
#include "engine/model/synthetic_model.h"
#include "engine/ops/model_runner.h"
#include "engine/ops/offline_batch.h"

ABSL_FLAG(std::string, model, "", "Model directory (default: generate bench-mixtral)");
ABSL_FLAG(int32_t, threads, 2, "CPU threads for the engine and the bandwidth probe");
ABSL_FLAG(int32_t, steps, 32, "Decode steps measured per configuration");
ABSL_FLAG(int32_t, prefill_tokens, 512, "Prompt length for the prefill measurement");
ABSL_FLAG(int32_t, context, 32, "Decode: prompt tokens of each sequence before the measured steps");
ABSL_FLAG(std::string, sequences, "1,4,16", "Comma-separated decode batch sizes");
ABSL_FLAG(std::string, kernel_tokens, "1",
          "Comma-separated token counts for the matmul kernel's own bandwidth probe");
ABSL_FLAG(std::string, kv_cache_dtype, "f32", "What the KV cache stores: f32 or bf16");
ABSL_FLAG(bool, bf16_activations, false,
          "CPU backend: bf16 activations with AVX512-BF16 dot products (lower precision)");

namespace moe {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Best of several full reads of a 1 GiB buffer, split across the threads (bytes / second).
double MeasureReadBandwidth(int32_t threads) {
  const int64_t floats = (1ll << 30) / sizeof(float);
  std::vector<float> buffer(floats, 1.0f);
  cpu::ThreadPool pool(threads);
  double best = 0;
  for (int repeat = 0; repeat < 5; ++repeat) {
    // One slot per grain-aligned range (ranges start at multiples of the grain).
    std::vector<float> partial((floats >> 16) + 1, 0.0f);
    const auto start = Clock::now();
    pool.ParallelFor(floats, 1 << 16, [&](int64_t begin, int64_t end) {
      partial[begin >> 16] = cpu::DotF32(buffer.data() + begin, buffer.data() + begin, end - begin);
    });
    best = std::max(best, floats * sizeof(float) / Seconds(start));
    if (partial[0] < 0) std::cout << "";  // keep the reads
  }
  return best;
}

// Read bandwidth of the matmul kernel itself: `tokens` tokens through a [rows, 1024] bf16
// matrix of 256 MiB (bigger than any cache), rows split across the threads as the backend
// splits them; bf16 activations (vdpbf16ps) or fp32 ones.
double MeasureMatMulBandwidth(int32_t threads, int32_t tokens, bool bf16_activations) {
  const int64_t in = 1024, rows = (256ll << 20) / (in * 2);
  const std::vector<uint16_t> weights(rows * in, 0x3f80);  // 1.0
  const absl::StatusOr<cpu::PackedMatrix> packed =
      cpu::PackedMatrix::Pack(weights.data(), DType::kBF16, rows, in);
  if (!packed.ok()) return 0;
  std::vector<float> x(tokens * in, 1.0f), out(tokens * rows);
  std::vector<uint16_t> x_bf16(tokens * in);
  cpu::FloatToBf16Rows(x.data(), in, tokens, in, x_bf16.data(), in);
  cpu::ThreadPool pool(threads);
  double best = 0;
  for (int repeat = 0; repeat < 5; ++repeat) {
    const auto start = Clock::now();
    pool.ParallelFor(rows, 16, [&](int64_t begin, int64_t end) {
      if (bf16_activations) {
        cpu::MatMulRowsBf16(x_bf16.data(), in, tokens, *packed, begin, end, out.data(), rows);
      } else {
        cpu::MatMulRows(x.data(), in, tokens, *packed, begin, end, out.data(), rows);
      }
    });
    best = std::max(best, rows * in * 2 / Seconds(start));
  }
  return best;
}

struct WeightBytes {
  int64_t always_read = 0;  // non-expert weights of every layer + final norm + LM head
  int64_t per_expert = 0;   // one routed expert of one layer
};

WeightBytes CountWeightBytes(const LoadedModel& model) {
  WeightBytes bytes;
  const ModelWeights& weights = model.weights;
  bytes.always_read += weights.lm_head->num_bytes + weights.final_norm->num_bytes;
  for (const LayerWeights& layer : weights.layers) {
    for (const TensorView* view : {layer.input_norm, layer.post_attention_norm, layer.q, layer.k,
                                   layer.v, layer.o, layer.router}) {
      if (view != nullptr) bytes.always_read += view->num_bytes;
    }
    if (!layer.experts.empty()) {
      const MlpWeights& expert = layer.experts[0];
      bytes.per_expert = expert.gate->num_bytes + expert.up->num_bytes + expert.down->num_bytes;
    }
  }
  return bytes;
}

int Run() {
  const int32_t threads = absl::GetFlag(FLAGS_threads);
  std::string model_dir = absl::GetFlag(FLAGS_model);
  if (model_dir.empty()) {
    model_dir = "build/bench_models/bench-mixtral";
    if (!std::filesystem::exists(model_dir + "/model.safetensors")) {
      std::cout << "writing " << model_dir << " ...\n";
      auto spec = SyntheticPreset("bench-mixtral");
      if (absl::Status status = WriteSyntheticModel(*spec, model_dir); !status.ok()) {
        std::cerr << status.message() << "\n";
        return 1;
      }
    }
  }
  auto loaded = LoadModel(model_dir);
  if (!loaded.ok()) {
    std::cerr << loaded.status().message() << "\n";
    return 1;
  }
  const WeightBytes weight_bytes = CountWeightBytes(**loaded);
  const ModelConfig config = (*loaded)->config;

  ModelRunnerOptions options;
  options.model_dir = model_dir;
  options.backend = "cpu";
  options.num_threads = threads;
  options.cpu_bf16_activations = absl::GetFlag(FLAGS_bf16_activations);
  options.kv_cache_bytes = 1ll << 30;
  const auto kv_cache_dtype = ParseKvCacheDType(absl::GetFlag(FLAGS_kv_cache_dtype));
  if (!kv_cache_dtype.ok()) {
    std::cerr << kv_cache_dtype.status().message() << "\n";
    return 1;
  }
  options.kv_cache_dtype = *kv_cache_dtype;
  auto runner = ModelRunner::Create(options);
  if (!runner.ok()) {
    std::cerr << runner.status().message() << "\n";
    return 1;
  }
  std::cout << "backend: " << (*runner)->backend_description()
            << ", KV cache: " << KvCacheDTypeName(options.kv_cache_dtype) << "\n";
  std::cout << absl::StrFormat(
      "model: %s, %d layers, hidden %d, %d experts top-%d, %.0fM params"
      " (%.0fM active per token)\n",
      config.architecture_name, config.num_layers, config.hidden_size, config.num_experts,
      config.top_k, (*runner)->parameters().total / 1e6,
      (*runner)->parameters().active_per_token / 1e6);
  const double bandwidth = MeasureReadBandwidth(threads);
  std::cout << absl::StrFormat("memory read bandwidth (%d threads): %.1f GB/s\n", threads,
                               bandwidth / 1e9);
  for (absl::string_view piece : absl::StrSplit(absl::GetFlag(FLAGS_kernel_tokens), ',')) {
    int32_t tokens = 0;
    if (!absl::SimpleAtoi(piece, &tokens) || tokens <= 0) continue;
    const double kernel = MeasureMatMulBandwidth(threads, tokens, options.cpu_bf16_activations);
    std::cout << absl::StrFormat(
        "matmul kernel (%d token(s) x 256 MiB bf16 matrix): %.1f GB/s = %.2f of it\n", tokens,
        kernel / 1e9, kernel / bandwidth);
  }
  std::cout << "\n";
  std::cout << "| measurement | tokens/s | bytes read per step | roofline tokens/s | fraction of "
               "roofline |\n"
               "|---|---|---|---|---|\n";

  const int32_t prompt_length = absl::GetFlag(FLAGS_context);
  constexpr int32_t kWarmupSteps = 2;
  const int32_t steps = absl::GetFlag(FLAGS_steps);
  for (absl::string_view piece : absl::StrSplit(absl::GetFlag(FLAGS_sequences), ',')) {
    int32_t sequences = 0;
    if (!absl::SimpleAtoi(piece, &sequences) || sequences <= 0) continue;
    OfflineBatcher batcher((*runner)->block_size(), (*runner)->num_blocks());
    std::vector<int32_t> next(sequences);
    ForwardBatch prefill;
    for (int32_t s = 0; s < sequences; ++s) {
      batcher.AddSequence(prompt_length + steps + kWarmupSteps + 1).value();
      std::vector<int32_t> prompt(prompt_length);
      for (int32_t i = 0; i < prompt_length; ++i)
        prompt[i] = (s * 7919 + i * 104729) % config.vocab_size;
      batcher.Append(prefill, s, prompt, true).IgnoreError();
    }
    auto output = (*runner)->Forward(prefill);
    for (int32_t s = 0; s < sequences; ++s) {
      next[s] = ArgMax(
          std::span<const float>(output->logits).subspan(s * config.vocab_size, config.vocab_size));
    }
    double seconds = 0;
    double bytes_read = 0;
    for (int32_t step = -kWarmupSteps; step < steps; ++step) {
      ForwardBatch batch;
      for (int32_t s = 0; s < sequences; ++s)
        batcher.Append(batch, s, {&next[s], 1}, true).IgnoreError();
      const auto start = Clock::now();
      auto result = (*runner)->Forward(batch);
      const double step_seconds = Seconds(start);
      if (!result.ok()) {
        std::cerr << result.status().message() << "\n";
        return 1;
      }
      for (int32_t s = 0; s < sequences; ++s) {
        next[s] = ArgMax(std::span<const float>(result->logits)
                             .subspan(s * config.vocab_size, config.vocab_size));
      }
      if (step < 0) continue;  // warm-up
      seconds += step_seconds;
      // Weights actually read: distinct experts per layer from the routing record.
      double step_bytes = weight_bytes.always_read;
      for (const std::vector<int32_t>& ids : result->routing.expert_ids) {
        step_bytes +=
            std::set<int32_t>(ids.begin(), ids.end()).size() * double(weight_bytes.per_expert);
      }
      // KV read: every sequence's context, K and V, all layers.
      for (int32_t s = 0; s < sequences; ++s) {
        step_bytes += 2.0 * config.num_layers * batcher.length(s) * config.kv_dim() *
                      DTypeSize(options.kv_cache_dtype);
      }
      bytes_read += step_bytes;
    }
    const double tokens_per_second = steps * sequences / seconds;
    const double bytes_per_step = bytes_read / steps;
    const double roofline = bandwidth / bytes_per_step * sequences;
    std::cout << absl::StrFormat("| decode, %d sequence(s) | %.1f | %.0f MB | %.1f | %.2f |\n",
                                 sequences, tokens_per_second, bytes_per_step / 1e6, roofline,
                                 tokens_per_second / roofline);
  }

  // Prefill: one prompt of prefill_tokens tokens in one step.
  const int32_t prefill_tokens = absl::GetFlag(FLAGS_prefill_tokens);
  double best = 0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    OfflineBatcher batcher((*runner)->block_size(), (*runner)->num_blocks());
    batcher.AddSequence(prefill_tokens).value();
    std::vector<int32_t> prompt(prefill_tokens);
    for (int32_t i = 0; i < prefill_tokens; ++i) prompt[i] = (i * 104729) % config.vocab_size;
    ForwardBatch batch;
    batcher.Append(batch, 0, prompt, true).IgnoreError();
    const auto start = Clock::now();
    auto result = (*runner)->Forward(batch);
    const double seconds = Seconds(start);
    if (!result.ok()) return 1;
    best = std::max(best, prefill_tokens / seconds);
  }
  std::cout << absl::StrFormat("| prefill, %d-token prompt | %.1f | | | |\n", prefill_tokens, best);
  return 0;
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return moe::Run();
}
