// moe-bench: load generator for moe-serve.
//
//   moe-bench --target=localhost:50051 --concurrency=8 --num_requests=200
//   moe-bench --rate=4 --num_requests=200 --prompt_tokens=64:512 --output_tokens=32:256 --json
//
// Closed loop (--concurrency=N: N streams, each sends its next request when the previous one
// ends) or open loop (--rate=R: Poisson arrivals, R requests/s on average). Prompts are random
// token ids (no tokenizer needed) with lengths drawn uniformly from --prompt_tokens=MIN[:MAX];
// outputs run to exactly --output_tokens=MIN[:MAX] tokens (ignore_eos). The first --warmup
// requests are sent but not counted.
//
// Reports per request: TTFT (send -> first token), inter-token latency (gap between responses
// carrying tokens, divided among the tokens of a coalesced response), TPOT ((e2e - TTFT) /
// (tokens - 1)) and end-to-end latency, as mean/p50/p90/p99; request and token throughput;
// errors by gRPC status code.
//
// --tls_ca (TLS), --tls_cert/--tls_key (mutual TLS) and --auth_token reach a secured server, as
// with moe-client.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "client/connection.h"
#include "engine/common/program_usage.h"
#include "grpcpp/grpcpp.h"
#include "moe/serving/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, target, "localhost:50051", "Server address");
ABSL_FLAG(int32_t, concurrency, 1, "Closed loop: concurrent streams (ignored with --rate)");
ABSL_FLAG(double, rate, 0, "Open loop: Poisson arrival rate, requests/s (0 = closed loop)");
ABSL_FLAG(int32_t, num_requests, 100, "Measured requests");
ABSL_FLAG(int32_t, warmup, 4, "Warm-up requests before measuring (not counted)");
ABSL_FLAG(std::string, prompt_tokens, "32", "Prompt length MIN[:MAX] (uniform)");
ABSL_FLAG(std::string, output_tokens, "64", "Output length MIN[:MAX] (uniform)");
ABSL_FLAG(double, temperature, 0.0, "Sampling temperature (0 = greedy)");
ABSL_FLAG(uint64_t, seed, 1, "Random seed of the workload");
ABSL_FLAG(double, timeout, 600, "Per-request deadline, seconds");
ABSL_FLAG(bool, json, false, "Print the report as one JSON object");

namespace {

namespace v1 = ::moe::serving::v1;
using Clock = std::chrono::steady_clock;

struct Range {
  int32_t min = 0;
  int32_t max = 0;
};

bool ParseRange(const std::string& text, Range* range) {
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  if (parts.empty() || parts.size() > 2 || !absl::SimpleAtoi(parts[0], &range->min)) return false;
  range->max = range->min;
  if (parts.size() == 2 && !absl::SimpleAtoi(parts[1], &range->max)) return false;
  return range->min >= 1 && range->max >= range->min;
}

struct Sample {
  bool ok = false;
  int code = 0;
  double ttft = 0, e2e = 0, tpot = 0;
  int32_t prompt_tokens = 0, output_tokens = 0;
  std::vector<double> itl;
};

Sample RunOne(v1::Inference::Stub& stub, const v1::GenerateRequest& request) {
  Sample sample;
  sample.prompt_tokens = request.token_ids().ids_size();
  grpc::ClientContext context;
  moe::client::AddAuthToken(context);
  context.set_deadline(
      std::chrono::system_clock::now() +
      std::chrono::milliseconds(static_cast<int64_t>(absl::GetFlag(FLAGS_timeout) * 1e3)));
  const Clock::time_point start = Clock::now();
  Clock::time_point last = start;
  auto reader = stub.Generate(&context, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    const int n = response.token_ids_size();
    if (n == 0) continue;
    const Clock::time_point now = Clock::now();
    const double gap = std::chrono::duration<double>(now - last).count();
    if (sample.output_tokens == 0) {
      sample.ttft = gap;
      for (int i = 1; i < n; ++i) sample.itl.push_back(0.0);
    } else {
      for (int i = 0; i < n; ++i) sample.itl.push_back(gap / n);
    }
    sample.output_tokens += n;
    last = now;
  }
  const grpc::Status status = reader->Finish();
  sample.e2e = std::chrono::duration<double>(Clock::now() - start).count();
  sample.ok = status.ok();
  sample.code = static_cast<int>(status.error_code());
  if (sample.output_tokens > 1) {
    sample.tpot = (sample.e2e - sample.ttft) / (sample.output_tokens - 1);
  }
  return sample;
}

nlohmann::json Summary(std::vector<double> values) {
  if (values.empty()) return {{"n", 0}};
  std::sort(values.begin(), values.end());
  auto pct = [&](double p) {
    const double at = p / 100.0 * (values.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(at));
    const size_t hi = std::min(values.size() - 1, lo + 1);
    return values[lo] + (values[hi] - values[lo]) * (at - lo);
  };
  double sum = 0;
  for (double v : values) sum += v;
  return {{"n", values.size()}, {"mean", sum / values.size()}, {"p50", pct(50)}, {"p90", pct(90)},
          {"p99", pct(99)},     {"max", values.back()}};
}

}  // namespace

int main(int argc, char** argv) {
  moe::SetProgramUsage(
      {"client/moe_bench.cc", "client/connection.cc"},
      "load generator for moe-serve: TTFT, inter-token latency, TPOT, end-to-end latency "
      "percentiles, throughput, errors by status code");
  absl::ParseCommandLine(argc, argv);
  Range prompt_range, output_range;
  if (!ParseRange(absl::GetFlag(FLAGS_prompt_tokens), &prompt_range) ||
      !ParseRange(absl::GetFlag(FLAGS_output_tokens), &output_range)) {
    std::fprintf(stderr, "moe-bench: --prompt_tokens/--output_tokens take MIN[:MAX], MIN >= 1\n");
    return 2;
  }
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(64 << 20);
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      moe::client::ChannelCredentials("moe-bench");
  if (credentials == nullptr) return 2;
  auto channel = grpc::CreateCustomChannel(absl::GetFlag(FLAGS_target), credentials, channel_args);
  auto stub = v1::Inference::NewStub(channel);
  v1::ModelInfo info;
  {
    grpc::ClientContext context;
    moe::client::AddAuthToken(context);
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    const grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
    if (!status.ok()) {
      std::fprintf(stderr, "moe-bench: GetModelInfo: %s\n", status.error_message().c_str());
      return 1;
    }
  }

  // The workload, fixed up front from the seed.
  const int32_t warmup = std::max(0, absl::GetFlag(FLAGS_warmup));
  const int32_t total = warmup + std::max(1, absl::GetFlag(FLAGS_num_requests));
  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  const int32_t low_id = std::min(100, info.vocab_size() - 1);
  std::uniform_int_distribution<int32_t> token(low_id, info.vocab_size() - 1);
  std::vector<v1::GenerateRequest> requests(total);
  for (int32_t i = 0; i < total; ++i) {
    v1::GenerateRequest& r = requests[i];
    const int32_t p =
        std::uniform_int_distribution<int32_t>(prompt_range.min, prompt_range.max)(rng);
    const int32_t o =
        std::uniform_int_distribution<int32_t>(output_range.min, output_range.max)(rng);
    for (int32_t k = 0; k < p; ++k) r.mutable_token_ids()->add_ids(token(rng));
    r.mutable_sampling()->set_temperature(static_cast<float>(absl::GetFlag(FLAGS_temperature)));
    r.mutable_sampling()->set_seed(rng());
    r.mutable_stop()->set_max_tokens(o);
    r.mutable_stop()->set_ignore_eos(true);
    r.set_request_id("bench-" + std::to_string(i));
  }

  for (int32_t i = 0; i < warmup; ++i) RunOne(*stub, requests[i]);

  std::vector<Sample> samples(total - warmup);
  const double rate = absl::GetFlag(FLAGS_rate);
  const Clock::time_point start = Clock::now();
  if (rate > 0) {
    std::exponential_distribution<double> gap(rate);
    std::vector<std::thread> threads;
    Clock::time_point next = Clock::now();
    for (int32_t i = warmup; i < total; ++i) {
      std::this_thread::sleep_until(next);
      threads.emplace_back([&, i] { samples[i - warmup] = RunOne(*stub, requests[i]); });
      next += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
    }
    for (std::thread& t : threads) t.join();
  } else {
    std::atomic<int32_t> next{warmup};
    std::vector<std::thread> threads;
    for (int32_t w = 0; w < std::max(1, absl::GetFlag(FLAGS_concurrency)); ++w) {
      threads.emplace_back([&] {
        for (int32_t i = next++; i < total; i = next++) {
          samples[i - warmup] = RunOne(*stub, requests[i]);
        }
      });
    }
    for (std::thread& t : threads) t.join();
  }
  const double duration = std::chrono::duration<double>(Clock::now() - start).count();

  std::vector<double> ttft, itl, tpot, e2e;
  std::map<std::string, int> errors;
  int64_t ok = 0, prompt_tokens = 0, output_tokens = 0;
  for (const Sample& s : samples) {
    output_tokens += s.output_tokens;
    if (!s.ok) {
      ++errors[std::to_string(s.code)];
      continue;
    }
    ++ok;
    prompt_tokens += s.prompt_tokens;
    ttft.push_back(s.ttft);
    e2e.push_back(s.e2e);
    if (s.output_tokens > 1) tpot.push_back(s.tpot);
    itl.insert(itl.end(), s.itl.begin(), s.itl.end());
  }
  nlohmann::json report = {
      {"target", absl::GetFlag(FLAGS_target)},
      {"model", info.model_path()},
      {"backend", info.device()},
      {"mode", rate > 0 ? "poisson" : "closed_loop"},
      {"rate", rate},
      {"concurrency", rate > 0 ? 0 : absl::GetFlag(FLAGS_concurrency)},
      {"requests", samples.size()},
      {"succeeded", ok},
      {"errors_by_code", errors},
      {"duration_s", duration},
      {"request_throughput", ok / duration},
      {"output_token_throughput", output_tokens / duration},
      {"total_token_throughput", (prompt_tokens + output_tokens) / duration},
      {"ttft_s", Summary(ttft)},
      {"itl_s", Summary(itl)},
      {"tpot_s", Summary(tpot)},
      {"e2e_s", Summary(e2e)},
  };
  if (absl::GetFlag(FLAGS_json)) {
    std::printf("%s\n", report.dump(2).c_str());
    return errors.empty() ? 0 : 1;
  }
  std::printf(
      "%s, %zu requests (%lld ok) in %.2f s: %.2f req/s, %.1f output tok/s, %.1f total "
      "tok/s\n",
      rate > 0 ? ("Poisson " + std::to_string(rate) + " req/s").c_str()
               : ("concurrency " + std::to_string(absl::GetFlag(FLAGS_concurrency))).c_str(),
      samples.size(), static_cast<long long>(ok), duration, ok / duration, output_tokens / duration,
      (prompt_tokens + output_tokens) / duration);
  std::printf("%-6s %10s %10s %10s %10s   (ms)\n", "", "mean", "p50", "p90", "p99");
  for (const auto& [name, key] : std::vector<std::pair<const char*, const char*>>{
           {"TTFT", "ttft_s"}, {"ITL", "itl_s"}, {"TPOT", "tpot_s"}, {"E2E", "e2e_s"}}) {
    const nlohmann::json& s = report[key];
    if (s["n"] == 0) continue;
    std::printf("%-6s %10.2f %10.2f %10.2f %10.2f\n", name, s["mean"].get<double>() * 1e3,
                s["p50"].get<double>() * 1e3, s["p90"].get<double>() * 1e3,
                s["p99"].get<double>() * 1e3);
  }
  for (const auto& [code, count] : errors) {
    std::printf("errors: status code %s x %d\n", code.c_str(), count);
  }
  return errors.empty() ? 0 : 1;
}
