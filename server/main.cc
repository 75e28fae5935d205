// moe-serve: the gRPC inference server. See --help; every flag can also be set through the
// environment variable MOE_<FLAG NAME IN UPPER CASE> (the command line wins).
#include <pthread.h>
#include <signal.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "engine/common/program_usage.h"
#include "server/metrics/metrics_service.h"
#include "server/server.h"

ABSL_FLAG(std::string, model, "",
          "Model directory (config.json, *.safetensors, optional tokenizer.json). Default: the "
          "built-in demo model at <moe-serve's directory>/../demo_model, which "
          "scripts/serve_demo.sh creates with moe-make-model. Env: MOE_MODEL.");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on. Env: MOE_HOST.");
ABSL_FLAG(int32_t, port, 50051, "gRPC port (0 = any free port). Env: MOE_PORT.");
ABSL_FLAG(int32_t, metrics_port, 9400,
          "Prometheus /metrics port on --host (0 = any free port, -1 = off). "
          "Env: MOE_METRICS_PORT.");
ABSL_FLAG(std::string, metrics_host, "",
          "Address of the /metrics port (default: --host), e.g. an internal interface while "
          "--host faces clients. Env: MOE_METRICS_HOST.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the gRPC port; with --tls_key, the port speaks TLS only. "
          "Env: MOE_TLS_CERT.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert. Env: MOE_TLS_KEY.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS). "
          "Needs --tls_cert and --tls_key. Env: MOE_TLS_CLIENT_CA.");
ABSL_FLAG(std::string, auth_tokens_file, "",
          "File of bearer tokens, one per line ('#' comments): when set (or when the "
          "environment variable MOE_AUTH_TOKENS holds comma-separated tokens), every "
          "moe.serving.v1.Inference call needs `authorization: Bearer <token>` metadata, else "
          "UNAUTHENTICATED. grpc.health.v1 and server reflection stay open. "
          "Env: MOE_AUTH_TOKENS_FILE.");
ABSL_FLAG(std::string, model_name, "",
          "The `model` label of every metric (default: the model directory's name). "
          "Env: MOE_MODEL_NAME.");
ABSL_FLAG(std::string, expert_metrics, "default",
          "MoE metrics: default (per layer) or full (adds the per-layer, per-expert counter "
          "matrix). Env: MOE_EXPERT_METRICS.");
ABSL_FLAG(std::string, backend, "auto",
          "Compute backend: auto (CUDA when a GPU is present, else CPU), cpu or cuda. "
          "Env: MOE_BACKEND.");
ABSL_FLAG(int32_t, num_threads, 0, "CPU backend threads (0 = all cores). Env: MOE_NUM_THREADS.");
ABSL_FLAG(bool, cpu_bf16_activations, false,
          "CPU backend: round activations to bf16 and use AVX512-BF16 dot products (faster "
          "prefill and batched decode, ~1e-2 relative logit error; needs --backend=cpu).");
ABSL_FLAG(int64_t, kv_cache_mib, 256,
          "Memory budget of the paged KV cache, MiB. Env: MOE_KV_CACHE_MIB.");
ABSL_FLAG(std::string, kv_cache_dtype, "f32",
          "What the KV cache stores: f32 (exact) or bf16 (twice the tokens in the same "
          "--kv_cache_mib and half the bytes attention reads; K/V rounded to bf16). "
          "Env: MOE_KV_CACHE_DTYPE.");
ABSL_FLAG(int32_t, kv_block_size, 16, "Tokens per KV cache block. Env: MOE_KV_BLOCK_SIZE.");
ABSL_FLAG(int32_t, max_num_seqs, 64,
          "Batching: sequences running at once at most. Env: MOE_MAX_NUM_SEQS.");
ABSL_FLAG(int32_t, max_num_batched_tokens, 512,
          "Batching: tokens per engine step at most. Env: MOE_MAX_NUM_BATCHED_TOKENS.");
ABSL_FLAG(bool, chunked_prefill, true,
          "Split long prompts over several steps. Env: MOE_CHUNKED_PREFILL.");
ABSL_FLAG(bool, prefix_caching, true,
          "Reuse the KV of shared prompt prefixes. Env: MOE_PREFIX_CACHING.");
ABSL_FLAG(int32_t, max_queued_requests, 256,
          "Requests waiting for a batch slot at most; beyond, Generate answers "
          "RESOURCE_EXHAUSTED. Env: MOE_MAX_QUEUED_REQUESTS.");
ABSL_FLAG(int32_t, max_model_len, 0,
          "Prompt + generated tokens per request at most (0 = the model's "
          "max_position_embeddings). Env: MOE_MAX_MODEL_LEN.");
ABSL_FLAG(int32_t, max_prompt_tokens, 0,
          "Prompt tokens per request at most (0 = max_model_len - 1). "
          "Env: MOE_MAX_PROMPT_TOKENS.");
ABSL_FLAG(int32_t, max_message_mib, 4,
          "Largest gRPC message received or sent, MiB. Env: MOE_MAX_MESSAGE_MIB.");
ABSL_FLAG(absl::Duration, drain_timeout, absl::Seconds(30),
          "On SIGTERM/SIGINT: how long running requests may take to finish before they are "
          "cancelled (e.g. 30s, 2m). Env: MOE_DRAIN_TIMEOUT.");
ABSL_FLAG(int64_t, expert_stats_window, 1000,
          "Engine steps in the recent window of GetExpertStats. Env: MOE_EXPERT_STATS_WINDOW.");
ABSL_FLAG(bool, log_requests, true,
          "One log line per finished request on stderr. Env: MOE_LOG_REQUESTS.");

namespace {

// MOE_<NAME> environment variables set flag defaults; the command line parsed afterwards wins.
bool ApplyEnvironment() {
  static const char* const kFlags[] = {"model",
                                       "host",
                                       "port",
                                       "metrics_port",
                                       "metrics_host",
                                       "tls_cert",
                                       "tls_key",
                                       "tls_client_ca",
                                       "auth_tokens_file",
                                       "model_name",
                                       "expert_metrics",
                                       "backend",
                                       "num_threads",
                                       "kv_cache_mib",
                                       "kv_cache_dtype",
                                       "kv_block_size",
                                       "max_num_seqs",
                                       "max_num_batched_tokens",
                                       "chunked_prefill",
                                       "prefix_caching",
                                       "max_queued_requests",
                                       "max_model_len",
                                       "max_prompt_tokens",
                                       "max_message_mib",
                                       "drain_timeout",
                                       "expert_stats_window",
                                       "log_requests"};
  bool ok = true;
  for (const char* name : kFlags) {
    std::string env = "MOE_";
    for (const char* c = name; *c; ++c) env += static_cast<char>(std::toupper(*c));
    const char* value = std::getenv(env.c_str());
    if (value == nullptr) continue;
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    std::string error;
    if (flag == nullptr || !flag->ParseFrom(value, &error)) {
      std::fprintf(stderr, "moe-serve: %s=%s: %s\n", env.c_str(), value, error.c_str());
      ok = false;
    }
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  moe::SetProgramUsage(
      "server/main.cc",
      "gRPC inference server for Mixture-of-Experts models.\n"
      "Serves moe.serving.v1.Inference, grpc.health.v1.Health and server reflection.\n"
      "Every flag --name can also be set as the environment variable MOE_NAME.\n"
      "Usage: moe-serve [--model=DIR] [--port=50051] [flags]");
  if (!ApplyEnvironment()) return 2;
  absl::ParseCommandLine(argc, argv);

  // SIGTERM/SIGINT are taken with sigwait below; block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  moe::server::ServerOptions options;
  options.model_dir = absl::GetFlag(FLAGS_model);
  if (options.model_dir.empty()) options.model_dir = moe::server::DefaultModelDir(argv[0]);
  options.host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_port);
  options.backend = absl::GetFlag(FLAGS_backend);
  options.num_threads = absl::GetFlag(FLAGS_num_threads);
  options.cpu_bf16_activations = absl::GetFlag(FLAGS_cpu_bf16_activations);
  const int64_t kv_cache_mib = absl::GetFlag(FLAGS_kv_cache_mib);
  if (kv_cache_mib < 1 || kv_cache_mib > (int64_t{1} << 30)) {
    std::fprintf(stderr, "moe-serve: --kv_cache_mib=%lld: must be in [1, %lld] MiB\n",
                 static_cast<long long>(kv_cache_mib), static_cast<long long>(int64_t{1} << 30));
    return 2;
  }
  options.kv_cache_bytes = kv_cache_mib << 20;
  const auto kv_cache_dtype = moe::ParseKvCacheDType(absl::GetFlag(FLAGS_kv_cache_dtype));
  if (!kv_cache_dtype.ok()) {
    std::fprintf(stderr, "moe-serve: --kv_cache_dtype: %s\n",
                 std::string(kv_cache_dtype.status().message()).c_str());
    return 2;
  }
  options.kv_cache_dtype = *kv_cache_dtype;
  options.kv_block_size = absl::GetFlag(FLAGS_kv_block_size);
  options.max_num_seqs = absl::GetFlag(FLAGS_max_num_seqs);
  options.max_num_batched_tokens = absl::GetFlag(FLAGS_max_num_batched_tokens);
  options.enable_chunked_prefill = absl::GetFlag(FLAGS_chunked_prefill);
  options.enable_prefix_caching = absl::GetFlag(FLAGS_prefix_caching);
  options.max_queued_requests = absl::GetFlag(FLAGS_max_queued_requests);
  options.max_model_len = absl::GetFlag(FLAGS_max_model_len);
  options.max_prompt_tokens = absl::GetFlag(FLAGS_max_prompt_tokens);
  const int32_t max_message_mib = absl::GetFlag(FLAGS_max_message_mib);
  if (max_message_mib < 1 || max_message_mib > 1024) {
    std::fprintf(stderr, "moe-serve: --max_message_mib=%d: must be in [1, 1024] MiB\n",
                 max_message_mib);
    return 2;
  }
  options.max_message_bytes = max_message_mib << 20;
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  {
    const char* env_tokens = std::getenv("MOE_AUTH_TOKENS");
    absl::StatusOr<std::vector<std::string>> tokens = moe::server::BearerAuth::LoadTokens(
        absl::GetFlag(FLAGS_auth_tokens_file), env_tokens != nullptr ? env_tokens : "");
    if (!tokens.ok()) {
      std::fprintf(stderr, "moe-serve: %s\n", tokens.status().ToString().c_str());
      return 2;
    }
    options.auth_tokens = *std::move(tokens);
    if (!options.auth_tokens.empty()) {
      std::fprintf(stderr, "moe-serve: bearer-token authentication on (%zu tokens)%s\n",
                   options.auth_tokens.size(),
                   options.tls_cert_file.empty()
                       ? "; WARNING: without --tls_cert tokens cross the network in clear text"
                       : "");
    }
  }
  options.drain_timeout = absl::GetFlag(FLAGS_drain_timeout);
  options.expert_stats_window_steps = absl::GetFlag(FLAGS_expert_stats_window);
  options.log_requests = absl::GetFlag(FLAGS_log_requests);

  // /metrics first, so that Prometheus sees the target while the model loads.
  std::unique_ptr<moe::server::MetricsService> metrics;
  const std::string expert_metrics = absl::GetFlag(FLAGS_expert_metrics);
  if (expert_metrics != "default" && expert_metrics != "full") {
    std::fprintf(stderr, "moe-serve: --expert_metrics=%s: supported: default, full\n",
                 expert_metrics.c_str());
    return 2;
  }
  if (absl::GetFlag(FLAGS_metrics_port) >= 0) {
    std::string model_name = absl::GetFlag(FLAGS_model_name);
    if (model_name.empty()) {
      model_name = std::filesystem::path(options.model_dir).lexically_normal().filename().string();
      if (model_name.empty()) {  // a path ending in '/'
        model_name =
            std::filesystem::path(options.model_dir).lexically_normal().parent_path().filename();
      }
    }
    std::string metrics_host = absl::GetFlag(FLAGS_metrics_host);
    if (metrics_host.empty()) metrics_host = options.host;
    auto started = moe::server::MetricsService::Start(
        metrics_host, absl::GetFlag(FLAGS_metrics_port), model_name,
        expert_metrics == "full" ? moe::server::ExpertMetrics::kFull
                                 : moe::server::ExpertMetrics::kDefault);
    if (!started.ok()) {
      std::fprintf(stderr, "moe-serve: %s\n", started.status().ToString().c_str());
      return 1;
    }
    metrics = std::move(started).value();
    options.make_hooks = metrics->MakeHooksFactory();
    std::fprintf(stderr, "moe-serve: metrics on http://%s:%d/metrics (model=\"%s\")\n",
                 metrics_host.c_str(), metrics->port(), model_name.c_str());
  }

  absl::StatusOr<std::unique_ptr<moe::server::MoeServer>> server =
      moe::server::MoeServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "moe-serve: %s\n", server.status().ToString().c_str());
    return 1;
  }
  std::fprintf(stderr, "moe-serve: listening on %s:%d (health NOT_SERVING while loading)\n",
               options.host.c_str(), (*server)->port());
  const absl::Time load_start = absl::Now();
  if (absl::Status status = (*server)->LoadModel(); !status.ok()) {
    std::fprintf(stderr, "moe-serve: %s\n", status.ToString().c_str());
    return 1;
  }
  const auto& info = (*server)->model_info();
  std::fprintf(stderr,
               "moe-serve: model=%s architecture=%s layers=%d moe_layers=%d experts=%d top_k=%d "
               "params_total=%lld params_active_per_token=%lld dtype=%s backend=\"%s\" "
               "context=%d kv_blocks=%d kv_dtype=%s tokenizer=%s chat_template=%s load_s=%.2f\n",
               info.model_path().c_str(), info.architecture().c_str(), info.num_layers(),
               info.num_moe_layers(), info.num_experts(), info.top_k(),
               static_cast<long long>(info.parameters().total()),
               static_cast<long long>(info.parameters().active_per_token()), info.dtype().c_str(),
               info.device().c_str(), info.context_length(), info.kv_total_blocks(),
               info.kv_cache_dtype().c_str(), info.has_tokenizer() ? "yes" : "no",
               info.has_chat_template() ? "yes" : "no",
               absl::ToDoubleSeconds(absl::Now() - load_start));
  std::fprintf(stderr, "moe-serve: SERVING on %s:%d (metrics port %d)\n", options.host.c_str(),
               (*server)->port(), metrics != nullptr ? metrics->port() : -1);

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::fprintf(stderr, "moe-serve: %s: draining (timeout %s)\n",
               signal_number == SIGTERM ? "SIGTERM" : "SIGINT",
               absl::FormatDuration(options.drain_timeout).c_str());
  (*server)->Drain();
  std::fprintf(stderr, "moe-serve: drained; exiting\n");
  server->reset();
  return 0;
}
