#include "server/server.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/model/model_config.h"
#include "engine/ops/model_runner.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "nlohmann/json.hpp"

namespace moe::server {
namespace {

namespace v1 = ::moe::serving::v1;

class StreamingDetokenizer : public IncrementalDetokenizer {
 public:
  explicit StreamingDetokenizer(const Tokenizer& tokenizer)
      : decoder_(tokenizer, /*skip_special_tokens=*/true) {}
  std::string Push(int32_t token_id) override { return decoder_.Push(token_id); }
  std::string Flush() override { return decoder_.Flush(); }

 private:
  StreamingDecoder decoder_;
};

// The checkpoint's weight dtype as config.json states it ("" when absent).
std::string ConfigDtype(const std::string& model_dir) {
  std::ifstream in(std::filesystem::path(model_dir) / "config.json");
  const nlohmann::json json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) return "";
  auto it = json.find("torch_dtype");
  if (it == json.end() || !it->is_string()) return "";
  return it->get<std::string>();
}

std::string ShortArchitectureName(Architecture architecture) {
  switch (architecture) {
    case Architecture::kMixtral:
      return "mixtral";
    case Architecture::kQwen2Moe:
      return "qwen2_moe";
    case Architecture::kQwen3Moe:
      return "qwen3_moe";
    case Architecture::kOlmoe:
      return "olmoe";
  }
  return "unknown";
}

}  // namespace

std::string DefaultModelDir(const char* argv0) {
  std::error_code error;
  std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", error);
  if (error) exe = std::filesystem::absolute(argv0 ? argv0 : "moe-serve", error);
  return (exe.parent_path().parent_path() / "demo_model").string();
}

namespace {

absl::StatusOr<std::string> ReadPemFile(const std::string& flag, const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    return absl::NotFoundError(absl::StrCat("--", flag, "=", path, ": no such file"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::PermissionDeniedError(
        absl::StrCat("--", flag, "=", path, ": cannot be opened for reading"));
  }
  std::stringstream text;
  text << in.rdbuf();
  if (in.bad() || text.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, "=", path, ": not a PEM file (no -----BEGIN line)"));
  }
  return text.str();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(
    const ServerOptions& options) {
  const bool tls = !options.tls_cert_file.empty() || !options.tls_key_file.empty();
  if (!tls) {
    if (!options.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca needs --tls_cert and --tls_key (mutual TLS is TLS)");
    }
    return grpc::InsecureServerCredentials();
  }
  if (options.tls_cert_file.empty() || options.tls_key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both --tls_cert and --tls_key");
  }
  grpc::SslServerCredentialsOptions ssl;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  ASSIGN_OR_RETURN(pair.cert_chain, ReadPemFile("tls_cert", options.tls_cert_file));
  ASSIGN_OR_RETURN(pair.private_key, ReadPemFile("tls_key", options.tls_key_file));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!options.tls_client_ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPemFile("tls_client_ca", options.tls_client_ca_file));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MoeServer>> MoeServer::Start(const ServerOptions& options) {
  std::unique_ptr<MoeServer> server(new MoeServer(options));
  server->service_.set_log_requests(options.log_requests);
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, MakeCredentials(options));
  if (!options.auth_tokens.empty()) {
    ASSIGN_OR_RETURN(BearerAuth auth, BearerAuth::Create(options.auth_tokens));
    server->service_.set_auth(std::move(auth));
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string address = absl::StrCat(options.host, ":", options.port);
  builder.AddListeningPort(address, credentials, &server->port_);
  // No SO_REUSEPORT: a second server on a port in use must fail to start, not share the port
  // (gRPC turns it on by default on Linux, which would split traffic between two processes).
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(&server->service_);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat(
        "could not listen on ", address,
        " (is the port already in use, or the address not one of this machine's?",
        options.tls_cert_file.empty()
            ? ")"
            : " Or are --tls_cert/--tls_key not a valid, matching certificate and key? See "
              "gRPC's error above)"));
  }
  server->SetServing(false);
  return server;
}

MoeServer::~MoeServer() {
  if (!drained_ && server_ != nullptr) {
    service_.StartDrain();
    SetServing(false);
    service_.CancelAll();
    service_.WaitForIdle(absl::Now() + absl::Seconds(10));
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    server_->Wait();
  }
  engine_.reset();  // after the server: no call touches the engine any more
}

void MoeServer::SetServing(bool serving) {
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);  // every service, "" included
  health->SetServingStatus(kServiceName, serving);
}

absl::Status MoeServer::LoadModel() {
  if (engine_ != nullptr) return absl::FailedPreconditionError("the model is already loaded");
  const std::string& dir = options_.model_dir;
  if (!std::filesystem::exists(std::filesystem::path(dir) / "config.json")) {
    return absl::NotFoundError(
        absl::StrCat("no model at '", dir, "' (", dir,
                     "/config.json is missing). Pass --model=DIR, or make the demo model with "
                     "`moe-make-model --preset=demo --out=",
                     dir, " --tokenizer=PATH/tokenizer.json` (scripts/serve_demo.sh does this)"));
  }
  if (std::filesystem::exists(std::filesystem::path(dir) / "tokenizer.json")) {
    absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromModelDir(dir);
    if (!tokenizer.ok()) {
      return absl::Status(tokenizer.status().code(),
                          absl::StrCat("loading the tokenizer: ", tokenizer.status().message()));
    }
    tokenizer_ = *std::move(tokenizer);
    if (const absl::Status& chat = tokenizer_->chat_template_status(); !chat.ok()) {
      std::fprintf(stderr, "moe-serve: chat prompts are not served: %s\n",
                   std::string(chat.message()).c_str());
    }
  }

  EngineOptions engine_options;
  engine_options.runner.model_dir = dir;
  engine_options.runner.backend = options_.backend;
  engine_options.runner.kv_cache_bytes = options_.kv_cache_bytes;
  engine_options.runner.block_size = options_.kv_block_size;
  engine_options.runner.num_threads = options_.num_threads;
  engine_options.runner.cpu_bf16_activations = options_.cpu_bf16_activations;
  engine_options.runner.kv_cache_dtype = options_.kv_cache_dtype;
  engine_options.scheduler.max_num_seqs = options_.max_num_seqs;
  engine_options.scheduler.max_num_batched_tokens = options_.max_num_batched_tokens;
  engine_options.scheduler.enable_chunked_prefill = options_.enable_chunked_prefill;
  engine_options.scheduler.enable_prefix_caching = options_.enable_prefix_caching;
  engine_options.max_waiting_requests = options_.max_queued_requests;
  engine_options.max_model_len = options_.max_model_len;
  engine_options.base_seed = options_.base_seed;
  engine_options.check_invariants = options_.check_invariants;
  if (tokenizer_ != nullptr) {
    const Tokenizer* tokenizer = tokenizer_.get();
    engine_options.detokenizer = [tokenizer](absl::Span<const int32_t>) {
      return std::make_unique<StreamingDetokenizer>(*tokenizer);
    };
  }

  ASSIGN_OR_RETURN(std::unique_ptr<ModelRunner> runner, ModelRunner::Create(engine_options.runner));
  const ModelConfig& config = runner->config();
  if (tokenizer_ != nullptr && tokenizer_->vocab_size() > config.vocab_size) {
    return absl::FailedPreconditionError(
        absl::StrCat("the tokenizer's vocabulary (", tokenizer_->vocab_size(),
                     " ids) is larger than the model's vocab_size (", config.vocab_size, ")"));
  }
  expert_stats_ =
      std::make_unique<ExpertStatsAccumulator>(config.num_moe_layers(), config.num_experts,
                                               config.top_k, options_.expert_stats_window_steps);

  v1::ModelInfo& info = model_.info;
  info.set_model_path(std::filesystem::absolute(dir).string());
  info.set_architecture(ShortArchitectureName(config.architecture));
  info.set_architecture_class(config.architecture_name);
  info.set_num_layers(config.num_layers);
  info.set_num_moe_layers(config.num_moe_layers());
  for (int32_t l = 0; l < config.num_layers; ++l) {
    if (l < static_cast<int32_t>(config.layer_is_moe.size()) && config.layer_is_moe[l]) {
      info.add_moe_layer_indices(l);
    }
  }
  info.set_num_experts(config.num_experts);
  info.set_top_k(config.top_k);
  info.set_num_shared_experts(config.shared_expert_intermediate_size > 0 ? 1 : 0);
  info.set_hidden_size(config.hidden_size);
  info.set_num_heads(config.num_heads);
  info.set_num_kv_heads(config.num_kv_heads);
  info.set_head_dim(config.head_dim);
  info.set_vocab_size(config.vocab_size);
  const ParameterCounts& params = runner->parameters();
  v1::ParameterCounts* p = info.mutable_parameters();
  p->set_total(params.total);
  p->set_active_per_token(params.active_per_token);
  p->set_routed_expert(params.routed_expert);
  p->set_shared_expert(params.shared_expert);
  p->set_non_expert(params.non_expert);
  p->set_per_routed_expert(params.params_per_routed_expert);
  info.set_dtype(ConfigDtype(dir));
  info.set_device(runner->backend_description());
  {
    // "cpu (CPU, ...)" -> "cpu"
    const std::string device = runner->backend_description();
    info.set_backend(device.substr(0, device.find(' ')));
  }
  info.set_kv_block_size(runner->block_size());
  info.set_kv_total_blocks(runner->num_blocks());
  info.set_kv_capacity_tokens(static_cast<int64_t>(runner->block_size()) * runner->num_blocks());
  info.set_kv_cache_dtype(std::string(KvCacheDTypeName(options_.kv_cache_dtype)));
  for (int32_t id : config.eos_token_ids) info.add_eos_token_ids(id);
  info.set_has_tokenizer(tokenizer_ != nullptr);
  info.set_has_chat_template(tokenizer_ != nullptr && tokenizer_->chat_template_status().ok());
  info.set_server_version(kServerVersion);

  // The runner (and with it config and parameters) lives on inside the engine.
  ServerHooks hooks;
  if (options_.make_hooks) {
    hooks = options_.make_hooks(LoadedModel{.config = &runner->config(),
                                            .parameters = &runner->parameters(),
                                            .info = &model_.info,
                                            .expert_stats = expert_stats_.get()});
  }
  ExpertStatsAccumulator* stats = expert_stats_.get();
  engine_options.routing_observer = [stats, on_routing = std::move(hooks.on_routing)](
                                        const ForwardBatch& batch, const StepRouting& routing) {
    stats->Record(batch, routing);
    if (on_routing) on_routing(batch, routing);
  };
  if (hooks.on_step) engine_options.step_observer = std::move(hooks.on_step);
  model_.on_request = std::move(hooks.on_request);

  ASSIGN_OR_RETURN(engine_, Engine::CreateWithRunner(std::move(engine_options), std::move(runner)));
  const int32_t context = engine_->max_model_len();
  info.set_context_length(context);
  int32_t max_prompt = context - 1;
  if (options_.max_prompt_tokens > 0) max_prompt = std::min(max_prompt, options_.max_prompt_tokens);
  info.set_max_prompt_tokens(max_prompt);

  model_.engine = engine_.get();
  model_.tokenizer = tokenizer_.get();
  model_.expert_stats = expert_stats_.get();
  model_.limits = RequestLimits{.vocab_size = config.vocab_size,
                                .context_length = context,
                                .max_prompt_tokens = max_prompt,
                                .max_prompt_text_bytes = max_prompt * kMaxPromptBytesPerToken};
  service_.SetModel(model_);
  SetServing(true);
  return absl::OkStatus();
}

void MoeServer::Drain() {
  if (drained_ || server_ == nullptr) return;
  drained_ = true;
  SetServing(false);
  service_.StartDrain();
  const absl::Time deadline = absl::Now() + options_.drain_timeout;
  if (!service_.WaitForIdle(deadline)) {
    std::fprintf(stderr,
                 "moe-serve: drain timeout (%s) passed with %lld requests running; "
                 "cancelling them\n",
                 absl::FormatDuration(options_.drain_timeout).c_str(),
                 static_cast<long long>(service_.num_active()));
    service_.CancelAll();
    service_.WaitForIdle(absl::Now() + absl::Seconds(10));
  }
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server_->Wait();
}

}  // namespace moe::server
