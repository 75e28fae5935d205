// End-to-end tests of moe-serve in process: the real MoeServer (gRPC callback service, health,
// reflection) around the real Engine on the demo model, called over loopback TCP with real
// gRPC clients. No mocks.
#include <atomic>
#include <cmath>
#include <functional>
#include <thread>

#include "absl/strings/match.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "google/protobuf/unknown_field_set.h"
#include "grpcpp/impl/rpc_method.h"
#include "grpcpp/support/sync_stream.h"
#include "gtest/gtest.h"
#include "tests/server/server_test_util.h"

namespace moe::server::testing {
namespace {

using ::testing::HasSubstr;
using HealthStatus = grpc::health::v1::HealthCheckResponse;

class DemoModelEnvironment : public ::testing::Environment {
 public:
  void TearDown() override { RemoveDemoModel(); }
};
[[maybe_unused]] ::testing::Environment* const kDemoEnvironment =
    ::testing::AddGlobalTestEnvironment(new DemoModelEnvironment);

std::vector<int32_t> Prompt(int32_t seed, int32_t length) {
  std::vector<int32_t> prompt;
  for (int32_t i = 0; i < length; ++i) prompt.push_back((seed * 131 + i * 17 + 5) % 2000 + 100);
  return prompt;
}

// The engine has released every sequence and KV block.
bool EngineIdle(Engine& engine) {
  const EngineStats stats = engine.Stats();
  return stats.requests_finished == stats.requests_submitted && stats.num_running == 0 &&
         stats.num_waiting == 0 && stats.num_queued == 0 && stats.kv_used_blocks == 0 &&
         stats.kv_free_blocks == stats.kv_total_blocks;
}

TEST(ServerTest, StreamedGreedyEqualsOfflineGreedy) {
  auto s = TestServer::Start(TestOptions());
  OfflineGreedy offline;
  const std::vector<int32_t> prompt = Prompt(1, 12);
  const StreamResult result = RunGenerate(*s->stub, GreedyRequest(prompt, 40));
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.tokens, offline.Generate(prompt, 40));
  EXPECT_EQ(result.last.finish_reason(), v1::FINISH_REASON_LENGTH);
  const v1::Usage& usage = result.last.usage();
  EXPECT_EQ(usage.prompt_tokens(), 12);
  EXPECT_EQ(usage.completion_tokens(), 40);
  EXPECT_EQ(usage.cached_prompt_tokens(), 0);
  const int64_t active = s->server->model_info().parameters().active_per_token();
  EXPECT_GT(active, 0);
  EXPECT_EQ(usage.active_parameters_per_token(), active);
  EXPECT_EQ(usage.active_parameters_used(), active * (12 + 40));
  // Text: the streamed deltas concatenate to the tokenizer's decoding of the tokens.
  auto tokenizer = Tokenizer::FromFile(TokenizerFixture());
  ASSERT_TRUE(tokenizer.ok());
  absl::StatusOr<std::string> text = (*tokenizer)->Decode(result.tokens, true);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(result.text, *text);
  for (const v1::GenerateResponse& r : result.responses) {
    EXPECT_FALSE(r.request_id().empty());
    if (&r != &result.responses.back()) {
      EXPECT_EQ(r.finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
    }
  }
  EXPECT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
}

TEST(ServerTest, ThirtyTwoConcurrentStreamsAllEqualOffline) {
  ServerOptions options = TestOptions();
  auto s = TestServer::Start(options);
  OfflineGreedy offline;
  constexpr int kStreams = 32;
  std::vector<StreamResult> results(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i) {
    threads.emplace_back([&, i] {
      results[i] = RunGenerate(*s->stub, GreedyRequest(Prompt(i, 5 + i % 7), 12 + i % 5));
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, offline.Generate(Prompt(i, 5 + i % 7), 12 + i % 5)) << i;
  }
  EXPECT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
}

TEST(ServerTest, TextPromptEqualsItsTokenIds) {
  auto s = TestServer::Start(TestOptions());
  const std::string prompt = "The quick brown fox jumps over the lazy dog.";
  v1::TokenizeRequest tokenize;
  tokenize.set_text(prompt);
  v1::TokenizeResponse tokens;
  grpc::ClientContext context;
  ASSERT_TRUE(s->stub->Tokenize(&context, tokenize, &tokens).ok());
  ASSERT_GT(tokens.token_ids_size(), 0);

  v1::GenerateRequest by_text = GreedyRequest({}, 20);
  by_text.set_text(prompt);
  const StreamResult a = RunGenerate(*s->stub, by_text);
  const StreamResult b = RunGenerate(
      *s->stub, GreedyRequest({tokens.token_ids().begin(), tokens.token_ids().end()}, 20));
  ASSERT_TRUE(a.status.ok()) << a.status.error_message();
  ASSERT_TRUE(b.status.ok()) << b.status.error_message();
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.text, b.text);
  EXPECT_EQ(a.last.usage().prompt_tokens(), tokens.token_ids_size());
  // The second identical prompt found its full blocks in the prefix cache (block size 16).
  EXPECT_EQ(b.last.usage().cached_prompt_tokens(), (tokens.token_ids_size() - 1) / 16 * 16);
}

TEST(ServerTest, TokenizeAndDetokenizeMatchTheTokenizer) {
  auto s = TestServer::Start(TestOptions());
  auto tokenizer = Tokenizer::FromFile(TokenizerFixture());
  ASSERT_TRUE(tokenizer.ok());
  const std::string text = "Hello world! Grüße, 世界 🙂 code: x = f(y) + 1;";
  v1::TokenizeRequest request;
  request.set_text(text);
  request.set_return_pieces(true);
  v1::TokenizeResponse response;
  grpc::ClientContext c1;
  ASSERT_TRUE(s->stub->Tokenize(&c1, request, &response).ok());
  absl::StatusOr<std::vector<int32_t>> expected = (*tokenizer)->Encode(text);
  ASSERT_TRUE(expected.ok());
  EXPECT_EQ(std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end()),
            *expected);
  ASSERT_EQ(response.pieces_size(), response.token_ids_size());
  EXPECT_EQ(response.pieces(0), (*tokenizer)->IdToToken(response.token_ids(0)).value_or("?"));

  v1::DetokenizeRequest detokenize;
  *detokenize.mutable_token_ids() = response.token_ids();
  v1::DetokenizeResponse decoded;
  grpc::ClientContext c2;
  ASSERT_TRUE(s->stub->Detokenize(&c2, detokenize, &decoded).ok());
  EXPECT_EQ(decoded.text(), text);

  detokenize.add_token_ids(1 << 20);
  grpc::ClientContext c3;
  const grpc::Status bad = s->stub->Detokenize(&c3, detokenize, &decoded);
  EXPECT_EQ(bad.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad.error_message(), HasSubstr("token_ids["));

  v1::TokenizeRequest invalid;
  invalid.set_text(std::string("ab\xff", 3));
  grpc::ClientContext c4;
  const grpc::Status bad_utf8 = s->stub->Tokenize(&c4, invalid, &response);
  EXPECT_EQ(bad_utf8.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(bad_utf8.error_message(), HasSubstr("UTF-8 at byte 2"));
}

TEST(ServerTest, ModelInfoDescribesTheLoadedModel) {
  auto s = TestServer::Start(TestOptions());
  OfflineGreedy offline;
  const ModelConfig& config = offline.runner().config();
  const ParameterCounts& params = offline.runner().parameters();
  v1::ModelInfo info;
  grpc::ClientContext context;
  ASSERT_TRUE(s->stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.architecture(), "mixtral");
  EXPECT_EQ(info.architecture_class(), "MixtralForCausalLM");
  EXPECT_EQ(info.num_layers(), config.num_layers);
  EXPECT_EQ(info.num_moe_layers(), config.num_moe_layers());
  EXPECT_EQ(info.moe_layer_indices_size(), config.num_moe_layers());
  EXPECT_EQ(info.num_experts(), 8);
  EXPECT_EQ(info.top_k(), 2);
  EXPECT_EQ(info.num_shared_experts(), 0);
  EXPECT_EQ(info.vocab_size(), config.vocab_size);
  EXPECT_EQ(info.parameters().total(), params.total);
  EXPECT_EQ(info.parameters().active_per_token(), params.active_per_token);
  EXPECT_EQ(info.parameters().routed_expert(), params.routed_expert);
  EXPECT_EQ(info.parameters().non_expert(), params.non_expert);
  EXPECT_LT(info.parameters().active_per_token(), info.parameters().total());
  EXPECT_EQ(info.dtype(), "bfloat16");
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_THAT(info.device(), HasSubstr("cpu"));
  EXPECT_EQ(info.context_length(), config.max_position_embeddings);
  EXPECT_EQ(info.max_prompt_tokens(), config.max_position_embeddings - 1);
  EXPECT_EQ(info.kv_total_blocks(), s->server->engine()->Stats().kv_total_blocks);
  EXPECT_EQ(info.kv_capacity_tokens(),
            static_cast<int64_t>(info.kv_total_blocks()) * info.kv_block_size());
  EXPECT_EQ(info.kv_cache_dtype(), "f32");
  EXPECT_TRUE(info.has_tokenizer());
}

// --kv_cache_dtype=bf16: the same budget holds twice the tokens; concurrent requests get the
// tokens each gets alone.
TEST(ServerTest, Bf16KvCacheHoldsTwiceTheTokensAndStaysBatchInvariant) {
  ServerOptions options = TestOptions();
  options.kv_cache_dtype = DType::kBF16;
  auto s = TestServer::Start(options);
  auto f32 = TestServer::Start(TestOptions());
  v1::ModelInfo info, f32_info;
  grpc::ClientContext context, f32_context;
  ASSERT_TRUE(s->stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok());
  ASSERT_TRUE(f32->stub->GetModelInfo(&f32_context, v1::GetModelInfoRequest(), &f32_info).ok());
  EXPECT_EQ(info.kv_cache_dtype(), "bf16");
  EXPECT_EQ(info.kv_total_blocks(), 2 * f32_info.kv_total_blocks());
  std::vector<std::vector<int32_t>> alone(3), together(3);
  for (int i = 0; i < 3; ++i) {
    const StreamResult result = RunGenerate(*s->stub, GreedyRequest(Prompt(i, 9), 12));
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
    alone[i] = result.tokens;
    EXPECT_EQ(alone[i].size(), 12u);
  }
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) {
    threads.emplace_back(
        [&, i] { together[i] = RunGenerate(*s->stub, GreedyRequest(Prompt(i, 9), 12)).tokens; });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(together, alone);
}

TEST(ServerTest, ExpertStatsCountEveryRoutedToken) {
  ServerOptions options = TestOptions();
  options.expert_stats_window_steps = 20;  // buckets of 2 steps
  auto s = TestServer::Start(options);
  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      ASSERT_TRUE(RunGenerate(*s->stub, GreedyRequest(Prompt(i, 9), 15)).status.ok());
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
  const EngineStats engine = s->server->engine()->Stats();

  v1::ExpertStats stats;
  grpc::ClientContext context;
  ASSERT_TRUE(s->stub->GetExpertStats(&context, v1::GetExpertStatsRequest(), &stats).ok());
  EXPECT_EQ(stats.num_experts(), 8);
  EXPECT_EQ(stats.top_k(), 2);
  const v1::LoadSpan& all = stats.since_start();
  EXPECT_EQ(all.steps(), engine.steps);
  EXPECT_EQ(all.tokens(), engine.scheduled_tokens);
  // 4 requests: 9 prompt tokens + 14 decode inputs each (the last token is never computed).
  EXPECT_EQ(all.tokens(), 4 * (9 + 14));
  ASSERT_EQ(all.layers_size(), s->server->model_info().num_moe_layers());
  for (const v1::LayerLoad& layer : all.layers()) {
    EXPECT_EQ(layer.tokens(), all.tokens());
    int64_t sum = 0;
    for (int64_t c : layer.expert_counts()) sum += c;
    EXPECT_EQ(sum, all.tokens() * stats.top_k()) << "layer " << layer.layer();
    ASSERT_EQ(layer.expert_counts_size(), 8);
    ASSERT_EQ(layer.mean_router_probability_size(), 8);
    double p = 0;
    for (double x : layer.mean_router_probability()) p += x;
    EXPECT_NEAR(p, 1.0, 1e-3);  // softmax probabilities average to a distribution
    EXPECT_GE(layer.max_load_ratio(), 1.0);
    EXPECT_LE(layer.max_load_ratio(), 8.0);
    EXPECT_GT(layer.entropy_ratio(), 0.0);
    EXPECT_LE(layer.entropy_ratio(), 1.0 + 1e-9);
    EXPECT_GT(layer.switch_balance(), 0.0);
    EXPECT_GT(layer.router_z(), 0.0);
    EXPECT_EQ(layer.hottest_experts_size(), 3);
    int dead = 0;
    for (int64_t c : layer.expert_counts()) dead += c == 0;
    EXPECT_EQ(layer.dead_experts(), dead);
  }
  // The window covers the most recent steps only, and sums the same way.
  const v1::LoadSpan& window = stats.window();
  EXPECT_EQ(stats.window_steps(), 20);
  EXPECT_LE(window.steps(), all.steps());
  EXPECT_LE(window.steps(), 20 + 2);
  if (all.steps() >= 20) {
    EXPECT_GE(window.steps(), 20);
  }
  for (const v1::LayerLoad& layer : window.layers()) {
    int64_t sum = 0;
    for (int64_t c : layer.expert_counts()) sum += c;
    EXPECT_EQ(sum, window.tokens() * stats.top_k());
  }
}

TEST(ServerTest, PerTokenRoutingAndLogprobs) {
  auto s = TestServer::Start(TestOptions());
  v1::GenerateRequest request = GreedyRequest(Prompt(3, 6), 8);
  request.set_logprobs(3);
  request.set_return_routing(true);
  const StreamResult result = RunGenerate(*s->stub, request);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  int logprobs = 0;
  std::vector<int32_t> positions;
  for (const v1::GenerateResponse& r : result.responses) {
    ASSERT_EQ(r.logprobs_size(), r.token_ids_size());
    for (int i = 0; i < r.logprobs_size(); ++i) {
      EXPECT_EQ(r.logprobs(i).chosen().token_id(), r.token_ids(i));
      ASSERT_EQ(r.logprobs(i).top_size(), 3);
      // Greedy: the chosen token is the most likely one.
      EXPECT_EQ(r.logprobs(i).top(0).token_id(), r.token_ids(i));
      EXPECT_LE(r.logprobs(i).chosen().logprob(), 0.0f);
      ++logprobs;
    }
    for (const v1::TokenRouting& t : r.routing()) {
      positions.push_back(t.position());
      ASSERT_EQ(t.layers_size(), 4);
      for (const v1::LayerRouting& l : t.layers()) {
        ASSERT_EQ(l.expert_ids_size(), 2);
        ASSERT_EQ(l.weights_size(), 2);
        EXPECT_NE(l.expert_ids(0), l.expert_ids(1));
        EXPECT_NEAR(l.weights(0) + l.weights(1), 1.0f, 1e-4);  // Mixtral renormalises
      }
    }
  }
  EXPECT_EQ(logprobs, 8);
  // Generated tokens but the last are computed: positions 6..12 (prompt routing not asked).
  std::vector<int32_t> expected;
  for (int32_t p = 6; p < 6 + 7; ++p) expected.push_back(p);
  EXPECT_EQ(positions, expected);

  request.set_return_prompt_routing(true);
  const StreamResult with_prompt = RunGenerate(*s->stub, request);
  ASSERT_TRUE(with_prompt.status.ok());
  int routed = 0;
  for (const auto& r : with_prompt.responses) routed += r.routing_size();
  EXPECT_EQ(routed, 6 + 7);
}

TEST(ServerTest, StopStringEndsTheStreamWithoutIt) {
  auto s = TestServer::Start(TestOptions());
  // Find text the model will produce, then stop on a piece of it.
  const StreamResult free_run = RunGenerate(*s->stub, GreedyRequest(Prompt(5, 8), 30));
  ASSERT_TRUE(free_run.status.ok());
  ASSERT_GE(free_run.text.size(), 12u);
  const std::string stop = free_run.text.substr(8, 3);
  v1::GenerateRequest request = GreedyRequest(Prompt(5, 8), 30);
  request.mutable_stop()->add_stop_strings(stop);
  const StreamResult stopped = RunGenerate(*s->stub, request);
  ASSERT_TRUE(stopped.status.ok()) << stopped.status.error_message();
  EXPECT_EQ(stopped.last.finish_reason(), v1::FINISH_REASON_STOP_STRING);
  EXPECT_EQ(stopped.last.matched_stop_string(), stop);
  EXPECT_EQ(stopped.text, free_run.text.substr(0, free_run.text.find(stop)));
}

// ---- Validation: one case per invalid field ------------------------------------------------

struct InvalidCase {
  std::string name;
  std::function<void(v1::GenerateRequest&)> mutate;
  grpc::StatusCode code;
  std::vector<std::string> message_parts;  // the field, the value, what is allowed
};

void PrintTo(const InvalidCase& c, std::ostream* os) { *os << c.name; }

class InvalidFieldTest : public ::testing::TestWithParam<InvalidCase> {
 protected:
  static void SetUpTestSuite() {
    ServerOptions options = TestOptions();
    options.max_prompt_tokens = 64;
    server_ = TestServer::Start(options).release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static TestServer* server_;
};
TestServer* InvalidFieldTest::server_ = nullptr;

TEST_P(InvalidFieldTest, IsRefusedWithAMessageNamingTheField) {
  const InvalidCase& c = GetParam();
  v1::GenerateRequest request = GreedyRequest({10, 11, 12}, 4);
  c.mutate(request);
  const StreamResult result = RunGenerate(*server_->stub, request);
  EXPECT_EQ(result.status.error_code(), c.code) << result.status.error_message();
  for (const std::string& part : c.message_parts) {
    EXPECT_THAT(result.status.error_message(), HasSubstr(part));
  }
  EXPECT_TRUE(result.responses.empty());
}

const grpc::StatusCode kInvalid = grpc::StatusCode::INVALID_ARGUMENT;

INSTANTIATE_TEST_SUITE_P(
    Fields, InvalidFieldTest,
    ::testing::Values(
        InvalidCase{"NoPrompt",
                    [](auto& r) { r.clear_prompt(); },
                    kInvalid,
                    {"prompt", "text", "token_ids"}},
        InvalidCase{"EmptyText", [](auto& r) { r.set_text(""); }, kInvalid, {"text", "empty"}},
        InvalidCase{"EmptyTokenIds",
                    [](auto& r) { r.mutable_token_ids()->clear_ids(); },
                    kInvalid,
                    {"token_ids.ids", "empty"}},
        InvalidCase{"UnknownTokenId",
                    [](auto& r) { r.mutable_token_ids()->set_ids(1, 999999); },
                    kInvalid,
                    {"token_ids.ids[1]", "999999", "[0, 2505)"}},
        InvalidCase{"NegativeTokenId",
                    [](auto& r) { r.mutable_token_ids()->set_ids(0, -1); },
                    kInvalid,
                    {"token_ids.ids[0]", "-1"}},
        InvalidCase{"InvalidUtf8",
                    [](auto& r) { r.set_text(std::string("ok \xc3\x28", 5)); },
                    kInvalid,
                    {"text", "UTF-8", "byte 3"}},
        InvalidCase{"PromptTooLong",
                    [](auto& r) {
                      for (int i = 0; i < 100; ++i) r.mutable_token_ids()->add_ids(7);
                    },
                    kInvalid,
                    {"prompt", "103 tokens", "max_prompt_tokens = 64"}},
        InvalidCase{"NegativeTemperature",
                    [](auto& r) { r.mutable_sampling()->set_temperature(-0.5f); },
                    kInvalid,
                    {"sampling.temperature", "-0.5", ">= 0"}},
        InvalidCase{"NanTemperature",
                    [](auto& r) { r.mutable_sampling()->set_temperature(NAN); },
                    kInvalid,
                    {"sampling.temperature", "finite"}},
        InvalidCase{"TopPZero",
                    [](auto& r) { r.mutable_sampling()->set_top_p(0.0f); },
                    kInvalid,
                    {"sampling.top_p", "0", "(0, 1]"}},
        InvalidCase{"TopPAboveOne",
                    [](auto& r) { r.mutable_sampling()->set_top_p(1.5f); },
                    kInvalid,
                    {"sampling.top_p", "1.5", "(0, 1]"}},
        InvalidCase{"NegativeTopK",
                    [](auto& r) { r.mutable_sampling()->set_top_k(-1); },
                    kInvalid,
                    {"sampling.top_k", "-1", "[0, 2505]"}},
        InvalidCase{"MinPAboveOne",
                    [](auto& r) { r.mutable_sampling()->set_min_p(2.0f); },
                    kInvalid,
                    {"sampling.min_p", "2", "[0, 1]"}},
        InvalidCase{"ZeroRepetitionPenalty",
                    [](auto& r) { r.mutable_sampling()->set_repetition_penalty(0.0f); },
                    kInvalid,
                    {"sampling.repetition_penalty", "> 0"}},
        InvalidCase{"PresencePenalty",
                    [](auto& r) { r.mutable_sampling()->set_presence_penalty(3.0f); },
                    kInvalid,
                    {"sampling.presence_penalty", "3", "[-2, 2]"}},
        InvalidCase{"FrequencyPenalty",
                    [](auto& r) { r.mutable_sampling()->set_frequency_penalty(-2.5f); },
                    kInvalid,
                    {"sampling.frequency_penalty", "-2.5", "[-2, 2]"}},
        InvalidCase{"ZeroMaxTokens",
                    [](auto& r) { r.mutable_stop()->set_max_tokens(0); },
                    kInvalid,
                    {"stop.max_tokens", "0", "[1, 4093]"}},
        InvalidCase{"MaxTokensBeyondContext",
                    [](auto& r) { r.mutable_stop()->set_max_tokens(5000); },
                    kInvalid,
                    {"stop.max_tokens", "5000", "[1, 4093]", "context length"}},
        InvalidCase{"MinTokensAboveMax",
                    [](auto& r) { r.mutable_stop()->set_min_tokens(5); },
                    kInvalid,
                    {"stop.min_tokens", "5", "[0, max_tokens = 4]"}},
        InvalidCase{"StopTokenId",
                    [](auto& r) { r.mutable_stop()->add_stop_token_ids(-3); },
                    kInvalid,
                    {"stop.stop_token_ids[0]", "-3", "[0, 2505)"}},
        InvalidCase{"TooManyStopTokenIds",
                    [](auto& r) {
                      for (int i = 0; i < 1025; ++i) r.mutable_stop()->add_stop_token_ids(1);
                    },
                    kInvalid,
                    {"stop.stop_token_ids", "1025", "at most 1024"}},
        InvalidCase{"PromptTextTooLong",
                    [](auto& r) { r.set_text(std::string(64 * 64 + 1, 'a')); },
                    kInvalid,
                    {"text", "4097 bytes", "at most 4096 bytes"}},
        InvalidCase{"TooManyStopStrings",
                    [](auto& r) {
                      for (int i = 0; i < 17; ++i) r.mutable_stop()->add_stop_strings("x");
                    },
                    kInvalid,
                    {"stop.stop_strings", "17", "at most 16"}},
        InvalidCase{"EmptyStopString",
                    [](auto& r) { r.mutable_stop()->add_stop_strings(""); },
                    kInvalid,
                    {"stop.stop_strings[0]", "empty"}},
        InvalidCase{"LongStopString",
                    [](auto& r) { r.mutable_stop()->add_stop_strings(std::string(300, 'a')); },
                    kInvalid,
                    {"stop.stop_strings[0]", "300 bytes", "at most 256"}},
        InvalidCase{"StopStringInvalidUtf8",
                    [](auto& r) { r.mutable_stop()->add_stop_strings("\xff"); },
                    kInvalid,
                    {"stop.stop_strings[0]", "UTF-8"}},
        InvalidCase{"Logprobs",
                    [](auto& r) { r.set_logprobs(21); },
                    kInvalid,
                    {"logprobs", "21", "[0, 20]"}},
        InvalidCase{"PromptRoutingWithoutRouting",
                    [](auto& r) { r.set_return_prompt_routing(true); },
                    kInvalid,
                    {"return_prompt_routing", "return_routing"}},
        InvalidCase{"Priority",
                    [](auto& r) { r.set_priority(5000); },
                    kInvalid,
                    {"priority", "5000", "[-1000, 1000]"}},
        InvalidCase{"RequestIdTooLong",
                    [](auto& r) { r.set_request_id(std::string(200, 'r')); },
                    kInvalid,
                    {"request_id", "200 bytes", "at most 128"}},
        InvalidCase{"RequestIdNotPrintable",
                    [](auto& r) { r.set_request_id("a b"); },
                    kInvalid,
                    {"request_id", "byte 1", "printable"}},
        InvalidCase{"NegativeN", [](auto& r) { r.set_n(-1); }, kInvalid, {"n: -1", "[0, 16]"}},
        InvalidCase{"NAboveLimit", [](auto& r) { r.set_n(17); }, kInvalid, {"n: 17", "[0, 16]"}},
        InvalidCase{"LogitBiasTokenOutsideVocabulary",
                    [](auto& r) { (*r.mutable_sampling()->mutable_logit_bias())[1 << 20] = 1.0f; },
                    kInvalid,
                    {"sampling.logit_bias", "token 1048576", "[0, "}},
        InvalidCase{"LogitBiasOutOfRange",
                    [](auto& r) { (*r.mutable_sampling()->mutable_logit_bias())[5] = 101.0f; },
                    kInvalid,
                    {"sampling.logit_bias", "bias 101 of token 5", "[-100, 100]"}},
        InvalidCase{"LogitBiasNaN",
                    [](auto& r) { (*r.mutable_sampling()->mutable_logit_bias())[5] = NAN; },
                    kInvalid,
                    {"sampling.logit_bias", "[-100, 100]"}},
        InvalidCase{"TooManyLogitBiasEntries",
                    [](auto& r) {
                      for (int i = 0; i < 1025; ++i) {
                        (*r.mutable_sampling()->mutable_logit_bias())[i] = 1.0f;
                      }
                    },
                    kInvalid,
                    {"sampling.logit_bias", "1025 entries", "at most 1024"}}),
    [](const ::testing::TestParamInfo<InvalidCase>& info) { return info.param.name; });

// ---- Deadlines, cancellation, overload -------------------------------------------------------

// Holds the engine thread after a step while set (its on_step hook), so that nothing leaves
// the queue meanwhile, however slow this machine or build is.
struct EngineGate {
  absl::Mutex mu;
  bool hold = false;
  bool held = false;  // the engine thread waits at the gate

  // Test options with max_num_seqs = 1, `max_queued` queue slots and `gate` as the on_step
  // hook; `more_hooks` (optional) sets other hooks.
  static ServerOptions Options(const std::shared_ptr<EngineGate>& gate, int32_t max_queued,
                               std::function<void(ServerHooks&)> more_hooks = nullptr) {
    ServerOptions options = TestOptions();
    options.max_num_seqs = 1;
    options.max_queued_requests = max_queued;
    options.make_hooks = [gate, more_hooks](const LoadedModel&) {
      ServerHooks hooks;
      hooks.on_step = [gate](const EngineStepInfo&) { gate->Pass(); };
      if (more_hooks) more_hooks(hooks);
      return hooks;
    };
    return options;
  }

  void Pass() {
    absl::MutexLock lock(&mu);
    held = hold;
    mu.Await(absl::Condition(
        +[](bool* hold) { return !*hold; }, &hold));
    held = false;
  }
  void Set(bool on) {
    absl::MutexLock lock(&mu);
    hold = on;
  }
  bool Held() {
    absl::MutexLock lock(&mu);
    return held;
  }
};

// A Generate call that runs (it streamed a response) until Cancel.
struct RunningStream {
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;

  bool Start(v1::Inference::Stub& stub, const v1::GenerateRequest& request) {
    reader = stub.Generate(&context, request);
    v1::GenerateResponse response;
    return reader->Read(&response);
  }
  // Cancels the call; its status code.
  grpc::StatusCode Cancel() {
    context.TryCancel();
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
    }
    return reader->Finish().error_code();
  }
};

TEST(ServerTest, DeadlineEndsTheRequestAndFreesItsBlocks) {
  auto s = TestServer::Start(TestOptions());
  const StreamResult result =
      RunGenerate(*s->stub, GreedyRequest(Prompt(2, 10), 4000), absl::Milliseconds(300));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
      << result.status.error_message();
  EXPECT_LT(result.tokens.size(), 4000u);
  EXPECT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
  const EngineStats stats = s->server->engine()->Stats();
  EXPECT_EQ(stats.requests_finished, 1);
  EXPECT_EQ(stats.finished_by_reason.contains(FinishReason::kLength), false);
}

// A client cancel of a call of `n` completions of 4000 tokens once it holds KV blocks: every
// completion is cancelled in the engine and every block freed.
void ExpectClientCancelFreesEverything(int32_t n, const std::vector<int32_t>& prompt) {
  auto s = TestServer::Start(TestOptions());
  v1::GenerateRequest request = GreedyRequest(prompt, 4000);
  if (n != 1) request.set_n(n);
  RunningStream call;
  ASSERT_TRUE(call.Start(*s->stub, request));  // running: it holds KV blocks now
  EXPECT_TRUE(WaitFor([&] { return s->server->engine()->Stats().kv_used_blocks > 0; }));
  EXPECT_EQ(call.Cancel(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
  const EngineStats stats = s->server->engine()->Stats();
  ASSERT_TRUE(stats.finished_by_reason.contains(FinishReason::kCancelled));
  EXPECT_EQ(stats.finished_by_reason.at(FinishReason::kCancelled), n);
  EXPECT_EQ(stats.requests_finished, n);
}

TEST(ServerTest, ClientCancelCancelsInTheEngineAndFreesBlocks) {
  ExpectClientCancelFreesEverything(1, Prompt(4, 20));
}

TEST(ServerTest, SlowReaderDoesNotStallTheEngine) {
  auto s = TestServer::Start(TestOptions());
  // A client whose HTTP/2 receive window stays small (no BDP growth, 1 KiB lookahead), so
  // that the server's writes back up as soon as the client stops reading.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 1024);
  auto channel = grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", s->server->port()),
                                           grpc::InsecureChannelCredentials(), args);
  auto stub = v1::Inference::NewStub(channel);
  constexpr int kTokens = 400;
  v1::GenerateRequest request = GreedyRequest(Prompt(6, 5), kTokens);
  request.set_logprobs(5);  // ~60 bytes per token: far more than the window
  grpc::ClientContext context;
  auto reader = stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  std::vector<int32_t> tokens(response.token_ids().begin(), response.token_ids().end());
  // The client reads nothing more; the engine still finishes the whole request.
  ASSERT_TRUE(WaitFor([&] { return s->server->engine()->Stats().requests_finished == 1; }));
  int responses = 1;
  int logprobs = response.logprobs_size();
  while (reader->Read(&response)) {
    tokens.insert(tokens.end(), response.token_ids().begin(), response.token_ids().end());
    logprobs += response.logprobs_size();
    ++responses;
  }
  ASSERT_TRUE(reader->Finish().ok());
  OfflineGreedy offline;
  EXPECT_EQ(tokens, offline.Generate(Prompt(6, 5), kTokens));
  EXPECT_EQ(logprobs, kTokens);
  // What the engine produced while the reader was away went out coalesced, in few messages.
  RecordProperty("responses", responses);
  EXPECT_LT(responses, kTokens / 2);
}

TEST(ServerTest, OverloadIsResourceExhausted) {
  // The engine thread can be held after a step, so that A cannot finish (and let B run, which
  // would leave room in the queue for C).
  auto gate = std::make_shared<EngineGate>();
  auto s = TestServer::Start(EngineGate::Options(gate, /*max_queued=*/1));
  // A: running (it streamed a token), then held. B: waiting behind it (max_num_seqs = 1).
  RunningStream a;
  ASSERT_TRUE(a.Start(*s->stub, GreedyRequest(Prompt(7, 5), 4000)));
  gate->Set(true);
  grpc::ClientContext b_context;
  auto b = s->stub->Generate(&b_context, GreedyRequest(Prompt(8, 5), 10));
  ASSERT_TRUE(WaitFor([&] { return s->server->engine()->Stats().requests_submitted == 2; }));
  // C: the queue (1) is full.
  const StreamResult c = RunGenerate(*s->stub, GreedyRequest(Prompt(9, 5), 10));
  EXPECT_EQ(c.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << c.status.error_message();
  EXPECT_THAT(c.status.error_message(), HasSubstr("overloaded"));
  EXPECT_EQ(s->server->engine()->Stats().requests_overloaded, 1);
  gate->Set(false);
  EXPECT_EQ(a.Cancel(), grpc::StatusCode::CANCELLED);
  // B then runs to completion.
  v1::GenerateResponse response;
  std::vector<int32_t> b_tokens;
  while (b->Read(&response)) {
    b_tokens.insert(b_tokens.end(), response.token_ids().begin(), response.token_ids().end());
  }
  EXPECT_TRUE(b->Finish().ok());
  EXPECT_EQ(b_tokens.size(), 10u);
  EXPECT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
}

// ---- n completions per call -----------------------------------------------------------------

// The responses of a call with n completions, split by GenerateResponse.index.
struct Completions {
  std::vector<std::vector<v1::GenerateResponse>> responses;
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::string> text;
};

Completions SplitByIndex(const StreamResult& result, int n) {
  Completions out;
  out.responses.resize(n);
  out.tokens.resize(n);
  out.text.resize(n);
  for (const v1::GenerateResponse& r : result.responses) {
    EXPECT_GE(r.index(), 0);
    EXPECT_LT(r.index(), n);
    if (r.index() < 0 || r.index() >= n) continue;
    out.responses[r.index()].push_back(r);
    out.tokens[r.index()].insert(out.tokens[r.index()].end(), r.token_ids().begin(),
                                 r.token_ids().end());
    out.text[r.index()] += r.text();
  }
  return out;
}

TEST(ServerTest, SeededCompletionsEqualSeparateRequestsWithSeedPlusIndex) {
  auto s = TestServer::Start(TestOptions());
  constexpr int kN = 3;
  constexpr uint64_t kSeed = 1234;
  v1::GenerateRequest single = GreedyRequest(Prompt(30, 10), 16);
  single.mutable_sampling()->set_temperature(1.0f);
  single.mutable_sampling()->set_seed(kSeed);
  single.set_request_id("three");
  v1::GenerateRequest request = single;
  request.set_n(kN);
  const StreamResult result = RunGenerate(*s->stub, request);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  const Completions completions = SplitByIndex(result, kN);
  for (int i = 0; i < kN; ++i) {
    single.mutable_sampling()->set_seed(kSeed + i);
    const StreamResult alone = RunGenerate(*s->stub, single);
    ASSERT_TRUE(alone.status.ok()) << alone.status.error_message();
    for (const v1::GenerateResponse& r : alone.responses) EXPECT_EQ(r.index(), 0);
    EXPECT_EQ(completions.tokens[i], alone.tokens) << "completion " << i;
    EXPECT_EQ(completions.text[i], alone.text) << "completion " << i;
    // Each completion ends with its own last response, and only that one has a finish reason.
    ASSERT_FALSE(completions.responses[i].empty()) << i;
    const v1::GenerateResponse& last = completions.responses[i].back();
    EXPECT_EQ(last.finish_reason(), v1::FINISH_REASON_LENGTH) << i;
    EXPECT_EQ(last.usage().prompt_tokens(), 10) << i;
    EXPECT_EQ(last.usage().completion_tokens(), 16) << i;
    EXPECT_GT(last.usage().active_parameters_used(), 0) << i;
    EXPECT_GT(last.timing().total_seconds(), 0.0) << i;
    for (const v1::GenerateResponse& r : completions.responses[i]) {
      EXPECT_EQ(r.request_id(), "three");
      if (&r != &last) {
        EXPECT_EQ(r.finish_reason(), v1::FINISH_REASON_UNSPECIFIED) << i;
      }
    }
  }
  // Different seeds, different samples (deterministic: the seeds are fixed).
  EXPECT_NE(completions.tokens[0], completions.tokens[1]);
  EXPECT_NE(completions.tokens[1], completions.tokens[2]);
  ASSERT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
  EXPECT_EQ(s->server->engine()->Stats().requests_submitted, 2 * kN);
}

// Also: the prompt is computed once. The second completion waits while the first computes the
// prompt's full blocks, then takes them from the prefix cache (2 blocks of 16 of 40 tokens).
TEST(ServerTest, GreedyCompletionsEqualTheSingleGreedyOutput) {
  auto s = TestServer::Start(TestOptions());
  OfflineGreedy offline;
  const std::vector<int32_t> prompt = Prompt(31, 40);
  v1::GenerateRequest request = GreedyRequest(prompt, 20);
  request.set_n(2);
  const StreamResult result = RunGenerate(*s->stub, request);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  const Completions completions = SplitByIndex(result, 2);
  const std::vector<int32_t> expected = offline.Generate(prompt, 20);
  EXPECT_EQ(completions.tokens[0], expected);
  EXPECT_EQ(completions.tokens[1], expected);
  EXPECT_EQ(completions.text[0], completions.text[1]);
  for (int i = 0; i < 2; ++i) {
    ASSERT_FALSE(completions.responses[i].empty());
    EXPECT_EQ(completions.responses[i].back().usage().completion_tokens(), 20);
  }
  EXPECT_EQ(completions.responses[0].back().usage().cached_prompt_tokens(), 0);
  EXPECT_EQ(completions.responses[1].back().usage().cached_prompt_tokens(), 32);
  EXPECT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
}

// prompt_logprobs: every prompt token but the first is scored, once, in order, before the first
// generated token; the generated tokens do not change. (Their values against transformers:
// tests/engine/engine_test.cc.)
TEST(ServerTest, PromptLogprobsScoreEveryPromptTokenBeforeTheFirstGeneratedOne) {
  auto s = TestServer::Start(TestOptions());
  OfflineGreedy offline;
  const std::vector<int32_t> prompt = Prompt(34, 20);
  v1::GenerateRequest request = GreedyRequest(prompt, 5);
  request.set_prompt_logprobs(true);
  const StreamResult result = RunGenerate(*s->stub, request);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.tokens, offline.Generate(prompt, 5));
  std::vector<v1::PromptTokenLogprob> scored;
  bool tokens_seen = false;
  for (const v1::GenerateResponse& r : result.responses) {
    if (r.prompt_logprobs_size() > 0) {
      EXPECT_FALSE(tokens_seen) << "scores after tokens";
    }
    scored.insert(scored.end(), r.prompt_logprobs().begin(), r.prompt_logprobs().end());
    tokens_seen = tokens_seen || r.token_ids_size() > 0;
  }
  ASSERT_EQ(scored.size(), prompt.size() - 1);
  for (size_t i = 0; i < scored.size(); ++i) {
    EXPECT_EQ(scored[i].position(), static_cast<int32_t>(i + 1));
    EXPECT_EQ(scored[i].token_id(), prompt[i + 1]);
    EXPECT_TRUE(std::isfinite(scored[i].logprob()) && scored[i].logprob() <= 0.0f) << i;
  }
  EXPECT_EQ(result.last.usage().cached_prompt_tokens(), 0);
}

// logit_bias reaches the sampler: +100 on one token makes greedy decoding emit only it; -100 on
// the greedy first token makes the first token another one.
TEST(ServerTest, LogitBiasForcesAndBansTokens) {
  auto s = TestServer::Start(TestOptions());
  OfflineGreedy offline;
  const std::vector<int32_t> prompt = Prompt(33, 12);
  const std::vector<int32_t> greedy = offline.Generate(prompt, 6);
  v1::GenerateRequest forced = GreedyRequest(prompt, 6);  // ignore_eos: 7 could be EOS
  (*forced.mutable_sampling()->mutable_logit_bias())[7] = 100.0f;
  const StreamResult forced_result = RunGenerate(*s->stub, forced);
  ASSERT_TRUE(forced_result.status.ok()) << forced_result.status.error_message();
  EXPECT_EQ(forced_result.tokens, std::vector<int32_t>(6, 7));

  v1::GenerateRequest banned = GreedyRequest(prompt, 1);
  (*banned.mutable_sampling()->mutable_logit_bias())[greedy[0]] = -100.0f;
  const StreamResult banned_result = RunGenerate(*s->stub, banned);
  ASSERT_TRUE(banned_result.status.ok()) << banned_result.status.error_message();
  ASSERT_EQ(banned_result.tokens.size(), 1u);
  EXPECT_NE(banned_result.tokens[0], greedy[0]);
}

TEST(ServerTest, ClientCancelOfCompletionsCancelsEveryOneAndFreesBlocks) {
  ExpectClientCancelFreesEverything(4, Prompt(32, 20));
}

TEST(ServerTest, DeadlineOfCompletionsEndsTheCallAndFreesBlocks) {
  auto s = TestServer::Start(TestOptions());
  v1::GenerateRequest request = GreedyRequest(Prompt(33, 10), 4000);
  request.set_n(4);
  const StreamResult result = RunGenerate(*s->stub, request, absl::Milliseconds(300));
  EXPECT_EQ(result.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
      << result.status.error_message();
  ASSERT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
  const EngineStats stats = s->server->engine()->Stats();
  EXPECT_EQ(stats.requests_submitted, 4);
  EXPECT_EQ(stats.requests_finished, 4);
  EXPECT_FALSE(stats.finished_by_reason.contains(FinishReason::kLength));
}

// A call whose n completions do not all fit the queue is refused as a whole: the completions
// already submitted are cancelled, and each submitted completion is one request for the hooks.
TEST(ServerTest, CompletionsBeyondTheQueueAreResourceExhaustedAndLeaveNothing) {
  struct Seen {
    absl::Mutex mu;
    std::vector<std::pair<grpc::StatusCode, bool>> finished;  // code, had a final event
  };
  auto seen = std::make_shared<Seen>();
  class Observer : public RequestObserver {
   public:
    explicit Observer(std::shared_ptr<Seen> seen) : seen_(std::move(seen)) {}
    void OnTokens(int32_t, absl::Time) override {}
    void OnFinished(const RequestEvent* event, grpc::StatusCode code, absl::Time) override {
      absl::MutexLock lock(&seen_->mu);
      seen_->finished.emplace_back(code, event != nullptr);
    }

   private:
    std::shared_ptr<Seen> seen_;
  };
  auto gate = std::make_shared<EngineGate>();
  auto s =
      TestServer::Start(EngineGate::Options(gate, /*max_queued=*/3, [seen](ServerHooks& hooks) {
        hooks.on_request = [seen](absl::Time) { return std::make_unique<Observer>(seen); };
      }));
  // A: running, then the engine thread is held, so that nothing leaves the queue.
  RunningStream a;
  ASSERT_TRUE(a.Start(*s->stub, GreedyRequest(Prompt(34, 5), 4000)));
  gate->Set(true);
  ASSERT_TRUE(WaitFor([&] { return gate->Held(); }));
  // Four completions, room for three in the queue.
  v1::GenerateRequest request = GreedyRequest(Prompt(35, 5), 10);
  request.set_n(4);
  const StreamResult refused = RunGenerate(*s->stub, request);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << refused.status.error_message();
  EXPECT_THAT(refused.status.error_message(), HasSubstr("overloaded"));
  EXPECT_TRUE(refused.responses.empty());
  EXPECT_EQ(s->server->engine()->Stats().requests_overloaded, 1);
  gate->Set(false);
  EXPECT_EQ(a.Cancel(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
  const EngineStats stats = s->server->engine()->Stats();
  EXPECT_EQ(stats.requests_submitted, 1 + 3);
  ASSERT_TRUE(stats.finished_by_reason.contains(FinishReason::kCancelled));
  EXPECT_EQ(stats.finished_by_reason.at(FinishReason::kCancelled), 1 + 3);
  // The queue is free again: three completions fit (four need not: they may all be queued
  // before the engine thread admits one).
  request.set_n(3);
  const StreamResult ok = RunGenerate(*s->stub, request);
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.tokens.size(), 3u * 10u);
  ASSERT_TRUE(WaitFor([&] {
    absl::MutexLock lock(&seen->mu);
    return seen->finished.size() == 1 + 4 + 3;
  }));
  absl::MutexLock lock(&seen->mu);
  using Finished = std::pair<grpc::StatusCode, bool>;
  const Finished exhausted_in_engine(grpc::StatusCode::RESOURCE_EXHAUSTED, true);
  const Finished ok_in_engine(grpc::StatusCode::OK, true);
  EXPECT_THAT(seen->finished, ::testing::UnorderedElementsAre(
                                  Finished(grpc::StatusCode::CANCELLED, true), exhausted_in_engine,
                                  exhausted_in_engine, exhausted_in_engine,
                                  Finished(grpc::StatusCode::RESOURCE_EXHAUSTED, false),
                                  ok_in_engine, ok_in_engine, ok_in_engine));
}

// ---- Health, reflection, drain ----------------------------------------------------------------

TEST(ServerTest, HealthIsNotServingWhileLoadingThenServing) {
  auto s = TestServer::Start(TestOptions(), /*load=*/false);
  EXPECT_EQ(s->Health(), HealthStatus::NOT_SERVING);
  EXPECT_EQ(s->Health(kServiceName), HealthStatus::NOT_SERVING);
  const StreamResult early = RunGenerate(*s->stub, GreedyRequest({1, 2}, 2));
  EXPECT_EQ(early.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(early.status.error_message(), HasSubstr("loading"));
  ASSERT_TRUE(s->server->LoadModel().ok());
  EXPECT_EQ(s->Health(), HealthStatus::SERVING);
  EXPECT_EQ(s->Health(kServiceName), HealthStatus::SERVING);
  EXPECT_TRUE(RunGenerate(*s->stub, GreedyRequest({1, 2}, 2)).status.ok());
}

// Sends one ServerReflectionRequest (raw protobuf bytes) and returns the raw response.
std::string Reflect(const std::shared_ptr<grpc::Channel>& channel, const std::string& request) {
  grpc::ClientContext context;
  const grpc::internal::RpcMethod method(
      "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
      grpc::internal::RpcMethod::BIDI_STREAMING);
  std::unique_ptr<grpc::ClientReaderWriter<grpc::ByteBuffer, grpc::ByteBuffer>> stream(
      grpc::internal::ClientReaderWriterFactory<grpc::ByteBuffer, grpc::ByteBuffer>::Create(
          channel.get(), method, &context));
  grpc::Slice slice(request);
  grpc::ByteBuffer out(&slice, 1);
  EXPECT_TRUE(stream->Write(out));
  stream->WritesDone();
  grpc::ByteBuffer in;
  std::string response;
  if (stream->Read(&in)) {
    std::vector<grpc::Slice> slices;
    EXPECT_TRUE(in.Dump(&slices).ok());
    for (const grpc::Slice& s : slices) {
      response.append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  while (stream->Read(&in)) {
  }
  EXPECT_TRUE(stream->Finish().ok());
  return response;
}

// Length-delimited field `field` with `value`.
std::string Field(int field, const std::string& value) {
  std::string out;
  out.reserve(2 + value.size());
  out.push_back(static_cast<char>(field << 3 | 2));
  out.push_back(static_cast<char>(value.size()));  // < 128 here
  out.append(value);
  return out;
}

TEST(ServerTest, ReflectionListsAndDescribesTheService) {
  auto s = TestServer::Start(TestOptions());
  // ServerReflectionRequest.list_services (field 7) = "".
  google::protobuf::UnknownFieldSet response;
  ASSERT_TRUE(response.ParseFromString(Reflect(s->channel, Field(7, ""))));
  std::vector<std::string> services;
  for (int i = 0; i < response.field_count(); ++i) {
    if (response.field(i).number() != 6) continue;  // list_services_response
    google::protobuf::UnknownFieldSet list;
    ASSERT_TRUE(list.ParseFromString(response.field(i).length_delimited()));
    for (int j = 0; j < list.field_count(); ++j) {
      google::protobuf::UnknownFieldSet service;
      ASSERT_TRUE(service.ParseFromString(list.field(j).length_delimited()));
      services.push_back(service.field(0).length_delimited());
    }
  }
  EXPECT_THAT(services, ::testing::Contains("moe.serving.v1.Inference"));
  EXPECT_THAT(services, ::testing::Contains("grpc.health.v1.Health"));
  // file_containing_symbol (field 4): the descriptor that generic tools need.
  const std::string described = Reflect(s->channel, Field(4, "moe.serving.v1.Inference"));
  EXPECT_THAT(described, HasSubstr("moe/serving/v1/inference.proto"));
  EXPECT_THAT(described, HasSubstr("GenerateResponse"));
}

TEST(ServerTest, DrainFinishesInFlightAndRefusesNew) {
  auto s = TestServer::Start(TestOptions());
  grpc::ClientContext context;
  auto reader = s->stub->Generate(&context, GreedyRequest(Prompt(10, 5), 600));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  int64_t tokens = response.token_ids_size();
  std::thread drain([&] { s->server->Drain(); });
  ASSERT_TRUE(WaitFor([&] { return s->Health() == HealthStatus::NOT_SERVING; }));
  EXPECT_EQ(s->Health(kServiceName), HealthStatus::NOT_SERVING);
  const StreamResult refused = RunGenerate(*s->stub, GreedyRequest({1, 2}, 2));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("shutting down"));
  while (reader->Read(&response)) tokens += response.token_ids_size();
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 600);  // the in-flight request completed
  drain.join();
}

TEST(ServerTest, DrainTimeoutCancelsWhatIsLeft) {
  ServerOptions options = TestOptions();
  options.drain_timeout = absl::Milliseconds(200);
  auto s = TestServer::Start(options);
  grpc::ClientContext context;
  auto reader = s->stub->Generate(&context, GreedyRequest(Prompt(11, 5), 4000));
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  s->server->Drain();  // returns once the request was cancelled and the server stopped
  while (reader->Read(&response)) {
  }
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("drain timeout"));
  EXPECT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
}

TEST(ServerTest, DrainTimeoutCancelsEveryCompletion) {
  ServerOptions options = TestOptions();
  options.drain_timeout = absl::Milliseconds(200);
  auto s = TestServer::Start(options);
  v1::GenerateRequest request = GreedyRequest(Prompt(36, 5), 4000);
  request.set_n(3);
  grpc::ClientContext context;
  auto reader = s->stub->Generate(&context, request);
  v1::GenerateResponse response;
  ASSERT_TRUE(reader->Read(&response));
  s->server->Drain();
  while (reader->Read(&response)) {
  }
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("drain timeout"));
  EXPECT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
  EXPECT_EQ(s->server->engine()->Stats().requests_submitted, 3);
}

}  // namespace
}  // namespace moe::server::testing

namespace moe::server::testing {
namespace {

// Not a check: prints the wall time per token of one greedy stream through gRPC against the
// same request submitted straight to an Engine (same model, options and thread count).
// Run with --gtest_also_run_disabled_tests --gtest_filter=*Overhead*.
TEST(ServerBenchmark, DISABLED_GrpcOverheadPerToken) {
  constexpr int kTokens = 1000;
  constexpr int kRepeats = 5;
  const std::vector<int32_t> prompt = Prompt(12, 8);
  double engine_best = 1e9;
  double grpc_best = 1e9;
  {
    ServerOptions options = TestOptions();
    options.check_invariants = false;
    auto s = TestServer::Start(options);
    for (int r = 0; r < kRepeats; ++r) {
      const absl::Time start = absl::Now();
      const StreamResult result = RunGenerate(*s->stub, GreedyRequest(prompt, kTokens));
      grpc_best = std::min(grpc_best, absl::ToDoubleSeconds(absl::Now() - start));
      ASSERT_EQ(result.tokens.size(), static_cast<size_t>(kTokens));
    }
  }
  {
    EngineOptions options;
    options.runner.model_dir = DemoModelDir();
    options.runner.backend = "cpu";
    options.runner.num_threads = 1;
    options.runner.kv_cache_bytes = 16ll << 20;
    options.base_seed = 7;
    auto engine = Engine::Create(options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    for (int r = 0; r < kRepeats; ++r) {
      GenerateRequest request;
      request.prompt_token_ids = prompt;
      request.sampling.temperature = 0.0f;
      request.sampling.max_tokens = kTokens;
      request.sampling.ignore_eos = true;
      std::atomic<int> tokens{0};
      const absl::Time start = absl::Now();
      ASSERT_TRUE(
          (*engine)->Submit(request, [&](RequestEvent e) { tokens += e.tokens.size(); }).ok());
      (*engine)->WaitUntilIdle();
      engine_best = std::min(engine_best, absl::ToDoubleSeconds(absl::Now() - start));
      ASSERT_EQ(tokens.load(), kTokens);
    }
  }
  std::printf(
      "greedy %d tokens, best of %d: engine %.3f ms/token, gRPC stream %.3f ms/token, "
      "overhead %.1f us/token\n",
      kTokens, kRepeats, engine_best * 1e3 / kTokens, grpc_best * 1e3 / kTokens,
      (grpc_best - engine_best) * 1e6 / kTokens);
}

}  // namespace
}  // namespace moe::server::testing

namespace moe::server::testing {
namespace {

// The hooks the metrics component uses see every step, every step's routing, and each call
// once: with its status, and with the engine's final event when it entered the engine.
TEST(ServerTest, HooksSeeStepsRoutingAndEveryCall) {
  struct Seen {
    absl::Mutex mu;
    int64_t steps = 0;
    int64_t routed_tokens = 0;
    int64_t streamed_tokens = 0;
    std::vector<std::pair<grpc::StatusCode, bool>> finished;  // code, had a final event
    int64_t final_generated = 0;
  };
  auto seen = std::make_shared<Seen>();
  class Observer : public RequestObserver {
   public:
    explicit Observer(std::shared_ptr<Seen> seen) : seen_(std::move(seen)) {}
    void OnTokens(int32_t count, absl::Time) override {
      absl::MutexLock lock(&seen_->mu);
      seen_->streamed_tokens += count;
    }
    void OnFinished(const RequestEvent* event, grpc::StatusCode code, absl::Time) override {
      absl::MutexLock lock(&seen_->mu);
      seen_->finished.emplace_back(code, event != nullptr);
      if (event != nullptr) seen_->final_generated += event->num_generated_tokens;
    }

   private:
    std::shared_ptr<Seen> seen_;
  };
  ServerOptions options = TestOptions();
  options.make_hooks = [seen](const LoadedModel& model) {
    EXPECT_EQ(model.config->num_experts, 8);
    EXPECT_GT(model.parameters->total, 0);
    EXPECT_NE(model.expert_stats, nullptr);
    ServerHooks hooks;
    hooks.on_step = [seen](const EngineStepInfo&) {
      absl::MutexLock lock(&seen->mu);
      ++seen->steps;
    };
    hooks.on_routing = [seen](const ForwardBatch& batch, const StepRouting&) {
      absl::MutexLock lock(&seen->mu);
      seen->routed_tokens += batch.num_tokens();
    };
    hooks.on_request = [seen](absl::Time) { return std::make_unique<Observer>(seen); };
    return hooks;
  };
  auto s = TestServer::Start(options);
  ASSERT_TRUE(RunGenerate(*s->stub, GreedyRequest(Prompt(20, 6), 10)).status.ok());
  v1::GenerateRequest invalid = GreedyRequest({1}, 1);
  invalid.set_logprobs(99);
  EXPECT_EQ(RunGenerate(*s->stub, invalid).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  {
    grpc::ClientContext context;
    auto reader = s->stub->Generate(&context, GreedyRequest(Prompt(21, 6), 4000));
    v1::GenerateResponse response;
    ASSERT_TRUE(reader->Read(&response));
    context.TryCancel();
    while (reader->Read(&response)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  ASSERT_TRUE(WaitFor([&] {
    absl::MutexLock lock(&seen->mu);
    return seen->finished.size() == 3;
  }));
  ASSERT_TRUE(WaitFor([&] { return EngineIdle(*s->server->engine()); }));
  const EngineStats stats = s->server->engine()->Stats();
  absl::MutexLock lock(&seen->mu);
  EXPECT_EQ(seen->steps, stats.steps);
  EXPECT_EQ(seen->routed_tokens, stats.scheduled_tokens);
  EXPECT_EQ(seen->streamed_tokens, stats.generated_tokens);
  EXPECT_EQ(seen->final_generated, stats.generated_tokens);
  EXPECT_THAT(seen->finished, ::testing::UnorderedElementsAre(
                                  std::make_pair(grpc::StatusCode::OK, true),
                                  std::make_pair(grpc::StatusCode::INVALID_ARGUMENT, false),
                                  std::make_pair(grpc::StatusCode::CANCELLED, true)));
}

}  // namespace
}  // namespace moe::server::testing
