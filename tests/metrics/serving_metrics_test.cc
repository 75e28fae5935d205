// /metrics is exact: routed-token counters equal processed tokens x top_k per MoE layer, the
// per-expert matrix equals the routing the engine reports per token, parameter gauges equal an
// independent count over the checkpoint, request counters equal the workload; and the HTTP
// endpoint serves it (on a port picked by the kernel).
#include "server/metrics/serving_metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/model/loaded_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/expert_stats.h"
#include "server/metrics/metrics_http_server.h"
#include "tests/engine/engine_test_util.h"

namespace moe::server {
namespace {

using moe::testing::Collector;
using moe::testing::OptionsFor;

// The value of the series `name{labels}` (labels as rendered, e.g. layer="1"), or -1.
double Sample(const std::string& text, const std::string& name, const std::string& labels) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (!absl::StartsWith(line, name + "{")) continue;
    const size_t close = line.find('}');
    const std::string label_text = line.substr(name.size() + 1, close - name.size() - 1);
    bool all = true;
    for (absl::string_view wanted : absl::StrSplit(labels, ',', absl::SkipEmpty())) {
      if (!absl::StrContains(label_text, wanted)) all = false;
    }
    if (all) return std::stod(line.substr(close + 2));
  }
  return -1;
}

ModelDescription Describe(const std::string& model) {
  auto loaded = LoadModel(moe::testing::ModelDir(model));
  EXPECT_TRUE(loaded.ok()) << loaded.status();
  return {model, (*loaded)->config, (*loaded)->weights.parameters, "bf16", "cpu", "bf16", 4096};
}

class ServingMetricsTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ServingMetricsTest, CountsEqualTheEngineRouting) {
  const std::string model = GetParam();
  const ModelDescription description = Describe(model);
  const ModelConfig& config = description.config;
  ExpertStatsAccumulator stats(config.num_moe_layers(), config.num_experts, config.top_k, 1000);
  ServingMetrics metrics(description, &stats, ExpertMetrics::kFull);

  EngineOptions options = OptionsFor(model, 64);
  int64_t processed_tokens = 0;
  options.routing_observer = [&](const ForwardBatch& batch, const StepRouting& routing) {
    processed_tokens += batch.num_tokens();
    stats.Record(batch, routing);
    metrics.OnRouting(batch, routing);
  };
  options.step_observer = [&](const EngineStepInfo& info) { metrics.OnStep(info); };
  auto engine = Engine::Create(options);
  ASSERT_TRUE(engine.ok()) << engine.status();

  // 6 requests of mixed lengths, each asking for its per-token routing.
  Collector collector;
  std::mt19937_64 rng(7);
  std::vector<ServingMetrics::RequestTimer> timers;
  int64_t expected_prompt = 0;
  for (int r = 0; r < 6; ++r) {
    GenerateRequest request;
    const int length = 3 + 5 * r;
    for (int i = 0; i < length; ++i) {
      request.prompt_token_ids.push_back(static_cast<int32_t>(rng() % config.vocab_size));
    }
    expected_prompt += length;
    request.sampling.max_tokens = 4 + r;
    request.sampling.ignore_eos = true;
    request.return_routing = true;
    timers.emplace_back(&metrics, absl::Now());
    ASSERT_TRUE((*engine)->Submit(request, collector.Sink(r)).ok());
  }
  (*engine)->WaitUntilIdle();

  // Per-expert counts from the routing the engine reported to each request.
  std::map<std::pair<int, int>, int64_t> reported;  // (MoE layer index, expert) -> tokens
  int64_t expected_generated = 0;
  for (int r = 0; r < 6; ++r) {
    const Collector::Result result = collector.Get(r);
    ASSERT_EQ(result.final_event.finish_reason, FinishReason::kLength);
    expected_generated += result.tokens.size();
    for (const TokenRouting& token : result.routing) {
      for (size_t j = 0; j < token.expert_ids.size(); ++j) {
        ++reported[{static_cast<int>(j / config.top_k), token.expert_ids[j]}];
      }
    }
    timers[r].OnTokens(static_cast<int32_t>(result.tokens.size()), absl::Now());
    timers[r].OnFinished(result.final_event, "OK", absl::Now());
  }
  metrics.OnRejected("INVALID_ARGUMENT");

  const std::string text = metrics.Render();
  int moe_index = 0;
  for (int layer = 0; layer < config.num_layers; ++layer) {
    if (!config.layer_is_moe[layer]) continue;
    const std::string layer_label = absl::StrCat("layer=\"", layer, "\"");
    EXPECT_EQ(Sample(text, "moeserve_moe_routed_tokens_total", layer_label),
              static_cast<double>(processed_tokens * config.top_k))
        << layer_label;
    double dead = 0;
    for (int expert = 0; expert < config.num_experts; ++expert) {
      const double count = Sample(text, "moeserve_moe_expert_routed_tokens_total",
                                  absl::StrCat(layer_label, ",expert=\"", expert, "\""));
      EXPECT_EQ(count, static_cast<double>((reported[{moe_index, expert}])))
          << layer_label << " expert " << expert;
      if (count == 0) ++dead;
    }
    EXPECT_EQ(Sample(text, "moeserve_moe_layer_dead_experts", layer_label), dead);
    EXPECT_GE(Sample(text, "moeserve_moe_layer_max_load_ratio", layer_label), 1.0);
    const double entropy = Sample(text, "moeserve_moe_layer_routing_entropy_ratio", layer_label);
    EXPECT_GT(entropy, 0.0);
    EXPECT_LE(entropy, 1.0);
    EXPECT_GT(Sample(text, "moeserve_moe_layer_switch_balance", layer_label), 0.0);
    EXPECT_GT(Sample(text, "moeserve_moe_layer_router_z", layer_label), 0.0);
    EXPECT_GE(Sample(text, "moeserve_moe_hot_expert", layer_label + ",rank=\"1\""), 0.0);
    ++moe_index;
  }
  // Every processed token was counted in some request's routing.
  int64_t reported_total = 0;
  for (const auto& [key, count] : reported) reported_total += count;
  EXPECT_EQ(reported_total, processed_tokens * config.top_k * config.num_moe_layers());

  EXPECT_EQ(Sample(text, "moeserve_prompt_tokens_total", ""), static_cast<double>(expected_prompt));
  EXPECT_EQ(Sample(text, "moeserve_generation_tokens_total", ""),
            static_cast<double>(expected_generated));
  EXPECT_EQ(Sample(text, "moeserve_requests_total", "finished_reason=\"length\",code=\"OK\""), 6);
  EXPECT_EQ(Sample(text, "moeserve_requests_total",
                   "finished_reason=\"rejected\",code=\"INVALID_ARGUMENT\""),
            1);
  EXPECT_EQ(Sample(text, "moeserve_time_to_first_token_seconds_count", ""), 6);
  EXPECT_EQ(Sample(text, "moeserve_e2e_request_latency_seconds_count", ""), 6);
  EXPECT_EQ(Sample(text, "moeserve_kv_cache_usage_ratio", ""), 0);  // all finished
  EXPECT_EQ(Sample(text, "moeserve_num_requests_running", ""), 0);
}

// Parameter gauges equal a count over the checkpoint's tensors made here, by name.
TEST_P(ServingMetricsTest, ParameterGaugesEqualIndependentCount) {
  const std::string model = GetParam();
  auto loaded = LoadModel(moe::testing::ModelDir(model));
  ASSERT_TRUE(loaded.ok());
  int64_t total = 0, routed = 0, shared = 0;
  for (const auto& [name, view] : (*loaded)->tensors.tensors()) {
    total += view->num_elements();
    if (absl::StrContains(name, ".experts.")) routed += view->num_elements();
    if (absl::StrContains(name, "shared_expert")) shared += view->num_elements();
  }
  const ModelConfig& config = (*loaded)->config;
  const int64_t active = total - routed + routed / config.num_experts * config.top_k;
  ServingMetrics metrics(Describe(model), nullptr, ExpertMetrics::kDefault);
  const std::string text = metrics.Render();
  EXPECT_EQ(Sample(text, "moeserve_model_parameters", "kind=\"total\""), total);
  EXPECT_EQ(Sample(text, "moeserve_model_parameters", "kind=\"routed_expert\""), routed);
  EXPECT_EQ(Sample(text, "moeserve_model_parameters", "kind=\"shared_expert\""), shared);
  EXPECT_EQ(Sample(text, "moeserve_model_parameters", "kind=\"non_expert\""),
            total - routed - shared);
  EXPECT_EQ(Sample(text, "moeserve_model_parameters", "kind=\"active_per_token\""), active);
  EXPECT_EQ(Sample(text, "moeserve_model_info",
                   absl::StrCat("moe_layers=\"", config.num_moe_layers(), "\",top_k=\"",
                                config.top_k, "\"")),
            1);
  EXPECT_EQ(Sample(text, "moeserve_model_info", "kv_cache_dtype=\"bf16\""), 1);
  EXPECT_EQ(Sample(text, "moeserve_kv_cache_capacity_tokens", ""), 4096);
  // The full matrix is opt-in.
  EXPECT_FALSE(absl::StrContains(text, "moeserve_moe_expert_routed_tokens_total"));
}

// Prometheus' own linter accepts the exposition (names, units, suffixes, help texts).
TEST_P(ServingMetricsTest, PromtoolAcceptsTheExposition) {
  if (::access("/usr/bin/promtool", X_OK) != 0) GTEST_SKIP() << "promtool not installed";
  const ModelDescription description = Describe(GetParam());
  ExpertStatsAccumulator stats(description.config.num_moe_layers(), description.config.num_experts,
                               description.config.top_k, 1000);
  ServingMetrics metrics(description, &stats, ExpertMetrics::kFull);
  const std::string path = ::testing::TempDir() + "/metrics_" + GetParam() + ".txt";
  {
    std::ofstream file(path);
    file << metrics.Render();
  }
  const std::string command = "/usr/bin/promtool check metrics < " + path + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  std::string output;
  char buffer[512];
  while (::fgets(buffer, sizeof(buffer), pipe) != nullptr) output += buffer;
  EXPECT_EQ(::pclose(pipe), 0) << output;
  EXPECT_EQ(output, "");
}

INSTANTIATE_TEST_SUITE_P(Models, ServingMetricsTest,
                         ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"));

std::string HttpGet(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    ::close(fd);
    return "";
  }
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
  ::send(fd, request.data(), request.size(), 0);
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = ::recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, n);
  ::close(fd);
  return response;
}

TEST(MetricsHttpServerTest, ServesMetricsOnAKernelPickedPort) {
  auto server =
      MetricsHttpServer::Start("127.0.0.1", 0, [] { return std::string("a_metric 1\n"); });
  ASSERT_TRUE(server.ok()) << server.status();
  ASSERT_GT((*server)->port(), 0);
  const std::string metrics = HttpGet((*server)->port(), "/metrics");
  EXPECT_THAT(metrics, ::testing::StartsWith("HTTP/1.1 200 OK"));
  EXPECT_THAT(metrics, ::testing::HasSubstr("text/plain; version=0.0.4"));
  EXPECT_THAT(metrics, ::testing::EndsWith("\r\n\r\na_metric 1\n"));
  EXPECT_THAT(HttpGet((*server)->port(), "/other"), ::testing::StartsWith("HTTP/1.1 404"));
  EXPECT_EQ((*server)->scrapes(), 1);
}

TEST(MetricsHttpServerTest, PortInUseIsAClearError) {
  auto first = MetricsHttpServer::Start("127.0.0.1", 0, [] { return std::string(); });
  ASSERT_TRUE(first.ok());
  auto second =
      MetricsHttpServer::Start("127.0.0.1", (*first)->port(), [] { return std::string(); });
  ASSERT_FALSE(second.ok());
  EXPECT_THAT(second.status().message(), ::testing::HasSubstr("cannot listen for metrics"));
}

}  // namespace
}  // namespace moe::server
