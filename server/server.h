// MoeServer: the gRPC server of moe-serve (Inference service, standard health, reflection)
// around one Engine. Used by the moe-serve binary and, in-process, by the end-to-end tests.
//
//   auto server = MoeServer::Start(options);   // listening; health NOT_SERVING; UNAVAILABLE
//   server->LoadModel();                       // engine up; health SERVING
//   ...
//   server->Drain();  // NOT_SERVING, new calls UNAVAILABLE, in-flight finish up to the drain
//                     // timeout, the rest cancelled (UNAVAILABLE), then the server stops.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "engine/tokenizer/tokenizer.h"
#include "grpcpp/server.h"
#include "server/expert_stats.h"
#include "server/inference_service.h"
#include "server/server_hooks.h"

namespace moe::server {

inline constexpr char kServiceName[] = "moe.serving.v1.Inference";
inline constexpr char kServerVersion[] = "0.1.0";

struct ServerOptions {
  std::string model_dir;
  std::string host = "0.0.0.0";
  int port = 50051;                      // 0 = pick a free port (see MoeServer::port())
  std::string backend = "auto";          // auto | cpu | cuda
  int64_t kv_cache_bytes = 256ll << 20;  // paged KV pool budget
  int32_t kv_block_size = 16;
  int32_t num_threads = 0;               // CPU backend threads; 0 = all cores
  bool cpu_bf16_activations = false;     // CPU backend: bf16 activations (lower precision)
  DType kv_cache_dtype = DType::kF32;    // what the KV cache stores: kF32 or kBF16
  int32_t max_num_seqs = 64;             // running sequences at most
  int32_t max_num_batched_tokens = 512;  // tokens per engine step at most
  bool enable_chunked_prefill = true;
  bool enable_prefix_caching = true;
  int32_t max_queued_requests = 256;    // waiting requests at most; beyond: RESOURCE_EXHAUSTED
  int32_t max_model_len = 0;            // prompt + max_tokens; 0 = the model's
  int32_t max_prompt_tokens = 0;        // 0 = context length - 1
  int32_t max_message_bytes = 4 << 20;  // gRPC receive/send limit
  // TLS for the gRPC port: PEM files. Both cert and key, or neither (plaintext). With
  // tls_client_ca_file, clients must present a certificate signed by it (mutual TLS).
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  // Bearer tokens accepted by the Inference service; empty = no authentication.
  std::vector<std::string> auth_tokens;
  absl::Duration drain_timeout = absl::Seconds(30);
  int64_t expert_stats_window_steps = 1000;
  std::optional<uint64_t> base_seed;
  bool check_invariants = false;  // tests
  bool log_requests = true;
  // Metrics and other observers, built once the model is loaded (optional).
  HooksFactory make_hooks;
};

class MoeServer {
 public:
  // Starts listening. The Inference service answers UNAVAILABLE until LoadModel().
  static absl::StatusOr<std::unique_ptr<MoeServer>> Start(const ServerOptions& options);
  ~MoeServer();  // Drains (with a zero timeout) if Drain() was not called.

  // Loads the tokenizer (when the model directory has one) and the model, starts the engine,
  // then sets health SERVING.
  absl::Status LoadModel();

  // Graceful shutdown (idempotent). Returns when the gRPC server has stopped.
  void Drain();

  int port() const { return port_; }
  // Null before LoadModel().
  Engine* engine() const { return engine_.get(); }
  const serving::v1::ModelInfo& model_info() const { return model_.info; }
  // Health status of "" and of the Inference service.
  void SetServing(bool serving);

 private:
  explicit MoeServer(const ServerOptions& options) : options_(options) {}

  const ServerOptions options_;
  InferenceService service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<ExpertStatsAccumulator> expert_stats_;
  std::unique_ptr<Engine> engine_;
  ServingModel model_;
  bool drained_ = false;
};

// Where moe-serve looks for the built-in demo model when --model is not given:
// <directory of the executable>/../demo_model (build/server/moe-serve -> build/demo_model,
// where scripts/serve_demo.sh writes it).
std::string DefaultModelDir(const char* argv0);

}  // namespace moe::server
