// The whole forward pass on the CUDA backend against the CPU backend (logits and routing), and
// backend selection. Greedy decoding and packed batches against transformers run for every
// backend in tests/ops/reference_test.cc.
//
// Bounds: logits ||cuda - x|| / ||x|| <= 1e-4 for x = CPU backend and x = transformers (the
// CPU backend's own bound against transformers); routing: identical expert ids, probability
// mass within 1e-4; greedy tokens identical to transformers'.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "engine/backend/backend.h"
#include "engine/backend/cuda/cuda_device.h"
#include "engine/model/safetensors.h"
#include "engine/ops/model_runner.h"
#include "engine/ops/offline_batch.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/reference_data.h"

namespace moe {
namespace {

using testing_util::FixtureDir;
using testing_util::RelativeError;
using Reference = testing_util::ReferenceData;

constexpr int kPrompts = 3;
constexpr double kMaxRelativeError = 1e-4;

// ---- backend selection (runs with and without a GPU) ------------------------------------------

TEST(BackendSelection, CudaWithoutGpuIsAClearError) {
  if (cuda::VisibleDeviceCount() > 0) GTEST_SKIP() << "a GPU is visible";
  auto backend = CreateBackend("cuda", {.num_threads = 1});
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(backend.status().message()), testing::HasSubstr("no CUDA GPU"));
}

TEST(BackendSelection, AutoUsesTheGpuWhenOneIsVisible) {
  auto backend = CreateBackend("auto", {.num_threads = 1});
  ASSERT_TRUE(backend.ok()) << backend.status();
  if (cuda::VisibleDeviceCount() > 0) {
    EXPECT_EQ((*backend)->name(), "cuda");
    EXPECT_THAT((*backend)->device_description(), testing::StartsWith("auto: GPU found"));
  } else {
    EXPECT_EQ((*backend)->name(), "cpu");
  }
}

TEST(BackendSelection, CudaBackendDescribesItsDevice) {
  if (cuda::VisibleDeviceCount() == 0) GTEST_SKIP() << "no CUDA GPU visible";
  auto backend = CreateBackend("cuda", {.num_threads = 1});
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->name(), "cuda");
  EXPECT_THAT((*backend)->device_description(), testing::HasSubstr("sm_"));
}

// ---- forward pass ------------------------------------------------------------------------------

class CudaForwardTest : public testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (cuda::VisibleDeviceCount() == 0) GTEST_SKIP() << "no CUDA GPU visible";
    for (const char* backend : {"cpu", "cuda"}) {
      ModelRunnerOptions options;
      options.model_dir = FixtureDir(GetParam());
      options.backend = backend;
      options.kv_cache_bytes = 16 << 20;
      options.num_threads = 2;
      auto runner = ModelRunner::Create(options);
      ASSERT_TRUE(runner.ok()) << backend << ": " << runner.status();
      (std::string(backend) == "cpu" ? cpu_ : cuda_) = std::move(runner).value();
    }
  }

  std::unique_ptr<ModelRunner> cpu_, cuda_;
};

// Every prompt position's logits and routing, each prompt alone in a batch.
TEST_P(CudaForwardTest, PromptMatchesCpuAndTransformers) {
  Reference reference(GetParam());
  const ModelConfig& config = cuda_->config();
  for (int p = 0; p < kPrompts; ++p) {
    const std::vector<int32_t> prompt = reference.Ints("prompt." + std::to_string(p));
    const std::vector<float> expected = reference.Floats("logits." + std::to_string(p));
    std::vector<ForwardOutput> outputs;
    for (ModelRunner* runner : {cpu_.get(), cuda_.get()}) {
      OfflineBatcher batcher(runner->block_size(), runner->num_blocks());
      const int32_t seq = batcher.AddSequence(prompt.size()).value();
      ForwardBatch batch;
      ASSERT_TRUE(batcher.Append(batch, seq, prompt, false).ok());
      for (int32_t row = 0; row < batch.num_tokens(); ++row) batch.logits_rows.push_back(row);
      auto output = runner->Forward(batch);
      ASSERT_TRUE(output.ok()) << runner->backend_description() << ": " << output.status();
      outputs.push_back(std::move(output).value());
    }
    const ForwardOutput& cpu = outputs[0];
    const ForwardOutput& gpu = outputs[1];
    EXPECT_LE(RelativeError(gpu.logits, expected), kMaxRelativeError) << "prompt " << p;
    EXPECT_LE(RelativeError(gpu.logits, cpu.logits), kMaxRelativeError) << "prompt " << p;
    ASSERT_EQ(gpu.routing.expert_ids.size(), static_cast<size_t>(config.num_moe_layers()));
    int moe_index = 0;
    for (int layer = 0; layer < config.num_layers; ++layer) {
      if (!config.layer_is_moe[layer]) continue;
      EXPECT_EQ(gpu.routing.expert_ids[moe_index], cpu.routing.expert_ids[moe_index])
          << "prompt " << p << " layer " << layer;
      if (p == 0) {
        EXPECT_THAT(
            gpu.routing.expert_ids[moe_index],
            testing::ElementsAreArray(reference.Ints("routing.0.layer" + std::to_string(layer))))
            << "layer " << layer;
      }
      const std::vector<double>& mass = gpu.routing.probability_mass[moe_index];
      const std::vector<double>& cpu_mass = cpu.routing.probability_mass[moe_index];
      double total = 0;
      for (size_t e = 0; e < mass.size(); ++e) {
        EXPECT_NEAR(mass[e], cpu_mass[e], 1e-4 * prompt.size()) << "expert " << e;
        total += mass[e];
      }
      EXPECT_NEAR(total, static_cast<double>(prompt.size()), 1e-4 * prompt.size());
      EXPECT_NEAR(gpu.routing.router_z_sum[moe_index], cpu.routing.router_z_sum[moe_index],
                  1e-4 * std::abs(cpu.routing.router_z_sum[moe_index]) + 1e-6);
      EXPECT_LE(RelativeError(gpu.routing.expert_weights[moe_index],
                              cpu.routing.expert_weights[moe_index]),
                kMaxRelativeError);
      ++moe_index;
    }
  }
}

// Greedy decode of the three prompts together, `steps` steps after their prefill: every step's
// output.
std::vector<ForwardOutput> DecodeTogether(ModelRunner& runner, Reference& reference, int steps) {
  const int32_t vocab = runner.config().vocab_size;
  OfflineBatcher batcher(runner.block_size(), runner.num_blocks());
  ForwardBatch prefill;
  for (int p = 0; p < kPrompts; ++p) {
    const std::vector<int32_t> prompt = reference.Ints("prompt." + std::to_string(p));
    // The prompt, then one token per step (the last one appended after the last step).
    const int32_t seq =
        batcher.AddSequence(static_cast<int32_t>(prompt.size()) + steps + 1).value();
    EXPECT_TRUE(batcher.Append(prefill, seq, prompt, true).ok());
  }
  std::vector<ForwardOutput> outputs;
  ForwardBatch batch = std::move(prefill);
  for (int step = 0; step <= steps; ++step) {
    auto output = runner.Forward(batch);
    EXPECT_TRUE(output.ok()) << "step " << step << ": " << output.status();
    if (!output.ok()) break;
    batch = ForwardBatch();
    for (int32_t seq = 0; seq < kPrompts; ++seq) {
      const int32_t next =
          ArgMax(std::span<const float>(output->logits).subspan(seq * vocab, vocab));
      EXPECT_TRUE(batcher.Append(batch, seq, std::vector<int32_t>{next}, true).ok());
    }
    outputs.push_back(std::move(output).value());
  }
  return outputs;
}

// Decode steps replayed from CUDA graphs give the logits and routing of the same steps launched
// kernel by kernel, bit for bit (the same kernels with the same arguments), and graphs are used.
TEST_P(CudaForwardTest, GraphReplayMatchesEagerDecodeBitForBit) {
  constexpr int kSteps = 12;
  Reference reference(GetParam());
  ModelRunnerOptions options;
  options.model_dir = FixtureDir(GetParam());
  options.backend = "cuda";
  options.kv_cache_bytes = 16 << 20;
  setenv("MOE_CUDA_GRAPH_MAX_TOKENS", "0", 1);
  auto eager = ModelRunner::Create(options);
  unsetenv("MOE_CUDA_GRAPH_MAX_TOKENS");
  ASSERT_TRUE(eager.ok()) << eager.status();
  EXPECT_THAT((*eager)->backend_description(), testing::Not(testing::HasSubstr("CUDA graphs")));
  EXPECT_THAT(cuda_->backend_description(), testing::HasSubstr("CUDA graphs"));

  const std::vector<ForwardOutput> expected = DecodeTogether(**eager, reference, kSteps);
  const std::vector<ForwardOutput> graphed = DecodeTogether(*cuda_, reference, kSteps);
  ASSERT_EQ(graphed.size(), expected.size());
  for (size_t step = 0; step < expected.size(); ++step) {
    EXPECT_EQ(graphed[step].logits, expected[step].logits) << "step " << step;
    EXPECT_EQ(graphed[step].routing.expert_ids, expected[step].routing.expert_ids)
        << "step " << step;
    // Router probabilities are summed with double atomics in no fixed order: equal up to that.
    for (size_t layer = 0; layer < expected[step].routing.probability_mass.size(); ++layer) {
      const std::vector<double>& want = expected[step].routing.probability_mass[layer];
      const std::vector<double>& got = graphed[step].routing.probability_mass[layer];
      ASSERT_EQ(got.size(), want.size());
      for (size_t e = 0; e < want.size(); ++e) {
        EXPECT_NEAR(got[e], want[e], 1e-12) << "step " << step << " layer " << layer;
      }
    }
  }
  // Two metadata areas alternate between steps, so each is seen once (eagerly), then captured;
  // every later decode step is a replay.
  const std::string summary = cuda_->backend_execution_summary();
  int captured = -1, replayed = -1, eager_steps = -1, failures = -1;
  ASSERT_EQ(std::sscanf(summary.c_str(),
                        "cuda graphs: %d captured, %d steps replayed, %d graphable steps run "
                        "eagerly, %d capture failures",
                        &captured, &replayed, &eager_steps, &failures),
            4)
      << summary;
  EXPECT_EQ(failures, 0) << summary;
  EXPECT_GE(replayed, kSteps - 4) << summary;
  EXPECT_EQ(replayed + eager_steps, kSteps) << summary;
}

INSTANTIATE_TEST_SUITE_P(AllArchitectures, CudaForwardTest,
                         testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"));

}  // namespace
}  // namespace moe
