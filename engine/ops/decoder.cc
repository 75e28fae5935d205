// The decoder forward pass, written once against the Backend interface, and the ModelRunner
// that owns a loaded model, its backend and the KV pool.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "engine/common/status_macros.h"
#include "engine/model/loaded_model.h"
#include "engine/ops/model_runner.h"

namespace moe {
namespace {

// Activation buffers of one step, grown on demand (never shrunk).
struct Activations {
  int64_t capacity_tokens = 0;
  int64_t capacity_logits = 0;
  DeviceBuffer hidden;          // [tokens, hidden] residual stream
  DeviceBuffer normed;          // [tokens, hidden]
  DeviceBuffer q;               // [tokens, q_dim]
  DeviceBuffer k;               // [tokens, kv_dim]
  DeviceBuffer v;               // [tokens, kv_dim]
  DeviceBuffer attention;       // [tokens, q_dim]
  DeviceBuffer mlp_out;         // [tokens, hidden]
  DeviceBuffer shared_out;      // [tokens, hidden]
  DeviceBuffer expert_ids;      // [moe_layers, tokens, top_k] int32
  DeviceBuffer expert_weights;  // [moe_layers, tokens, top_k]
  DeviceBuffer last_hidden;     // [logit rows, hidden]
  DeviceBuffer logits;          // [logit rows, vocab]
  DeviceBuffer argmax;          // [logit rows] int32
};

class DecoderRunner final : public ModelRunner {
 public:
  DecoderRunner(std::unique_ptr<LoadedModel> model, std::unique_ptr<Backend> backend,
                KvCacheShape kv_shape)
      : model_(std::move(model)), backend_(std::move(backend)), kv_shape_(kv_shape) {}

  const ModelConfig& config() const override { return model_->config; }
  int32_t block_size() const override { return kv_shape_.block_size; }
  int32_t num_blocks() const override { return kv_shape_.num_blocks; }
  const ParameterCounts& parameters() const override { return model_->weights.parameters; }
  std::string backend_description() const override {
    return absl::StrCat(backend_->name(), " (", backend_->device_description(), ")");
  }
  std::string backend_execution_summary() const override { return backend_->execution_summary(); }

  absl::StatusOr<ForwardOutput> Forward(const ForwardBatch& batch) override {
    absl::StatusOr<ForwardOutput> output = RunStep(batch);
    if (!output.ok()) backend_->AbandonStep();
    return output;
  }

 private:
  absl::StatusOr<ForwardOutput> RunStep(const ForwardBatch& batch) {
    const ModelConfig& config = model_->config;
    const ModelWeights& weights = model_->weights;
    const int64_t tokens = batch.num_tokens();
    const int64_t logit_rows = static_cast<int64_t>(batch.logits_rows.size());
    if (tokens == 0) return absl::InvalidArgumentError("batch has no tokens");
    if (!batch.argmax_only.empty() &&
        static_cast<int64_t>(batch.argmax_only.size()) != logit_rows) {
      return absl::InvalidArgumentError(absl::StrCat("batch marks ", batch.argmax_only.size(),
                                                     " argmax-only flags for ", logit_rows,
                                                     " logits rows"));
    }
    RETURN_IF_ERROR(Reserve(tokens, logit_rows));
    RETURN_IF_ERROR(backend_->BeginStep(batch));

    const int64_t hidden_size = config.hidden_size;
    auto matrix = [&](const DeviceBuffer& buffer, int64_t rows, int64_t cols) {
      return Matrix::Dense(buffer.as<float>(), rows, cols);
    };
    const Matrix hidden = matrix(act_.hidden, tokens, hidden_size);
    const Matrix normed = matrix(act_.normed, tokens, hidden_size);
    const Matrix q = matrix(act_.q, tokens, config.q_dim());
    const Matrix k = matrix(act_.k, tokens, config.kv_dim());
    const Matrix v = matrix(act_.v, tokens, config.kv_dim());
    const Matrix attention = matrix(act_.attention, tokens, config.q_dim());
    const Matrix mlp_out = matrix(act_.mlp_out, tokens, hidden_size);
    const Matrix shared_out = matrix(act_.shared_out, tokens, hidden_size);

    ForwardOutput output;
    StepRouting& record = output.routing;
    // The backend may fill the statistics asynchronously until the step's Synchronize, so
    // their storage must not move: reserve every MoE layer up front.
    const int32_t moe_layers = config.num_moe_layers();
    record.probability_mass.reserve(moe_layers);
    record.router_z_sum.reserve(moe_layers);
    const int64_t routing_stride = tokens * config.top_k;  // one MoE layer's [tokens, top_k]
    int32_t moe_index = 0;
    AttentionParams attention_params{.num_heads = config.num_heads,
                                     .num_kv_heads = config.num_kv_heads,
                                     .head_dim = config.head_dim,
                                     .scale = 1.0f / std::sqrt(static_cast<float>(config.head_dim)),
                                     .sliding_window = config.sliding_window};

    RETURN_IF_ERROR(backend_->Embed(*weights.embed_tokens, hidden));
    for (int32_t index = 0; index < config.num_layers; ++index) {
      const LayerWeights& layer = weights.layers[index];
      // Attention block.
      RETURN_IF_ERROR(backend_->RmsNorm(hidden, *layer.input_norm, config.rms_norm_eps, normed));
      RETURN_IF_ERROR(backend_->Linear(normed, *layer.q, layer.q_bias, q));
      RETURN_IF_ERROR(backend_->Linear(normed, *layer.k, layer.k_bias, k));
      RETURN_IF_ERROR(backend_->Linear(normed, *layer.v, layer.v_bias, v));
      if (config.qk_norm == QkNorm::kPerHead) {
        // q: [tokens * heads, head_dim], k: [tokens * kv_heads, head_dim]
        const Matrix q_heads = matrix(act_.q, tokens * config.num_heads, config.head_dim);
        const Matrix k_heads = matrix(act_.k, tokens * config.num_kv_heads, config.head_dim);
        RETURN_IF_ERROR(backend_->RmsNorm(q_heads, *layer.q_norm, config.rms_norm_eps, q_heads));
        RETURN_IF_ERROR(backend_->RmsNorm(k_heads, *layer.k_norm, config.rms_norm_eps, k_heads));
      } else if (config.qk_norm == QkNorm::kWholeProjection) {
        RETURN_IF_ERROR(backend_->RmsNorm(q, *layer.q_norm, config.rms_norm_eps, q));
        RETURN_IF_ERROR(backend_->RmsNorm(k, *layer.k_norm, config.rms_norm_eps, k));
      }
      if (config.clip_qkv > 0) {
        for (const Matrix& projection : {q, k, v}) {
          RETURN_IF_ERROR(backend_->Clamp(projection, config.clip_qkv));
        }
      }
      RETURN_IF_ERROR(backend_->Rope(q, config.head_dim, config.rope_theta));
      RETURN_IF_ERROR(backend_->Rope(k, config.head_dim, config.rope_theta));
      RETURN_IF_ERROR(backend_->WriteKv(index, k, v));
      attention_params.layer = index;
      RETURN_IF_ERROR(backend_->Attention(attention_params, q, attention));
      RETURN_IF_ERROR(backend_->Linear(attention, *layer.o, layer.o_bias, mlp_out));
      RETURN_IF_ERROR(backend_->AddInPlace(hidden, mlp_out));

      // Feed-forward block: routed experts (+ shared expert) or a dense MLP.
      RETURN_IF_ERROR(
          backend_->RmsNorm(hidden, *layer.post_attention_norm, config.rms_norm_eps, normed));
      if (layer.is_moe) {
        const RoutingResult routing{act_.expert_ids.as<int32_t>() + moe_index * routing_stride,
                                    act_.expert_weights.as<float>() + moe_index * routing_stride};
        ++moe_index;
        std::vector<double>& mass = record.probability_mass.emplace_back(config.num_experts, 0.0);
        double& z_sum = record.router_z_sum.emplace_back(0.0);
        RETURN_IF_ERROR(backend_->Route(normed, *layer.router, config.top_k, config.norm_topk_prob,
                                        routing, mass, &z_sum));
        RETURN_IF_ERROR(backend_->Fill(mlp_out, 0.0f));
        RETURN_IF_ERROR(
            backend_->MoeExperts(normed, layer.experts, config.top_k, routing, mlp_out));
        if (layer.shared_expert_gate != nullptr) {
          RETURN_IF_ERROR(backend_->SwigluMlp(normed, layer.shared_expert, shared_out));
          RETURN_IF_ERROR(
              backend_->AddGated(normed, *layer.shared_expert_gate, shared_out, mlp_out));
        }
      } else {
        RETURN_IF_ERROR(backend_->SwigluMlp(normed, layer.dense_mlp, mlp_out));
      }
      RETURN_IF_ERROR(backend_->AddInPlace(hidden, mlp_out));
    }

    // Logits rows in the order they are computed: those whose logits are returned first (one
    // contiguous copy), then the argmax-only ones. order[j] = index into batch.logits_rows.
    std::vector<int32_t> order;
    std::vector<int32_t> rows_in_order;
    int64_t returned_rows = logit_rows;
    if (!batch.argmax_only.empty()) {
      for (int32_t pass = 0; pass < 2; ++pass) {
        for (int32_t i = 0; i < logit_rows; ++i) {
          if (batch.returns_logits(i) == (pass == 0)) order.push_back(i);
        }
        if (pass == 0) returned_rows = static_cast<int64_t>(order.size());
      }
      for (int32_t i : order) rows_in_order.push_back(batch.logits_rows[i]);
    }
    const Matrix logits = matrix(act_.logits, logit_rows, config.vocab_size);
    if (logit_rows > 0) {
      const Matrix last_hidden = matrix(act_.last_hidden, logit_rows, hidden_size);
      RETURN_IF_ERROR(backend_->GatherRows(
          hidden, order.empty() ? std::span<const int32_t>(batch.logits_rows) : rows_in_order,
          last_hidden));
      RETURN_IF_ERROR(
          backend_->RmsNorm(last_hidden, *weights.final_norm, config.rms_norm_eps, last_hidden));
      RETURN_IF_ERROR(backend_->Linear(last_hidden, *weights.lm_head, nullptr, logits));
      if (!order.empty()) RETURN_IF_ERROR(backend_->RowArgMax(logits, act_.argmax.as<int32_t>()));
    }
    // The step's only host synchronisation, then the copies of routing and logits.
    RETURN_IF_ERROR(RecordRouting(routing_stride, moe_layers, record));
    if (returned_rows > 0) {
      output.logits.resize(returned_rows * config.vocab_size);
      RETURN_IF_ERROR(backend_->CopyToHost(output.logits.data(), logits.data,
                                           output.logits.size() * sizeof(float)));
    }
    if (!order.empty()) {
      std::vector<int32_t> argmax(logit_rows);
      RETURN_IF_ERROR(
          backend_->CopyToHost(argmax.data(), act_.argmax.data(), argmax.size() * sizeof(int32_t)));
      output.argmax.resize(logit_rows);
      for (int32_t j = 0; j < logit_rows; ++j) output.argmax[order[j]] = argmax[j];
    }
    return output;
  }

  // Copies every MoE layer's expert ids and weights ([tokens, top_k] each) to the record, after
  // one Synchronize for the whole step: the layers lie one after another in act_, so two copies
  // (each a host synchronisation on a GPU) bring them all.
  absl::Status RecordRouting(int64_t stride, int32_t moe_layers, StepRouting& record) {
    RETURN_IF_ERROR(backend_->Synchronize());
    const int64_t total = stride * moe_layers;
    std::vector<int32_t> ids(total);
    std::vector<float> weights(total);
    RETURN_IF_ERROR(
        backend_->CopyToHost(ids.data(), act_.expert_ids.data(), total * sizeof(int32_t)));
    RETURN_IF_ERROR(
        backend_->CopyToHost(weights.data(), act_.expert_weights.data(), total * sizeof(float)));
    for (int32_t m = 0; m < moe_layers; ++m) {
      record.expert_ids.emplace_back(ids.begin() + m * stride, ids.begin() + (m + 1) * stride);
      record.expert_weights.emplace_back(weights.begin() + m * stride,
                                         weights.begin() + (m + 1) * stride);
    }
    return absl::OkStatus();
  }

  absl::Status Reserve(int64_t tokens, int64_t logit_rows) {
    const ModelConfig& config = model_->config;
    auto grow = [&](DeviceBuffer& buffer, int64_t elements) -> absl::Status {
      ASSIGN_OR_RETURN(buffer, backend_->Allocate(elements * sizeof(float)));
      return absl::OkStatus();
    };
    if (tokens > act_.capacity_tokens) {
      const int64_t capacity = std::max<int64_t>(tokens, 2 * act_.capacity_tokens);
      RETURN_IF_ERROR(grow(act_.hidden, capacity * config.hidden_size));
      RETURN_IF_ERROR(grow(act_.normed, capacity * config.hidden_size));
      RETURN_IF_ERROR(grow(act_.q, capacity * config.q_dim()));
      RETURN_IF_ERROR(grow(act_.k, capacity * config.kv_dim()));
      RETURN_IF_ERROR(grow(act_.v, capacity * config.kv_dim()));
      RETURN_IF_ERROR(grow(act_.attention, capacity * config.q_dim()));
      RETURN_IF_ERROR(grow(act_.mlp_out, capacity * config.hidden_size));
      RETURN_IF_ERROR(grow(act_.shared_out, capacity * config.hidden_size));
      const int64_t routing_slots =
          capacity * std::max(1, config.top_k) * std::max(1, config.num_moe_layers());
      RETURN_IF_ERROR(grow(act_.expert_ids, routing_slots));
      RETURN_IF_ERROR(grow(act_.expert_weights, routing_slots));
      act_.capacity_tokens = capacity;
    }
    if (logit_rows > act_.capacity_logits) {
      const int64_t capacity = std::max<int64_t>(logit_rows, 2 * act_.capacity_logits);
      RETURN_IF_ERROR(grow(act_.last_hidden, capacity * config.hidden_size));
      RETURN_IF_ERROR(grow(act_.logits, capacity * config.vocab_size));
      RETURN_IF_ERROR(grow(act_.argmax, capacity));
      act_.capacity_logits = capacity;
    }
    return absl::OkStatus();
  }

  std::unique_ptr<LoadedModel> model_;
  std::unique_ptr<Backend> backend_;
  KvCacheShape kv_shape_;
  Activations act_;
};

}  // namespace

absl::StatusOr<DType> ParseKvCacheDType(std::string_view name) {
  if (name == "f32") return DType::kF32;
  if (name == "bf16") return DType::kBF16;
  return absl::InvalidArgumentError(absl::StrCat("KV cache type '", std::string(name),
                                                 "' is not supported; supported: f32, bf16"));
}

std::string_view KvCacheDTypeName(DType dtype) { return dtype == DType::kBF16 ? "bf16" : "f32"; }

absl::StatusOr<std::unique_ptr<ModelRunner>> ModelRunner::Create(
    const ModelRunnerOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<LoadedModel> model, LoadModel(options.model_dir));
  ASSIGN_OR_RETURN(
      std::unique_ptr<Backend> backend,
      CreateBackend(options.backend, {.num_threads = options.num_threads,
                                      .cpu_bf16_activations = options.cpu_bf16_activations}));
  RETURN_IF_ERROR(backend->PrepareWeights(model->weights));
  if (options.block_size <= 0 || options.block_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV block size ", options.block_size, " must be in [1, 1024]"));
  }
  KvCacheShape kv_shape{.num_layers = model->config.num_layers,
                        .block_size = options.block_size,
                        .num_kv_heads = model->config.num_kv_heads,
                        .head_dim = model->config.head_dim,
                        .dtype = options.kv_cache_dtype};
  const int64_t blocks = options.kv_cache_bytes / kv_shape.bytes_per_block();
  if (blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache budget of ", options.kv_cache_bytes, " bytes holds no block; one block of ",
        options.block_size, " tokens needs ", kv_shape.bytes_per_block(), " bytes"));
  }
  kv_shape.num_blocks = static_cast<int32_t>(std::min<int64_t>(blocks, 1 << 24));
  RETURN_IF_ERROR(backend->AllocateKvCache(kv_shape));
  return std::unique_ptr<ModelRunner>(
      new DecoderRunner(std::move(model), std::move(backend), kv_shape));
}

}  // namespace moe
