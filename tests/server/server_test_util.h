// Helpers for the server tests: the demo model (written once per test binary with the
// project's synthetic-model writer and a fixture tokenizer), an in-process MoeServer on a free
// loopback port, stubs, and an offline greedy oracle that runs the ModelRunner directly
// (no scheduler, no engine, no server).
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/model/synthetic_model.h"
#include "engine/ops/model_runner.h"
#include "engine/ops/offline_batch.h"
#include "engine/tokenizer/tokenizer.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "moe/serving/v1/inference.grpc.pb.h"
#include "server/server.h"

namespace moe::server::testing {

namespace v1 = ::moe::serving::v1;

inline std::string TokenizerFixture() {
  return std::string(MOE_SOURCE_DIR) + "/tests/fixtures/tokenizers/gpt2_bytelevel/tokenizer.json";
}

// The demo model (moe-make-model --preset=demo with the gpt2_bytelevel fixture tokenizer),
// written once per process into a temporary directory.
inline const std::string& DemoModelDir() {
  static const std::string dir = [] {
    const std::string out =
        (std::filesystem::temp_directory_path() / absl::StrCat("moe_server_test_demo_", ::getpid()))
            .string();
    auto tokenizer = Tokenizer::FromFile(TokenizerFixture());
    EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
    absl::StatusOr<SyntheticModelSpec> spec = SyntheticPreset("demo");
    EXPECT_TRUE(spec.ok()) << spec.status();
    spec->vocab_size = (*tokenizer)->vocab_size();
    const absl::Status status = WriteSyntheticModel(*spec, out);
    EXPECT_TRUE(status.ok()) << status;
    std::filesystem::copy_file(TokenizerFixture(), std::filesystem::path(out) / "tokenizer.json",
                               std::filesystem::copy_options::overwrite_existing);
    return out;
  }();
  return dir;
}

inline void RemoveDemoModel() {
  std::error_code error;
  std::filesystem::remove_all(DemoModelDir(), error);
}

inline ServerOptions TestOptions() {
  ServerOptions options;
  options.model_dir = DemoModelDir();
  options.host = "127.0.0.1";
  options.port = 0;
  options.backend = "cpu";
  options.num_threads = 1;
  options.kv_cache_bytes = 16ll << 20;
  options.base_seed = 7;
  options.check_invariants = true;
  options.log_requests = false;
  options.drain_timeout = absl::Seconds(60);
  return options;
}

// An in-process server with stubs.
struct TestServer {
  std::unique_ptr<MoeServer> server;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::Inference::Stub> stub;
  std::unique_ptr<grpc::health::v1::Health::Stub> health;

  static std::unique_ptr<TestServer> Start(const ServerOptions& options, bool load = true) {
    auto s = std::make_unique<TestServer>();
    absl::StatusOr<std::unique_ptr<MoeServer>> server = MoeServer::Start(options);
    EXPECT_TRUE(server.ok()) << server.status();
    if (!server.ok()) return nullptr;
    s->server = *std::move(server);
    s->channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", s->server->port()),
                                     grpc::InsecureChannelCredentials());
    s->stub = v1::Inference::NewStub(s->channel);
    s->health = grpc::health::v1::Health::NewStub(s->channel);
    if (load) {
      const absl::Status status = s->server->LoadModel();
      EXPECT_TRUE(status.ok()) << status;
    }
    return s;
  }

  // grpc.health.v1 Check for `service` ("" = the server).
  grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& service = "") {
    grpc::ClientContext context;
    grpc::health::v1::HealthCheckRequest request;
    request.set_service(service);
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status status = health->Check(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response.status();
  }
};

// Everything a Generate call returned.
struct StreamResult {
  grpc::Status status;
  std::vector<v1::GenerateResponse> responses;
  std::vector<int32_t> tokens;
  std::string text;
  v1::GenerateResponse last;
};

inline StreamResult RunGenerate(v1::Inference::Stub& stub, const v1::GenerateRequest& request,
                                absl::Duration timeout = absl::ZeroDuration()) {
  StreamResult result;
  grpc::ClientContext context;
  if (timeout > absl::ZeroDuration()) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
  auto reader = stub.Generate(&context, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    result.tokens.insert(result.tokens.end(), response.token_ids().begin(),
                         response.token_ids().end());
    result.text += response.text();
    result.responses.push_back(response);
  }
  result.status = reader->Finish();
  if (!result.responses.empty()) result.last = result.responses.back();
  return result;
}

inline v1::GenerateRequest GreedyRequest(const std::vector<int32_t>& prompt, int32_t max_tokens) {
  v1::GenerateRequest request;
  for (int32_t id : prompt) request.mutable_token_ids()->add_ids(id);
  request.mutable_sampling()->set_temperature(0.0f);
  request.mutable_stop()->set_max_tokens(max_tokens);
  request.mutable_stop()->set_ignore_eos(true);
  return request;
}

// Greedy decoding straight through the ModelRunner: the oracle for the served output.
class OfflineGreedy {
 public:
  OfflineGreedy() {
    ModelRunnerOptions options;
    options.model_dir = DemoModelDir();
    options.backend = "cpu";
    options.num_threads = 1;
    options.kv_cache_bytes = 16ll << 20;
    auto runner = ModelRunner::Create(options);
    EXPECT_TRUE(runner.ok()) << runner.status();
    runner_ = *std::move(runner);
  }

  std::vector<int32_t> Generate(const std::vector<int32_t>& prompt, int32_t max_tokens) {
    OfflineBatcher batcher(runner_->block_size(), runner_->num_blocks());
    absl::StatusOr<int32_t> seq =
        batcher.AddSequence(static_cast<int32_t>(prompt.size()) + max_tokens);
    EXPECT_TRUE(seq.ok()) << seq.status();
    std::vector<int32_t> out;
    std::vector<int32_t> next = prompt;
    const int32_t vocab = runner_->config().vocab_size;
    while (static_cast<int32_t>(out.size()) < max_tokens) {
      ForwardBatch batch;
      EXPECT_TRUE(batcher.Append(batch, *seq, next, /*want_logits=*/true).ok());
      absl::StatusOr<ForwardOutput> output = runner_->Forward(batch);
      EXPECT_TRUE(output.ok()) << output.status();
      if (!output.ok()) break;
      const int32_t token = ArgMax(std::span<const float>(output->logits.data(), vocab));
      out.push_back(token);
      next = {token};
    }
    return out;
  }

  ModelRunner& runner() { return *runner_; }

 private:
  std::unique_ptr<ModelRunner> runner_;
};

// Polls `done` every 10 ms for at most `limit` (a bound for a hung test, not a timing check).
template <typename Fn>
bool WaitFor(Fn done, absl::Duration limit = absl::Seconds(30)) {
  const absl::Time end = absl::Now() + limit;
  while (!done()) {
    if (absl::Now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

}  // namespace moe::server::testing
