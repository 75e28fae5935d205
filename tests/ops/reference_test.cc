// The forward pass against Hugging Face transformers: tiny random checkpoints of every
// architecture (tests/fixtures/models, made by tests/reference/make_model_fixtures.py), on
// every backend of the build (CUDA runs skip where no GPU is visible).
#include <cmath>
#include <functional>
#include <string>
#include <vector>

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
constexpr int kGreedyTokens = 16;
constexpr double kMaxRelativeError = 1e-4;

// Parameter: (fixture model, backend).
class ReferenceTest : public testing::TestWithParam<std::tuple<std::string, std::string>> {
 protected:
  const std::string& model() const { return std::get<0>(GetParam()); }

  void SetUp() override {
    ModelRunnerOptions options;
    options.model_dir = FixtureDir(model());
    options.backend = std::get<1>(GetParam());
    options.kv_cache_bytes = 16 << 20;
    options.num_threads = 2;
    auto runner = ModelRunner::Create(options);
    if (options.backend != "cpu" &&
        (absl::IsFailedPrecondition(runner.status()) || absl::IsUnimplemented(runner.status()))) {
      GTEST_SKIP() << runner.status();  // no GPU here, or a build without CUDA
    }
    ASSERT_TRUE(runner.ok()) << runner.status();
    runner_ = std::move(runner).value();
    vocab_ = runner_->config().vocab_size;
  }

  std::span<const float> Row(const std::vector<float>& logits, int row) const {
    return std::span<const float>(logits).subspan(row * vocab_, vocab_);
  }

  void DecodePackedGreedily(
      const std::function<void(int step, ForwardBatch& batch)>& mark,
      const std::function<int32_t(int step, const ForwardOutput& output, int p)>& next_token);

  std::unique_ptr<ModelRunner> runner_;
  int vocab_ = 0;
};

// Every prompt position's logits, each prompt alone in a batch.
TEST_P(ReferenceTest, PromptLogitsMatchTransformers) {
  Reference reference(model());
  for (int p = 0; p < kPrompts; ++p) {
    const std::vector<int32_t> prompt = reference.Ints("prompt." + std::to_string(p));
    const std::vector<float> expected = reference.Floats("logits." + std::to_string(p));
    OfflineBatcher batcher(runner_->block_size(), runner_->num_blocks());
    const int32_t seq = batcher.AddSequence(prompt.size()).value();
    ForwardBatch batch;
    ASSERT_TRUE(batcher.Append(batch, seq, prompt, false).ok());
    for (int32_t row = 0; row < batch.num_tokens(); ++row) batch.logits_rows.push_back(row);
    auto output = runner_->Forward(batch);
    ASSERT_TRUE(output.ok()) << output.status();
    ASSERT_EQ(output->logits.size(), expected.size());
    EXPECT_LE(RelativeError(output->logits, expected), kMaxRelativeError) << "prompt " << p;
  }
}

// The router's choices equal transformers' for every token and MoE layer.
TEST_P(ReferenceTest, RoutingMatchesTransformers) {
  Reference reference(model());
  const ModelConfig& config = runner_->config();
  const std::vector<int32_t> prompt = reference.Ints("prompt.0");
  OfflineBatcher batcher(runner_->block_size(), runner_->num_blocks());
  ForwardBatch batch;
  ASSERT_TRUE(batcher.Append(batch, batcher.AddSequence(prompt.size()).value(), prompt, true).ok());
  auto output = runner_->Forward(batch);
  ASSERT_TRUE(output.ok()) << output.status();
  int moe_index = 0;
  for (int layer = 0; layer < config.num_layers; ++layer) {
    if (!config.layer_is_moe[layer]) continue;
    const std::vector<int32_t> expected = reference.Ints("routing.0.layer" + std::to_string(layer));
    EXPECT_THAT(output->routing.expert_ids[moe_index], testing::ElementsAreArray(expected))
        << "layer " << layer;
    ++moe_index;
  }
  EXPECT_EQ(moe_index, config.num_moe_layers());
}

// 16 greedy tokens: prefill, then one decode step per token through the KV cache.
TEST_P(ReferenceTest, GreedyDecodeMatchesTransformers) {
  Reference reference(model());
  for (int p = 0; p < kPrompts; ++p) {
    const std::vector<int32_t> prompt = reference.Ints("prompt." + std::to_string(p));
    const std::vector<int32_t> expected = reference.Ints("greedy." + std::to_string(p));
    const std::vector<float> expected_logits =
        reference.Floats("greedy_logits." + std::to_string(p));
    OfflineBatcher batcher(runner_->block_size(), runner_->num_blocks());
    const int32_t seq = batcher.AddSequence(prompt.size() + kGreedyTokens).value();
    std::vector<int32_t> generated;
    std::vector<int32_t> next = prompt;
    for (int step = 0; step < kGreedyTokens; ++step) {
      ForwardBatch batch;
      ASSERT_TRUE(batcher.Append(batch, seq, next, true).ok());
      auto output = runner_->Forward(batch);
      ASSERT_TRUE(output.ok()) << output.status();
      EXPECT_LE(RelativeError(output->logits, Row(expected_logits, step)), kMaxRelativeError)
          << "prompt " << p << " step " << step;
      generated.push_back(ArgMax(output->logits));
      next = {generated.back()};
    }
    EXPECT_THAT(generated, testing::ElementsAreArray(expected)) << "prompt " << p;
  }
}

// Greedy decoding of all prompts packed in one batch per step, kGreedyTokens steps:
// `mark(step, batch)` may mark argmax-only rows; `next(step, output, p)` checks the step's
// output and returns prompt p's next token. Expects transformers' greedy tokens at the end.
void ReferenceTest::DecodePackedGreedily(
    const std::function<void(int step, ForwardBatch& batch)>& mark,
    const std::function<int32_t(int step, const ForwardOutput& output, int p)>& next_token) {
  Reference reference(model());
  OfflineBatcher batcher(runner_->block_size(), runner_->num_blocks());
  std::vector<std::vector<int32_t>> next(kPrompts);
  std::vector<std::vector<int32_t>> generated(kPrompts);
  for (int p = 0; p < kPrompts; ++p) {
    next[p] = reference.Ints("prompt." + std::to_string(p));
    ASSERT_EQ(batcher.AddSequence(next[p].size() + kGreedyTokens).value(), p);
  }
  for (int step = 0; step < kGreedyTokens; ++step) {
    ForwardBatch batch;
    for (int p = 0; p < kPrompts; ++p) ASSERT_TRUE(batcher.Append(batch, p, next[p], true).ok());
    mark(step, batch);
    auto output = runner_->Forward(batch);
    ASSERT_TRUE(output.ok()) << output.status();
    for (int p = 0; p < kPrompts; ++p) {
      generated[p].push_back(next_token(step, *output, p));
      next[p] = {generated[p].back()};
    }
  }
  for (int p = 0; p < kPrompts; ++p) {
    EXPECT_THAT(generated[p],
                testing::ElementsAreArray(reference.Ints("greedy." + std::to_string(p))));
  }
}

// All prompts packed in one batch, then decoded together: the same tokens and logits (to the
// bit) as each prompt alone.
TEST_P(ReferenceTest, PackedBatchEqualsSingleSequences) {
  Reference reference(model());
  DecodePackedGreedily(
      [](int, ForwardBatch&) {},
      [&](int step, const ForwardOutput& output, int p) {
        const std::vector<float> expected = reference.Floats("greedy_logits." + std::to_string(p));
        EXPECT_LE(RelativeError(Row(output.logits, p), Row(expected, step)), kMaxRelativeError);
        return ArgMax(Row(output.logits, p));
      });
}

// Rows marked argmax_only come back as their argmax (computed by the backend), the others as
// logits, first in the logits array: greedy decoding through both gives transformers' tokens.
TEST_P(ReferenceTest, ArgmaxOnlyRowsReturnTheirGreedyTokenAndTheOthersTheirLogits) {
  Reference reference(model());
  // One prompt returns logits (1 at even steps, 0 at odd ones), the others only their argmax.
  auto with_logits = [](int step) { return step % 2 == 0 ? 1 : 0; };
  DecodePackedGreedily(
      [&](int step, ForwardBatch& batch) {
        batch.argmax_only = {with_logits(step) != 0, with_logits(step) != 1, true};
      },
      [&](int step, const ForwardOutput& output, int p) {
        EXPECT_EQ(output.argmax.size(), static_cast<size_t>(kPrompts));
        EXPECT_EQ(output.logits.size(), static_cast<size_t>(vocab_));  // one row of logits
        if (p == with_logits(step) && output.logits.size() == static_cast<size_t>(vocab_)) {
          const std::vector<float> expected =
              reference.Floats("greedy_logits." + std::to_string(p));
          EXPECT_LE(RelativeError(Row(output.logits, 0), Row(expected, step)), kMaxRelativeError);
          EXPECT_EQ(output.argmax[p], ArgMax(Row(output.logits, 0)));
        }
        return p < static_cast<int>(output.argmax.size()) ? output.argmax[p] : -1;
      });

  OfflineBatcher batcher(runner_->block_size(), runner_->num_blocks());
  ASSERT_EQ(batcher.AddSequence(4).value(), 0);
  ForwardBatch bad;
  ASSERT_TRUE(batcher.Append(bad, 0, std::vector<int32_t>{1, 2}, true).ok());
  bad.argmax_only = {true, false};  // two flags for one logits row
  EXPECT_EQ(runner_->Forward(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(
    AllArchitectures, ReferenceTest,
    testing::Combine(testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
                     testing::Values("cpu", "cuda")),
    [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

}  // namespace
}  // namespace moe
