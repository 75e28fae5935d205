#include "engine/backend/cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/backend/batch_validation.h"
#include "engine/backend/cuda/cuda_device.h"
#include "engine/backend/cuda/cuda_raii.h"
#include "engine/backend/cuda/cuda_status.h"
#include "engine/backend/cuda/kernels.h"
#include "engine/backend/cuda/lt_gemm.h"
#include "engine/backend/cuda/step_graphs.h"
#include "engine/common/status_macros.h"

namespace moe::cuda {
namespace {

constexpr size_t kAlignment = 256;
constexpr size_t kStagingBytes = size_t{32} << 20;  // per half of the double-buffered staging
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
constexpr int kMaxPendingStats = 256;  // Route() calls between two Synchronize()

size_t AlignUp(size_t value) { return (value + kAlignment - 1) / kAlignment * kAlignment; }

// A weight in device memory.
struct DeviceWeight {
  void* data = nullptr;
  WeightType type = WeightType::kBF16;
  int64_t rows = 0;  // shape[0] (1 for 1-D tensors)
  int64_t cols = 0;  // elements per row
};

// The routed experts of one MoE layer, contiguous: gate/up [experts, ffn, hidden], down
// [experts, hidden, ffn].
struct ExpertTable {
  const void* gate = nullptr;
  const void* up = nullptr;
  const void* down = nullptr;
  WeightType type = WeightType::kBF16;
  int64_t experts = 0;
  int64_t ffn = 0;
  int64_t hidden = 0;
};

// Step uploads: a pinned host area and its device twin, filled front to back during a step
// and reused two steps later (ping-pong), so a step never waits for the one before it.
struct Uploader {
  DeviceBuffer host;  // pinned (AllocatePinned)
  DeviceBuffer device;
  size_t used = 0;
  Event done;  // recorded when the step that used this uploader has enqueued all its work
  bool pending = false;
  // Extra areas when a step outgrows the main one; merged at the next reuse.
  std::vector<std::pair<DeviceBuffer, DeviceBuffer>> overflow;
  size_t overflow_used = 0;
};

int EnvInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  return std::atoi(value);
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(const CudaBackendOptions& options, cudaDeviceProp properties)
      : options_(options),
        properties_(properties),
        graphs_(
            static_cast<size_t>(std::max(options.graph_cache_size, 1)),
            [this](const std::function<absl::Status()>& launches) { return Capture(launches); },
            [this](const GraphExec& graph) {
              return CudaStatus(cudaGraphLaunch(graph.get(), stream_.get()), "cudaGraphLaunch",
                                __FILE__, __LINE__);
            }) {}

  absl::Status Init() {
    CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
    ASSIGN_OR_RETURN(stream_, CreateStream());
    ASSIGN_OR_RETURN(cublas_, CreateCublas(stream_.get()));
    ASSIGN_OR_RETURN(cublas_workspace_,
                     AllocateOrExhausted(kCublasWorkspaceBytes, "cuBLAS workspace"));
    CUBLAS_RETURN_IF_ERROR(
        cublasSetWorkspace(cublas_.get(), cublas_workspace_.data(), kCublasWorkspaceBytes));
    RETURN_IF_ERROR(lt_gemm_.Init(cublas_workspace_.data(), kCublasWorkspaceBytes));
    for (Uploader& uploader : uploaders_) {
      ASSIGN_OR_RETURN(uploader.done, CreateEvent());
    }
    ASSIGN_OR_RETURN(error_flag_, AllocateOrExhausted(sizeof(int32_t), "error flag"));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(error_flag_.data(), 0, sizeof(int32_t), stream_.get()));
    ASSIGN_OR_RETURN(error_flag_host_, AllocatePinned(sizeof(int32_t)));
    return absl::OkStatus();
  }

  std::string name() const override { return "cuda"; }
  std::string device_description() const override {
    std::string text = absl::StrFormat(
        "GPU %d: %s, sm_%d%d, %.1f GiB, %d SMs; GEMMs: %s", options_.device, properties_.name,
        properties_.major, properties_.minor,
        static_cast<double>(properties_.totalGlobalMem) / (1 << 30),
        properties_.multiProcessorCount,
        options_.bf16_activations ? "bf16 activations" : "bf16 weights x split-fp32 activations");
    if (options_.graph_max_tokens > 0) {
      absl::StrAppend(&text, "; CUDA graphs for decode steps of <= ", options_.graph_max_tokens,
                      " tokens");
    }
    if (options_.selected_by_auto) text = absl::StrCat("auto: GPU found; ", text);
    return text;
  }
  std::string execution_summary() const override {
    const auto& counters = graphs_.counters();
    return absl::StrCat(
        "cuda graphs: ", counters.captured, " captured, ", counters.replayed, " steps replayed, ",
        counters.eager, " graphable steps run eagerly, ", counters.capture_failures,
        " capture failures; cuBLASLt: ", lt_gemm_.num_plans(), " GEMM shapes planned, ",
        lt_gemm_.num_unsupported(), " of them through cublasGemmEx");
  }

  // ---- memory ----------------------------------------------------------------------------------

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    graphs_.Clear();  // activations grow: graphs recorded on the old ones will not match again
    return AllocateOrExhausted(bytes, "activations");
  }
  absl::Status CopyToDevice(void* device_dst, const void* host_src, size_t bytes) override {
    RETURN_IF_ERROR(launches_.RunQueuedNow());
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(device_dst, host_src, bytes, cudaMemcpyHostToDevice, stream_.get()));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* host_dst, const void* device_src, size_t bytes) override {
    RETURN_IF_ERROR(launches_.RunQueuedNow());
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host_dst, device_src, bytes, cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
    return absl::OkStatus();
  }

  absl::Status PrepareWeights(const ModelWeights& weights) override;

  absl::Status AllocateKvCache(const KvCacheShape& shape) override {
    if (shape.head_dim <= 0 || shape.head_dim > kAttentionMaxHeadDim) {
      return absl::InvalidArgumentError(absl::StrCat("cuda: head_dim ", shape.head_dim,
                                                     " outside (0, ", kAttentionMaxHeadDim, "]"));
    }
    RETURN_IF_ERROR(ValidateKvCacheDType(shape, "cuda"));
    launches_.End();
    graphs_.Clear();
    keys_.clear();
    values_.clear();
    kv_pool_ = DeviceBuffer();
    const size_t layer_bytes = AlignUp(shape.layer_elements() * DTypeSize(shape.dtype));
    ASSIGN_OR_RETURN(kv_pool_,
                     AllocateOrExhausted(2 * layer_bytes * shape.num_layers, "the KV cache"));
    auto* base = static_cast<char*>(kv_pool_.data());
    for (int32_t layer = 0; layer < shape.num_layers; ++layer) {
      keys_.push_back(base + (2 * layer) * layer_bytes);
      values_.push_back(base + (2 * layer + 1) * layer_bytes);
    }
    kv_shape_ = shape;
    if (shape.head_dim > attention_configured_head_dim_) {
      CUDA_RETURN_IF_ERROR(ConfigureAttention(shape.head_dim));
      attention_configured_head_dim_ = shape.head_dim;
    }
    return absl::OkStatus();
  }

  // ---- per step --------------------------------------------------------------------------------

  absl::Status BeginStep(const ForwardBatch& batch) override;

  void AbandonStep() override { DropFailedStep().IgnoreError(); }

  absl::Status Synchronize() override {
    RETURN_IF_ERROR(RunStepLaunches());
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(error_flag_host_.data(), error_flag_.data(),
                                         sizeof(int32_t), cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
    // Routing statistics of the Route() calls since the last synchronisation.
    for (const PendingStats& pending : pending_stats_) {
      const double* slot = stats_host_.as<double>() + pending.slot * stats_stride_;
      for (size_t e = 0; e < pending.mass.size(); ++e) pending.mass[e] += slot[e];
      *pending.z_sum += slot[pending.mass.size()];
    }
    pending_stats_.clear();
    if (*error_flag_host_.as<int32_t>() != 0) {
      *error_flag_host_.as<int32_t>() = 0;
      CUDA_RETURN_IF_ERROR(cudaMemsetAsync(error_flag_.data(), 0, sizeof(int32_t), stream_.get()));
      return absl::InternalError("cuda: the router chose an expert id outside [0, experts)");
    }
    return absl::OkStatus();
  }

  // ---- ops -------------------------------------------------------------------------------------

  absl::Status Embed(const TensorView& table, Matrix out) override {
    ASSIGN_OR_RETURN(const DeviceWeight weight, Find(table));
    RETURN_IF_ERROR(CheckStepRows(out, "Embed"));
    const int64_t vocab = weight.rows;
    for (int64_t t = 0; t < out.rows; ++t) {
      const int32_t id = batch_->token_ids[t];
      if (id < 0 || id >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " outside the vocabulary [0, ", vocab, ")"));
      }
    }
    if (out.cols != weight.cols) return ShapeError("Embed", table, out.cols);
    const int32_t* ids = step_.token_ids;
    return launches_.Add("embed", {ids, weight.data, out.data, out.rows, out.stride}, [=, this] {
      return Launched(LaunchEmbed(ids, out.rows, weight.data, weight.type, weight.cols, out.data,
                                  out.stride, stream_.get()));
    });
  }

  absl::Status RmsNorm(Matrix x, const TensorView& weight, float eps, Matrix out) override {
    ASSIGN_OR_RETURN(const DeviceWeight w, Find(weight));
    if (w.rows * w.cols != x.cols || w.type != WeightType::kF32) {
      return ShapeError("RmsNorm", weight, x.cols);
    }
    const auto* w_data = static_cast<const float*>(w.data);
    return launches_.Add("rms_norm",
                         {x.data, x.stride, x.rows, x.cols, w_data, eps, out.data, out.stride},
                         [=, this] {
                           return Launched(LaunchRmsNorm(x.data, x.stride, x.rows, x.cols, w_data,
                                                         eps, out.data, out.stride, stream_.get()));
                         });
  }

  absl::Status Linear(Matrix x, const TensorView& weight, const TensorView* bias,
                      Matrix out) override {
    ASSIGN_OR_RETURN(const DeviceWeight w, Find(weight));
    const float* bias_data = nullptr;
    if (bias != nullptr) {
      ASSIGN_OR_RETURN(const DeviceWeight b, Find(*bias));
      if (b.rows * b.cols != out.cols) return ShapeError("Linear bias", *bias, out.cols);
      bias_data = static_cast<const float*>(b.data);
    }
    if (w.cols != x.cols || w.rows != out.cols || x.rows != out.rows) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda Linear: weight ", weight.name, " ", weight.ShapeString(), " does not map [", x.rows,
          ", ", x.cols, "] to [", out.rows, ", ", out.cols, "]"));
    }
    return MatMul(x, w.data, w.type, bias_data, out);
  }

  absl::Status Clamp(Matrix x, float limit) override {
    return launches_.Add("clamp", {x.data, x.stride, x.rows, x.cols, limit}, [=, this] {
      return Launched(LaunchClamp(x.data, x.stride, x.rows, x.cols, limit, stream_.get()));
    });
  }

  absl::Status Rope(Matrix x, int32_t head_dim, double theta) override {
    RETURN_IF_ERROR(CheckStepRows(x, "Rope"));
    if (head_dim <= 0 || head_dim % 2 != 0 || x.cols % head_dim != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda Rope: head_dim ", head_dim, " does not divide ", x.cols));
    }
    ASSIGN_OR_RETURN(const float* inv_freq, InverseFrequencies(head_dim, theta));
    const int32_t heads = static_cast<int32_t>(x.cols / head_dim);
    const int32_t* positions = step_.positions;
    return launches_.Add("rope", {x.data, x.stride, x.rows, heads, head_dim, positions, inv_freq},
                         [=, this] {
                           return Launched(LaunchRope(x.data, x.stride, x.rows, heads, head_dim,
                                                      positions, inv_freq, stream_.get()));
                         });
  }

  absl::Status WriteKv(int32_t layer, Matrix k, Matrix v) override {
    RETURN_IF_ERROR(CheckStepRows(k, "WriteKv"));
    const int64_t kv_dim = int64_t{kv_shape_.num_kv_heads} * kv_shape_.head_dim;
    if (layer < 0 || layer >= kv_shape_.num_layers || k.cols != kv_dim || v.cols != kv_dim ||
        v.rows != k.rows) {
      return absl::InvalidArgumentError(absl::StrCat("cuda WriteKv: layer ", layer, " k [", k.rows,
                                                     ", ", k.cols, "] v [", v.rows, ", ", v.cols,
                                                     "] vs kv_dim ", kv_dim));
    }
    const int32_t* slots = step_.slots;
    void* key_pool = keys_[layer];
    void* value_pool = values_[layer];
    const bool bf16 = kv_shape_.dtype == DType::kBF16;
    return launches_.Add(
        "write_kv", {k.data, k.stride, v.data, v.stride, k.rows, slots, key_pool, value_pool, bf16},
        [=, this] {
          return Launched(LaunchWriteKv(k.data, k.stride, v.data, v.stride, k.rows, kv_dim, slots,
                                        key_pool, value_pool, bf16, stream_.get()));
        });
  }

  absl::Status Attention(const AttentionParams& params, Matrix q, Matrix out) override;

  absl::Status Fill(Matrix x, float value) override {
    return launches_.Add("fill", {x.data, x.stride, x.rows, x.cols, value}, [=, this] {
      return Launched(LaunchFill(x.data, x.stride, x.rows, x.cols, value, stream_.get()));
    });
  }

  absl::Status AddInPlace(Matrix residual, Matrix x) override {
    return launches_.Add(
        "add", {residual.data, residual.stride, x.data, x.stride, residual.rows, residual.cols},
        [=, this] {
          return Launched(LaunchAdd(residual.data, residual.stride, x.data, x.stride, residual.rows,
                                    residual.cols, stream_.get()));
        });
  }

  absl::Status SwigluMlp(Matrix x, const MlpWeights& mlp, Matrix out) override;

  absl::Status Route(Matrix x, const TensorView& router, int32_t top_k, bool normalize_top_k,
                     RoutingResult result, std::span<double> probability_mass,
                     double* router_z_sum) override;

  absl::Status MoeExperts(Matrix x, std::span<const MlpWeights> experts, int32_t top_k,
                          RoutingResult routing, Matrix out) override;

  absl::Status AddGated(Matrix x, const TensorView& gate, Matrix shared, Matrix out) override {
    ASSIGN_OR_RETURN(const DeviceWeight g, Find(gate));
    if (g.rows * g.cols != x.cols) return ShapeError("AddGated", gate, x.cols);
    return launches_.Add("add_gated",
                         {x.data, x.stride, g.data, shared.data, shared.stride, out.data,
                          out.stride, x.rows, out.cols},
                         [=, this] {
                           return Launched(LaunchAddGated(
                               x.data, x.stride, g.data, g.type, shared.data, shared.stride,
                               out.data, out.stride, x.rows, out.cols, stream_.get()));
                         });
  }

  absl::Status GatherRows(Matrix x, std::span<const int32_t> rows, Matrix out) override {
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i] < 0 || rows[i] >= x.rows) {
        return absl::InvalidArgumentError(
            absl::StrCat("logits row ", rows[i], " outside the batch"));
      }
    }
    if (rows.empty()) return absl::OkStatus();
    const int32_t* device_rows = nullptr;
    if (batch_ != nullptr && rows.data() == batch_->logits_rows.data() &&
        rows.size() == batch_->logits_rows.size()) {
      device_rows = step_.logits_rows;
    } else {
      ASSIGN_OR_RETURN(void* uploaded, Upload(rows.data(), rows.size() * sizeof(int32_t)));
      device_rows = static_cast<const int32_t*>(uploaded);
    }
    const auto count = static_cast<int64_t>(rows.size());
    return launches_.Add(
        "gather_rows", {x.data, x.stride, device_rows, count, x.cols, out.data, out.stride},
        [=, this] {
          return Launched(LaunchGatherRows(x.data, x.stride, device_rows, count, x.cols, out.data,
                                           out.stride, stream_.get()));
        });
  }

  absl::Status RowArgMax(Matrix x, int32_t* out) override {
    return launches_.Add("row_argmax", {x.data, x.stride, x.rows, x.cols, out}, [=, this] {
      return Launched(LaunchRowArgMax(x.data, x.stride, x.rows, x.cols, out, stream_.get()));
    });
  }

 private:
  struct PendingStats {
    int slot;
    std::span<double> mass;
    double* z_sum;
  };

  // Device copies of the step's metadata (inside the current uploader).
  struct StepMetadata {
    const int32_t* token_ids = nullptr;
    const int32_t* positions = nullptr;
    const int32_t* slots = nullptr;
    const int32_t* block_table_offsets = nullptr;
    const int32_t* block_tables = nullptr;
    const int32_t* logits_rows = nullptr;
    // Attention tiles for one head grouping, built on first use in the step.
    int32_t tiles_heads = -1;
    int32_t tiles_kv_heads = -1;
    const AttentionTile* tiles = nullptr;
    int32_t num_tiles = 0;
  };

  static absl::Status Launched(cudaError_t error) {
    return CudaStatus(error, "kernel launch", __FILE__, __LINE__);
  }

  static absl::Status ShapeError(const char* op, const TensorView& view, int64_t expected) {
    return absl::InvalidArgumentError(absl::StrCat("cuda ", op, ": weight ", view.name, " ",
                                                   view.ShapeString(), " does not fit ", expected,
                                                   " features"));
  }

  absl::Status CheckStepRows(const Matrix& x, const char* op) const {
    if (batch_ == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("cuda ", op, ": no step begun"));
    }
    if (x.rows != batch_->num_tokens()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cuda ", op, ": ", x.rows, " rows for a step of ", batch_->num_tokens(), " tokens"));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<DeviceBuffer> AllocateOrExhausted(size_t bytes, const char* what) {
    void* data = nullptr;
    const cudaError_t error = cudaMalloc(&data, std::max<size_t>(bytes, 1));
    if (error != cudaSuccess) {
      cudaGetLastError();
      size_t free_bytes = 0, total_bytes = 0;
      cudaMemGetInfo(&free_bytes, &total_bytes);
      const std::string message = absl::StrCat(
          "cuda: cannot allocate ", bytes, " bytes for ", what, " on GPU ", options_.device, " (",
          free_bytes, " of ", total_bytes, " bytes free): ", cudaGetErrorString(error));
      return error == cudaErrorMemoryAllocation ? absl::ResourceExhaustedError(message)
                                                : absl::InternalError(message);
    }
    return DeviceBuffer(data, bytes, [](void* p) { cudaFree(p); });
  }

  absl::StatusOr<DeviceWeight> Find(const TensorView& view) const {
    const auto it = weights_.find(&view);
    if (it == weights_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("cuda: weight ", view.name, " was not uploaded by PrepareWeights"));
    }
    return it->second;
  }

  // Copies `bytes` of host data to device memory valid until the end of the step.
  absl::StatusOr<void*> Upload(const void* data, size_t bytes);

  absl::StatusOr<const float*> InverseFrequencies(int32_t head_dim, double theta);

  // out = x * W^T (+ bias), W: [out.cols, x.cols] of `type`. `exact`: fp32 activations even
  // with bf16_activations (the router: expert choices are discrete, as on the CPU backend).
  absl::Status MatMul(Matrix x, const void* w, WeightType type, const float* bias, Matrix out,
                      bool exact = false);

  // scratch.Ensure(bytes), after running the queued launches (they may use its memory, which
  // growing frees).
  absl::Status EnsureScratch(Scratch& scratch, size_t bytes) {
    if (scratch.Holds(bytes)) return absl::OkStatus();
    RETURN_IF_ERROR(launches_.RunQueuedNow());
    graphs_.Clear();  // recorded on the memory about to be freed
    return scratch.Ensure(bytes, stream_.get());
  }

  // What a step that failed before its Synchronize leaves behind: launches it queued (never
  // run), statistics slots pointing into its own (gone) output, and an expert-id error it
  // flagged, which is its own and not the next step's.
  absl::Status DropFailedStep() {
    launches_.End();
    if (pending_stats_.empty()) return absl::OkStatus();
    pending_stats_.clear();
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(error_flag_.data(), 0, sizeof(int32_t), stream_.get()));
    return absl::OkStatus();
  }

  // Runs a queueing step's launches (graph replay, capture, or one by one); see step_graphs.h.
  absl::Status RunStepLaunches() {
    if (!launches_.deferring()) return absl::OkStatus();
    // What the launches read besides their own key words: the step's metadata and the scratch.
    launches_.AppendKey({step_.token_ids,
                         step_.positions,
                         step_.slots,
                         step_.block_table_offsets,
                         step_.block_tables,
                         step_.logits_rows,
                         step_.tiles,
                         step_.num_tiles,
                         split_hi_.data(),
                         split_lo_.data(),
                         router_logits_.data(),
                         mlp_gate_.data(),
                         mlp_up_.data(),
                         moe_index_.data(),
                         moe_activation_.data(),
                         moe_expert_out_.data(),
                         attention_partial_.data(),
                         stats_device_.data(),
                         stats_host_.data(),
                         error_flag_.data()});
    const absl::Status status = graphs_.Run(launches_);
    launches_.End();
    return status;
  }

  // Records what `launches` enqueue on the stream into an executable graph.
  absl::StatusOr<GraphExec> Capture(const std::function<absl::Status()>& launches) {
    CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_.get(), cudaStreamCaptureModeThreadLocal));
    const absl::Status launched = launches();
    cudaGraph_t captured = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_.get(), &captured);
    const Graph graph(captured);
    if (!launched.ok() || ended != cudaSuccess) {
      cudaGetLastError();  // a failed capture leaves nothing behind; the step runs eagerly
      RETURN_IF_ERROR(launched);
      return CudaStatus(ended, "cudaStreamEndCapture", __FILE__, __LINE__);
    }
    cudaGraphExec_t exec = nullptr;
    CUDA_RETURN_IF_ERROR(cudaGraphInstantiate(&exec, graph.get(), 0));
    return GraphExec(exec);
  }

  // Attention's split of the key range for a step whose longest context is `max_context`.
  struct AttentionSplits {
    int32_t splits = 1;
    int32_t keys_per_split = 0;
  };
  AttentionSplits SplitKeys(int64_t blocks) const;

  CudaBackendOptions options_;
  cudaDeviceProp properties_;
  // Declared first: destroyed last (scratch frees are ordered on it).
  Stream stream_;
  CublasHandle cublas_;
  DeviceBuffer cublas_workspace_;  // shared by cuBLAS and cuBLASLt (one stream)
  LtGemm lt_gemm_;
  DeviceBuffer error_flag_;
  DeviceBuffer error_flag_host_;  // pinned

  // Weights.
  DeviceBuffer weight_arena_;
  absl::flat_hash_map<const TensorView*, DeviceWeight> weights_;
  absl::flat_hash_map<const MlpWeights*, ExpertTable> expert_tables_;  // by experts.data()

  // KV pool: [layers][K, V][blocks, block_size, kv_heads, head_dim].
  KvCacheShape kv_shape_;
  DeviceBuffer kv_pool_;
  std::vector<void*> keys_, values_;  // per layer: float or bf16 bits (kv_shape_.dtype)
  int32_t attention_configured_head_dim_ = 0;

  // Step.
  StepLaunches launches_;
  StepGraphCache<GraphExec> graphs_;
  const ForwardBatch* batch_ = nullptr;
  int32_t max_context_ = 0;
  StepMetadata step_;
  std::array<Uploader, 2> uploaders_;
  int current_uploader_ = 0;

  // Routing statistics: per pending Route() a slot of [experts + 1] doubles.
  Scratch stats_device_;
  DeviceBuffer stats_host_;  // pinned
  int64_t stats_stride_ = 0;
  std::vector<PendingStats> pending_stats_;

  std::map<std::pair<int32_t, double>, DeviceBuffer> inverse_frequencies_;

  // Scratch.
  Scratch split_hi_, split_lo_;  // [rows, k] bf16
  Scratch router_logits_;        // [tokens, experts]
  Scratch mlp_gate_, mlp_up_;    // [tokens, ffn]
  Scratch moe_index_;            // sort outputs (int32)
  Scratch moe_activation_;       // [assignments, ffn]
  Scratch moe_expert_out_;       // [assignments, hidden]
  Scratch attention_partial_;    // [splits, tokens, heads, head_dim + 2]
};

// ---- weights ---------------------------------------------------------------------------------

absl::Status CudaBackend::PrepareWeights(const ModelWeights& model) {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));
  launches_.End();
  graphs_.Clear();
  weights_.clear();
  expert_tables_.clear();
  weight_arena_ = DeviceBuffer();

  // Placement: every tensor's offset in one arena and its device type.
  struct Placement {
    const TensorView* view;
    size_t offset;
    WeightType type;
  };
  std::vector<Placement> placements;
  absl::flat_hash_map<const TensorView*, size_t> placed;
  size_t arena_bytes = 0;
  auto device_type = [](const TensorView& view) {
    return view.dtype == DType::kBF16 && view.shape.size() >= 2 ? WeightType::kBF16
                                                                : WeightType::kF32;
  };
  auto check = [](const TensorView& view) -> absl::Status {
    if (!IsFloatingWeightType(view.dtype)) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda: weight ", view.name, " has dtype ", DTypeName(view.dtype)));
    }
    return absl::OkStatus();
  };
  auto place_at = [&](const TensorView* view, size_t offset, WeightType type) {
    placed[view] = placements.size();
    placements.push_back({view, offset, type});
    const int64_t rows = view->shape.empty() ? 1 : (view->shape.size() == 1 ? 1 : view->shape[0]);
    weights_[view] = {nullptr, type, rows, view->num_elements() / std::max<int64_t>(rows, 1)};
  };
  auto place = [&](const TensorView* view) -> absl::Status {
    if (view == nullptr || placed.contains(view)) return absl::OkStatus();
    RETURN_IF_ERROR(check(*view));
    const WeightType type = device_type(*view);
    place_at(view, arena_bytes, type);
    arena_bytes += AlignUp(view->num_elements() * (type == WeightType::kBF16 ? 2 : 4));
    return absl::OkStatus();
  };
  auto place_mlp = [&](const MlpWeights& mlp) -> absl::Status {
    RETURN_IF_ERROR(place(mlp.gate));
    RETURN_IF_ERROR(place(mlp.up));
    return place(mlp.down);
  };
  // Experts of a layer: three contiguous [experts, ...] blocks.
  std::vector<std::pair<const MlpWeights*, std::array<size_t, 3>>> expert_blocks;
  auto place_experts = [&](const std::vector<MlpWeights>& experts) -> absl::Status {
    if (experts.empty()) return absl::OkStatus();
    const MlpWeights& first = experts.front();
    if (first.gate == nullptr || first.up == nullptr || first.down == nullptr) {
      return absl::InvalidArgumentError("cuda: an expert lacks a gate, up or down weight");
    }
    const WeightType type = device_type(*first.gate);
    const size_t element = type == WeightType::kBF16 ? 2 : 4;
    std::array<size_t, 3> bases{};
    std::array<const TensorView*, 3> templates{first.gate, first.up, first.down};
    for (int m = 0; m < 3; ++m) {
      bases[m] = arena_bytes;
      arena_bytes += AlignUp(experts.size() * templates[m]->num_elements() * element);
    }
    for (size_t e = 0; e < experts.size(); ++e) {
      const std::array<const TensorView*, 3> views{experts[e].gate, experts[e].up, experts[e].down};
      for (int m = 0; m < 3; ++m) {
        const TensorView* view = views[m];
        if (view == nullptr || view->shape != templates[m]->shape || device_type(*view) != type) {
          return absl::InvalidArgumentError(
              absl::StrCat("cuda: experts of one layer differ in shape or dtype (",
                           view != nullptr ? view->name : std::string("missing"), ")"));
        }
        RETURN_IF_ERROR(check(*view));
        if (placed.contains(view)) {
          return absl::InvalidArgumentError(
              absl::StrCat("cuda: expert weight ", view->name, " is shared"));
        }
        place_at(view, bases[m] + e * view->num_elements() * element, type);
      }
    }
    expert_blocks.push_back({experts.data(), bases});
    return absl::OkStatus();
  };

  RETURN_IF_ERROR(place(model.embed_tokens));
  RETURN_IF_ERROR(place(model.final_norm));
  RETURN_IF_ERROR(place(model.lm_head));
  for (const LayerWeights& layer : model.layers) {
    for (const TensorView* view :
         {layer.input_norm, layer.post_attention_norm, layer.q, layer.k, layer.v, layer.o,
          layer.q_bias, layer.k_bias, layer.v_bias, layer.o_bias, layer.q_norm, layer.k_norm,
          layer.router, layer.shared_expert_gate}) {
      RETURN_IF_ERROR(place(view));
    }
    RETURN_IF_ERROR(place_experts(layer.experts));
    RETURN_IF_ERROR(place_mlp(layer.shared_expert));
    RETURN_IF_ERROR(place_mlp(layer.dense_mlp));
  }

  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (arena_bytes > free_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cuda: the weights need ", arena_bytes, " bytes of device memory; GPU ",
                     options_.device, " has ", free_bytes, " of ", total_bytes, " bytes free"));
  }
  ASSIGN_OR_RETURN(weight_arena_, AllocateOrExhausted(arena_bytes, "the weights"));
  auto* arena = static_cast<char*>(weight_arena_.data());
  for (const Placement& p : placements) weights_[p.view].data = arena + p.offset;
  for (const auto& [experts, bases] : expert_blocks) {
    const DeviceWeight& gate = weights_[experts->gate];
    expert_tables_[experts] = ExpertTable{
        arena + bases[0], arena + bases[1], arena + bases[2], gate.type, 0, gate.rows, gate.cols};
  }
  for (const LayerWeights& layer : model.layers) {
    if (!layer.experts.empty()) {
      expert_tables_[layer.experts.data()].experts = static_cast<int64_t>(layer.experts.size());
    }
  }

  // Upload through two pinned staging halves: convert into one while the other is copied.
  const size_t staging_half = std::min(kStagingBytes, std::max<size_t>(arena_bytes, 4096));
  ASSIGN_OR_RETURN(DeviceBuffer staging, AllocatePinned(2 * staging_half));
  std::array<Event, 2> staged;
  std::array<bool, 2> in_flight{false, false};
  for (Event& event : staged) {
    ASSIGN_OR_RETURN(event, CreateEvent());
  }
  int half = 0;
  for (const Placement& p : placements) {
    const TensorView& view = *p.view;
    const int64_t elements = view.num_elements();
    const size_t out_element = p.type == WeightType::kBF16 ? 2 : 4;
    const int64_t chunk_elements = static_cast<int64_t>(staging_half / out_element);
    for (int64_t begin = 0; begin < elements; begin += chunk_elements) {
      const int64_t count = std::min(chunk_elements, elements - begin);
      if (in_flight[half]) CUDA_RETURN_IF_ERROR(cudaEventSynchronize(staged[half].get()));
      char* host = staging.as<char>() + half * staging_half;
      if (p.type == WeightType::kBF16 || view.dtype == DType::kF32) {
        std::memcpy(host, view.data + begin * out_element, count * out_element);
      } else {
        auto* dst = reinterpret_cast<float*>(host);
        const auto* src = reinterpret_cast<const uint16_t*>(view.data) + begin;
        if (view.dtype == DType::kBF16) {
          for (int64_t i = 0; i < count; ++i) dst[i] = Bf16ToFloat(src[i]);
        } else {
          for (int64_t i = 0; i < count; ++i) dst[i] = F16ToFloat(src[i]);
        }
      }
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(arena + p.offset + begin * out_element, host,
                                           count * out_element, cudaMemcpyHostToDevice,
                                           stream_.get()));
      CUDA_RETURN_IF_ERROR(cudaEventRecord(staged[half].get(), stream_.get()));
      in_flight[half] = true;
      half ^= 1;
    }
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_.get()));

  // Statistics slots for the largest expert count.
  int64_t max_experts = 0;
  for (const LayerWeights& layer : model.layers) {
    max_experts = std::max<int64_t>(max_experts, static_cast<int64_t>(layer.experts.size()));
  }
  if (max_experts + 1 > stats_stride_) {
    stats_stride_ = max_experts + 1;
    ASSIGN_OR_RETURN(stats_host_,
                     AllocatePinned(kMaxPendingStats * stats_stride_ * sizeof(double)));
    RETURN_IF_ERROR(
        stats_device_.Ensure(kMaxPendingStats * stats_stride_ * sizeof(double), stream_.get()));
  }
  return absl::OkStatus();
}

// ---- step ------------------------------------------------------------------------------------

absl::StatusOr<void*> CudaBackend::Upload(const void* data, size_t bytes) {
  Uploader& up = uploaders_[current_uploader_];
  const size_t aligned = AlignUp(bytes);
  char* host = nullptr;
  char* device = nullptr;
  if (up.used + aligned <= up.host.bytes()) {
    host = up.host.as<char>() + up.used;
    device = up.device.as<char>() + up.used;
    up.used += aligned;
  } else {
    // Overflow area: a fresh pair, kept until this uploader is reused.
    const size_t size = std::max<size_t>(aligned, size_t{1} << 20);
    if (up.overflow.empty() || up.overflow_used + aligned > up.overflow.back().first.bytes()) {
      ASSIGN_OR_RETURN(DeviceBuffer extra_host, AllocatePinned(size));
      ASSIGN_OR_RETURN(DeviceBuffer extra_device, AllocateOrExhausted(size, "step metadata"));
      up.overflow.emplace_back(std::move(extra_host), std::move(extra_device));
      up.overflow_used = 0;
    }
    host = up.overflow.back().first.as<char>() + up.overflow_used;
    device = up.overflow.back().second.as<char>() + up.overflow_used;
    up.overflow_used += aligned;
  }
  std::memcpy(host, data, bytes);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_.get()));
  return static_cast<void*>(device);
}

absl::Status CudaBackend::BeginStep(const ForwardBatch& batch) {
  CUDA_RETURN_IF_ERROR(cudaSetDevice(options_.device));
  RETURN_IF_ERROR(DropFailedStep());  // for callers that did not AbandonStep() a failed step
  const int64_t tokens = batch.num_tokens();
  if (keys_.empty()) return absl::FailedPreconditionError("cuda: no KV cache allocated");
  std::vector<int32_t> token_sequence;  // [tokens] sequence index, checked by ValidateBatch
  RETURN_IF_ERROR(ValidateBatch(batch, kv_shape_, token_sequence));
  int32_t max_context = 0;
  for (const SequenceChunk& chunk : batch.sequences) {
    max_context = std::max(max_context, chunk.context_len);
  }
  // Decode-only steps queue their launches for a graph.
  const bool decode_only =
      std::all_of(batch.sequences.begin(), batch.sequences.end(),
                  [](const SequenceChunk& chunk) { return chunk.num_tokens == 1; });
  launches_.Begin(decode_only && tokens <= options_.graph_max_tokens);

  // Mark the end of the previous step's work, switch to the other uploader and wait until the
  // step that last used it (two steps ago) is done with its metadata.
  if (batch_ != nullptr) {
    CUDA_RETURN_IF_ERROR(cudaEventRecord(uploaders_[current_uploader_].done.get(), stream_.get()));
    uploaders_[current_uploader_].pending = true;
  }
  current_uploader_ ^= 1;
  Uploader& up = uploaders_[current_uploader_];
  if (up.pending) CUDA_RETURN_IF_ERROR(cudaEventSynchronize(up.done.get()));
  up.pending = false;
  // Block tables first, in a region rounded up to a power of two (at least 1024 entries): the
  // other arrays then sit at offsets that change with the step's token, sequence and logits-row
  // counts, not with every block a sequence grows into, so a decode step's launches (and its
  // CUDA graph) stay the same from one token to the next.
  size_t table_entries = 0;
  for (const SequenceChunk& chunk : batch.sequences) table_entries += chunk.block_table.size();
  size_t table_region = 1024;
  while (table_region < table_entries) table_region *= 2;
  const size_t needed =
      (table_region + batch.sequences.size() + 4 * tokens + batch.logits_rows.size()) *
          sizeof(int32_t) +
      // attention tiles and a few small uploads
      2 * tokens * sizeof(AttentionTile) + 16 * kAlignment;
  size_t capacity = up.host.bytes();
  for (const auto& extra : up.overflow) capacity += extra.first.bytes();
  if (needed > up.host.bytes() || !up.overflow.empty()) {
    up.overflow.clear();
    up.overflow_used = 0;
    const size_t size = std::max(needed, capacity) * 3 / 2;
    graphs_.Clear();  // recorded on the metadata area about to be freed
    up.host = DeviceBuffer();
    up.device = DeviceBuffer();
    ASSIGN_OR_RETURN(up.host, AllocatePinned(size));
    ASSIGN_OR_RETURN(up.device, AllocateOrExhausted(size, "step metadata"));
  }
  up.used = 0;

  // One packed upload: block tables, token ids, positions, slots, block-table offsets, logits
  // rows.
  std::vector<int32_t> packed;
  packed.reserve(needed / sizeof(int32_t));
  auto append = [&](const std::vector<int32_t>& values) {
    const size_t at = packed.size();
    packed.insert(packed.end(), values.begin(), values.end());
    return at;
  };
  const size_t tables_at = 0;
  for (const SequenceChunk& chunk : batch.sequences) append(chunk.block_table);
  packed.resize(table_region, 0);
  const size_t ids_at = append(batch.token_ids);
  const size_t positions_at = append(batch.positions);
  const size_t slots_at = append(batch.slot_mapping);
  const size_t offsets_at = packed.size();
  int32_t offset = 0;
  for (const SequenceChunk& chunk : batch.sequences) {
    packed.push_back(offset);
    offset += static_cast<int32_t>(chunk.block_table.size());
  }
  const size_t logits_at = append(batch.logits_rows);
  packed.push_back(0);  // never empty
  ASSIGN_OR_RETURN(void* device, Upload(packed.data(), packed.size() * sizeof(int32_t)));
  const auto* base = static_cast<const int32_t*>(device);
  step_ = StepMetadata{};
  step_.token_ids = base + ids_at;
  step_.positions = base + positions_at;
  step_.slots = base + slots_at;
  step_.block_table_offsets = base + offsets_at;
  step_.block_tables = base + tables_at;
  step_.logits_rows = base + logits_at;
  batch_ = &batch;
  max_context_ = max_context;
  return absl::OkStatus();
}

absl::StatusOr<const float*> CudaBackend::InverseFrequencies(int32_t head_dim, double theta) {
  const auto key = std::make_pair(head_dim, theta);
  if (auto it = inverse_frequencies_.find(key); it != inverse_frequencies_.end()) {
    return it->second.as<const float>();
  }
  // As transformers computes it: float32 inv_freq = 1 / theta^(2i / head_dim).
  const int32_t half = head_dim / 2;
  std::vector<float> values(half);
  for (int32_t i = 0; i < half; ++i) {
    values[i] = static_cast<float>(
        1.0 / std::pow(theta, static_cast<double>(static_cast<float>(2 * i) / head_dim)));
  }
  ASSIGN_OR_RETURN(DeviceBuffer buffer, AllocateOrExhausted(half * sizeof(float), "RoPE table"));
  RETURN_IF_ERROR(CopyToDevice(buffer.data(), values.data(), half * sizeof(float)));
  const float* data = buffer.as<const float>();
  inverse_frequencies_.emplace(key, std::move(buffer));
  return data;
}

// ---- matrix products -------------------------------------------------------------------------

absl::Status CudaBackend::MatMul(Matrix x, const void* w, WeightType type, const float* bias,
                                 Matrix out, bool exact) {
  const int64_t m = x.rows, n = out.cols, k = x.cols;
  if (m == 0 || n == 0) return absl::OkStatus();
  if (m <= options_.gemv_max_rows) {
    GroupedGemvArgs args;
    args.x = x.data;
    args.x_stride = x.stride;
    args.rows = m;
    args.w_gate = w;
    args.type = type;
    args.bias = bias;
    args.n = n;
    args.k = k;
    args.out = out.data;
    args.out_stride = out.stride;
    return launches_.Add("gemv", {x.data, x.stride, m, k, w, type, bias, n, out.data, out.stride},
                         [args, this] { return Launched(LaunchGroupedGemv(args, stream_.get())); });
  }
  constexpr int64_t kIntMax = 0x7fffffff;
  if (m > kIntMax || n > kIntMax || k > kIntMax || out.stride > kIntMax || x.stride > kIntMax) {
    return absl::InvalidArgumentError("cuda: matrix too large for cuBLAS");
  }
  // Row-major out[m, n] = x[m, k] W[n, k]^T is column-major out^T[n, m] = W^T x^T: A = W (k x n
  // column-major, transposed), B = x (k x m column-major).
  if (type == WeightType::kF32) {
    RETURN_IF_ERROR(launches_.Add(
        "sgemm", {x.data, x.stride, m, k, w, n, out.data, out.stride}, [=, this]() -> absl::Status {
          const float one = 1.0f, zero = 0.0f;
          CUBLAS_RETURN_IF_ERROR(cublasSgemm(cublas_.get(), CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one,
                                             static_cast<const float*>(w), k, x.data, x.stride,
                                             &zero, out.data, out.stride));
          return absl::OkStatus();
        }));
    if (bias == nullptr) return absl::OkStatus();
    return launches_.Add("add_bias", {out.data, out.stride, m, n, bias}, [=, this] {
      return Launched(LaunchAddBias(out.data, out.stride, m, n, bias, stream_.get()));
    });
  }
  // x = hi + lo in bf16 (lo dropped with bf16 activations): a cuBLASLt GEMM each, the second
  // accumulating, the last adding the bias in its epilogue.
  const bool hi_only = options_.bf16_activations && !exact;
  const size_t split_bytes = static_cast<size_t>(m * k) * sizeof(uint16_t);
  RETURN_IF_ERROR(EnsureScratch(split_hi_, split_bytes));
  if (!hi_only) RETURN_IF_ERROR(EnsureScratch(split_lo_, split_bytes));
  uint16_t* hi = split_hi_.as<uint16_t>();
  uint16_t* lo = hi_only ? nullptr : split_lo_.as<uint16_t>();
  return launches_.Add(
      "bf16_gemm", {x.data, x.stride, m, k, w, n, out.data, out.stride, hi, lo, bias},
      [=, this]() -> absl::Status {
        RETURN_IF_ERROR(Launched(LaunchSplitBf16(x.data, x.stride, m, k, hi, lo, stream_.get())));
        auto product = [&](const uint16_t* part, bool accumulate,
                           const float* with_bias) -> absl::Status {
          const LtGemmArgs args{.x = part,
                                .w = w,
                                .m = m,
                                .n = n,
                                .k = k,
                                .out = out.data,
                                .out_stride = out.stride,
                                .bias = with_bias,
                                .accumulate = accumulate};
          ASSIGN_OR_RETURN(const bool ran, lt_gemm_.Run(args, stream_.get()));
          if (ran) return absl::OkStatus();
          // cuBLASLt has no algorithm for this shape and alignment: cuBLAS, and the bias apart.
          const float one = 1.0f, zero = 0.0f;
          CUBLAS_RETURN_IF_ERROR(cublasGemmEx(cublas_.get(), CUBLAS_OP_T, CUBLAS_OP_N, n, m, k,
                                              &one, w, CUDA_R_16BF, k, part, CUDA_R_16BF, k,
                                              accumulate ? &one : &zero, out.data, CUDA_R_32F,
                                              out.stride, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
          if (with_bias == nullptr) return absl::OkStatus();
          return Launched(LaunchAddBias(out.data, out.stride, m, n, with_bias, stream_.get()));
        };
        RETURN_IF_ERROR(product(hi, /*accumulate=*/false, hi_only ? bias : nullptr));
        if (hi_only) return absl::OkStatus();
        return product(lo, /*accumulate=*/true, bias);
      });
}

absl::Status CudaBackend::SwigluMlp(Matrix x, const MlpWeights& mlp, Matrix out) {
  ASSIGN_OR_RETURN(const DeviceWeight gate, Find(*mlp.gate));
  ASSIGN_OR_RETURN(const DeviceWeight up, Find(*mlp.up));
  ASSIGN_OR_RETURN(const DeviceWeight down, Find(*mlp.down));
  const int64_t ffn = gate.rows, hidden = x.cols;
  if (gate.cols != hidden || up.rows != ffn || up.cols != hidden || down.rows != out.cols ||
      down.cols != ffn || up.type != gate.type) {
    return absl::InvalidArgumentError(absl::StrCat("cuda SwigluMlp: weights ", mlp.gate->name,
                                                   " / ", mlp.up->name, " / ", mlp.down->name,
                                                   " do not fit hidden ", hidden));
  }
  if (x.rows == 0) return absl::OkStatus();
  RETURN_IF_ERROR(EnsureScratch(mlp_gate_, x.rows * ffn * sizeof(float)));
  const Matrix activation = Matrix::Dense(mlp_gate_.as<float>(), x.rows, ffn);
  if (x.rows <= options_.gemv_max_rows) {
    GroupedGemvArgs args;
    args.x = x.data;
    args.x_stride = x.stride;
    args.rows = x.rows;
    args.w_gate = gate.data;
    args.w_up = up.data;
    args.type = gate.type;
    args.n = ffn;
    args.k = hidden;
    args.out = activation.data;
    args.out_stride = ffn;
    args.gate_up = true;
    RETURN_IF_ERROR(launches_.Add(
        "gate_up_gemv", {x.data, x.stride, x.rows, gate.data, up.data, activation.data},
        [args, this] { return Launched(LaunchGroupedGemv(args, stream_.get())); }));
  } else {
    RETURN_IF_ERROR(EnsureScratch(mlp_up_, x.rows * ffn * sizeof(float)));
    const Matrix up_out = Matrix::Dense(mlp_up_.as<float>(), x.rows, ffn);
    RETURN_IF_ERROR(MatMul(x, gate.data, gate.type, nullptr, activation));
    RETURN_IF_ERROR(MatMul(x, up.data, up.type, nullptr, up_out));
    RETURN_IF_ERROR(
        launches_.Add("silu_mul", {activation.data, up_out.data, x.rows, ffn}, [=, this] {
          return Launched(
              LaunchSiluMul(activation.data, ffn, up_out.data, ffn, x.rows, ffn, stream_.get()));
        }));
  }
  return MatMul(activation, down.data, down.type, nullptr, out);
}

// ---- router and experts ----------------------------------------------------------------------

absl::Status CudaBackend::Route(Matrix x, const TensorView& router, int32_t top_k,
                                bool normalize_top_k, RoutingResult result,
                                std::span<double> probability_mass, double* router_z_sum) {
  ASSIGN_OR_RETURN(const DeviceWeight w, Find(router));
  const int64_t experts = w.rows;
  if (w.cols != x.cols || top_k <= 0 || top_k > experts ||
      static_cast<int64_t>(probability_mass.size()) != experts || router_z_sum == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda Route: router ", router.name, " ", router.ShapeString(), ", top_k ",
                     top_k, ", ", probability_mass.size(), " statistics slots, hidden ", x.cols));
  }
  if (experts + 1 > stats_stride_) {
    return absl::FailedPreconditionError("cuda Route: more experts than PrepareWeights saw");
  }
  if (static_cast<int>(pending_stats_.size()) >= kMaxPendingStats) RETURN_IF_ERROR(Synchronize());
  RETURN_IF_ERROR(EnsureScratch(router_logits_, x.rows * experts * sizeof(float)));
  const Matrix logits = Matrix::Dense(router_logits_.as<float>(), x.rows, experts);
  RETURN_IF_ERROR(MatMul(x, w.data, w.type, nullptr, logits, /*exact=*/true));

  const int slot = static_cast<int>(pending_stats_.size());
  double* device_stats = stats_device_.as<double>() + slot * stats_stride_;
  double* host_stats = stats_host_.as<double>() + slot * stats_stride_;
  const size_t stats_bytes = (experts + 1) * sizeof(double);
  const auto num_experts = static_cast<int32_t>(experts);
  RETURN_IF_ERROR(launches_.Add(
      "route",
      {logits.data, x.rows, num_experts, top_k, normalize_top_k, result.expert_ids,
       result.expert_weights, device_stats, host_stats},
      [=, this]() -> absl::Status {
        CUDA_RETURN_IF_ERROR(cudaMemsetAsync(device_stats, 0, stats_bytes, stream_.get()));
        RETURN_IF_ERROR(Launched(LaunchRoute(logits.data, x.rows, num_experts, top_k,
                                             normalize_top_k, result.expert_ids,
                                             result.expert_weights, device_stats, stream_.get())));
        CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_stats, device_stats, stats_bytes,
                                             cudaMemcpyDeviceToHost, stream_.get()));
        return absl::OkStatus();
      }));
  pending_stats_.push_back({slot, probability_mass, router_z_sum});
  return absl::OkStatus();
}

absl::Status CudaBackend::MoeExperts(Matrix x, std::span<const MlpWeights> experts, int32_t top_k,
                                     RoutingResult routing, Matrix out) {
  const auto it = expert_tables_.find(experts.data());
  if (it == expert_tables_.end() || it->second.experts != static_cast<int64_t>(experts.size())) {
    return absl::FailedPreconditionError(
        "cuda MoeExperts: these experts were not uploaded by PrepareWeights");
  }
  const ExpertTable& table = it->second;
  if (table.hidden != x.cols || out.cols != x.cols || out.rows != x.rows || top_k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("cuda MoeExperts: x [", x.rows, ", ", x.cols,
                                                   "] vs experts of hidden ", table.hidden));
  }
  const int64_t tokens = x.rows;
  const int64_t assignments = tokens * top_k;
  if (assignments == 0) return absl::OkStatus();
  if (assignments > 0x7fffffff / 2) {
    return absl::InvalidArgumentError("cuda MoeExperts: too many assignments");
  }
  const int32_t num_experts = static_cast<int32_t>(table.experts);
  const int32_t max_groups = static_cast<int32_t>(std::min<int64_t>(num_experts, assignments));
  const int32_t max_tiles = static_cast<int32_t>(assignments / kGemmTileRows + max_groups + 1);

  // Index scratch: offsets, row_token, row_of_assignment, touched, counts, tile lists.
  const int64_t index_elements =
      (num_experts + 1) + 2 * assignments + num_experts + 2 + 2 * int64_t{max_tiles};
  RETURN_IF_ERROR(EnsureScratch(moe_index_, index_elements * sizeof(int32_t)));
  int32_t* cursor = moe_index_.as<int32_t>();
  auto take = [&](int64_t count) {
    int32_t* at = cursor;
    cursor += count;
    return at;
  };
  MoeSortArgs sort;
  sort.expert_ids = routing.expert_ids;
  sort.assignments = assignments;
  sort.top_k = top_k;
  sort.experts = num_experts;
  sort.offsets = take(num_experts + 1);
  sort.row_token = take(assignments);
  sort.row_of_assignment = take(assignments);
  sort.touched = take(num_experts);
  sort.num_touched = take(1);
  sort.num_tiles = take(1);
  sort.tile_expert = take(max_tiles);
  sort.tile_row = take(max_tiles);
  sort.error_flag = error_flag_.as<int32_t>();
  RETURN_IF_ERROR(launches_.Add(
      "moe_sort",
      {routing.expert_ids, assignments, top_k, num_experts, sort.offsets, sort.error_flag},
      [sort, this] { return Launched(LaunchMoeSort(sort, stream_.get())); }));

  const int64_t ffn = table.ffn, hidden = table.hidden;
  RETURN_IF_ERROR(EnsureScratch(moe_activation_, assignments * ffn * sizeof(float)));
  RETURN_IF_ERROR(EnsureScratch(moe_expert_out_, assignments * hidden * sizeof(float)));
  float* activation = moe_activation_.as<float>();
  float* expert_out = moe_expert_out_.as<float>();

  const bool aligned = x.stride % 4 == 0 && reinterpret_cast<uintptr_t>(x.data) % 16 == 0 &&
                       hidden % 8 == 0 && ffn % 8 == 0;
  const bool use_gemm = table.type == WeightType::kBF16 && aligned &&
                        assignments > int64_t{options_.moe_gemv_max_rows} * max_groups;
  if (use_gemm) {
    GroupedGemmArgs args;
    args.offsets = sort.offsets;
    args.tile_expert = sort.tile_expert;
    args.tile_row = sort.tile_row;
    args.num_tiles = sort.num_tiles;
    args.max_tiles = max_tiles;
    args.single_pass = options_.bf16_activations;
    // gate/up: act[row] = silu(x[token] . gate) * (x[token] . up)
    args.x = x.data;
    args.x_stride = x.stride;
    args.row_map = sort.row_token;
    args.w_gate = static_cast<const uint16_t*>(table.gate);
    args.w_up = static_cast<const uint16_t*>(table.up);
    args.expert_stride = ffn * hidden;
    args.n = ffn;
    args.k = hidden;
    args.out = activation;
    args.out_stride = ffn;
    args.gate_up = true;
    RETURN_IF_ERROR(launches_.Add(
        "moe_gemm", {args.x, args.x_stride, args.w_gate, args.n, args.k, args.out, args.gate_up},
        [args, this] { return Launched(LaunchGroupedGemm(args, stream_.get())); }));
    // down: expert_out[row] = act[row] . down
    args.x = activation;
    args.x_stride = ffn;
    args.row_map = nullptr;
    args.w_gate = static_cast<const uint16_t*>(table.down);
    args.w_up = nullptr;
    args.expert_stride = hidden * ffn;
    args.n = hidden;
    args.k = ffn;
    args.out = expert_out;
    args.out_stride = hidden;
    args.gate_up = false;
    RETURN_IF_ERROR(launches_.Add(
        "moe_gemm", {args.x, args.x_stride, args.w_gate, args.n, args.k, args.out, args.gate_up},
        [args, this] { return Launched(LaunchGroupedGemm(args, stream_.get())); }));
  } else {
    GroupedGemvArgs args;
    args.offsets = sort.offsets;
    args.touched = sort.touched;
    args.num_touched = sort.num_touched;
    args.max_groups = max_groups;
    // One token: its top-k experts are distinct, so every group has one row.
    args.max_group_rows = tokens == 1 ? 1 : 0;
    args.type = table.type;
    args.x = x.data;
    args.x_stride = x.stride;
    args.row_map = sort.row_token;
    args.w_gate = table.gate;
    args.w_up = table.up;
    args.expert_stride = ffn * hidden;
    args.n = ffn;
    args.k = hidden;
    args.out = activation;
    args.out_stride = ffn;
    args.gate_up = true;
    RETURN_IF_ERROR(
        launches_.Add("moe_gemv",
                      {args.x, args.x_stride, args.w_gate, args.n, args.k, args.out, args.gate_up,
                       args.max_groups, args.max_group_rows},
                      [args, this] { return Launched(LaunchGroupedGemv(args, stream_.get())); }));
    args.x = activation;
    args.x_stride = ffn;
    args.row_map = nullptr;
    args.w_gate = table.down;
    args.w_up = nullptr;
    args.expert_stride = hidden * ffn;
    args.n = hidden;
    args.k = ffn;
    args.out = expert_out;
    args.out_stride = hidden;
    args.gate_up = false;
    RETURN_IF_ERROR(
        launches_.Add("moe_gemv",
                      {args.x, args.x_stride, args.w_gate, args.n, args.k, args.out, args.gate_up,
                       args.max_groups, args.max_group_rows},
                      [args, this] { return Launched(LaunchGroupedGemv(args, stream_.get())); }));
  }
  const int32_t* row_of_assignment = sort.row_of_assignment;
  return launches_.Add("moe_combine",
                       {expert_out, row_of_assignment, routing.expert_weights, tokens, top_k,
                        hidden, out.data, out.stride},
                       [=, this] {
                         return Launched(LaunchMoeCombine(
                             expert_out, hidden, row_of_assignment, routing.expert_weights, tokens,
                             top_k, hidden, out.data, out.stride, stream_.get()));
                       });
}

// ---- attention -------------------------------------------------------------------------------

absl::Status CudaBackend::Attention(const AttentionParams& params, Matrix q, Matrix out) {
  RETURN_IF_ERROR(CheckStepRows(q, "Attention"));
  if (params.num_kv_heads <= 0 || params.num_heads % params.num_kv_heads != 0 ||
      params.head_dim != kv_shape_.head_dim || params.num_kv_heads != kv_shape_.num_kv_heads ||
      q.cols != int64_t{params.num_heads} * params.head_dim || out.cols != q.cols ||
      params.layer < 0 || params.layer >= kv_shape_.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda Attention: ", params.num_heads, " heads / ", params.num_kv_heads,
                     " KV heads of dim ", params.head_dim, " do not fit q [", q.rows, ", ", q.cols,
                     "] and the KV cache (layer ", params.layer, ")"));
  }
  const int32_t group = params.num_heads / params.num_kv_heads;
  if (step_.tiles_heads != params.num_heads || step_.tiles_kv_heads != params.num_kv_heads) {
    std::vector<AttentionTile> tiles;
    const int32_t heads_per_tile = std::min(group, kAttentionTileRows);
    const int32_t tokens_per_tile = std::max(1, kAttentionTileRows / group);
    for (size_t s = 0; s < batch_->sequences.size(); ++s) {
      const SequenceChunk& chunk = batch_->sequences[s];
      for (int32_t t = 0; t < chunk.num_tokens; t += tokens_per_tile) {
        for (int32_t h = 0; h < group; h += heads_per_tile) {
          tiles.push_back({static_cast<int32_t>(s), chunk.token_begin + t,
                           std::min(tokens_per_tile, chunk.num_tokens - t), h,
                           std::min(heads_per_tile, group - h)});
        }
      }
    }
    if (tiles.empty()) return absl::OkStatus();
    ASSIGN_OR_RETURN(void* device, Upload(tiles.data(), tiles.size() * sizeof(AttentionTile)));
    step_.tiles = static_cast<const AttentionTile*>(device);
    step_.num_tiles = static_cast<int32_t>(tiles.size());
    step_.tiles_heads = params.num_heads;
    step_.tiles_kv_heads = params.num_kv_heads;
  }
  const AttentionSplits split = SplitKeys(int64_t{step_.num_tiles} * params.num_kv_heads);
  const int64_t partial_elements =
      int64_t{split.splits} * q.rows * params.num_heads * (params.head_dim + 2);
  RETURN_IF_ERROR(EnsureScratch(attention_partial_, partial_elements * sizeof(float)));
  AttentionArgs args;
  args.q = q.data;
  args.q_stride = q.stride;
  args.out = out.data;
  args.out_stride = out.stride;
  args.key_pool = keys_[params.layer];
  args.value_pool = values_[params.layer];
  args.bf16_kv = kv_shape_.dtype == DType::kBF16;
  args.tiles = step_.tiles;
  args.num_tiles = step_.num_tiles;
  args.positions = step_.positions;
  args.block_tables = step_.block_tables;
  args.block_table_offsets = step_.block_table_offsets;
  args.num_heads = params.num_heads;
  args.num_kv_heads = params.num_kv_heads;
  args.head_dim = params.head_dim;
  args.block_size = kv_shape_.block_size;
  args.scale = params.scale;
  args.sliding_window = params.sliding_window;
  args.splits = split.splits;
  args.keys_per_split = split.keys_per_split;
  args.tokens = q.rows;
  args.partial = attention_partial_.as<float>();
  return launches_.Add(
      "attention",
      {q.data, q.stride, q.rows, out.data, out.stride, args.key_pool, args.value_pool, args.bf16_kv,
       args.num_heads, args.num_kv_heads, args.head_dim, args.scale, args.sliding_window,
       args.splits, args.keys_per_split, args.tiles, args.num_tiles},
      [args, this] { return Launched(LaunchPagedAttention(args, stream_.get())); });
}

CudaBackend::AttentionSplits CudaBackend::SplitKeys(int64_t blocks) const {
  // Split the key range when the tiles alone (`blocks` thread blocks per split) do not fill the
  // GPU (decode, long contexts). The geometry follows the longest context rounded up to a power
  // of two (at least kMinKeysPerSplit) up to kFineBucket, then to a multiple of kFineBucket, so
  // it changes every few thousand tokens of a generation, not every token; splits past a
  // sequence's context are empty and cost one early exit.
  constexpr int32_t kKeyChunk = 32;
  constexpr int32_t kMinKeysPerSplit = 256;
  constexpr int64_t kFineBucket = 2048;
  int64_t context = kMinKeysPerSplit;
  while (context < max_context_ && context < kFineBucket) context *= 2;
  if (context < max_context_)
    context = (max_context_ + kFineBucket - 1) / kFineBucket * kFineBucket;
  AttentionSplits split;
  const int64_t target = 2 * int64_t{properties_.multiProcessorCount};
  if (blocks < target && context > kMinKeysPerSplit) {
    split.splits = static_cast<int32_t>(
        std::min<int64_t>({(target + blocks - 1) / blocks, context / kMinKeysPerSplit, 64}));
  }
  const int64_t keys = (context + split.splits - 1) / split.splits;
  split.keys_per_split = static_cast<int32_t>((keys + kKeyChunk - 1) / kKeyChunk * kKeyChunk);
  split.splits = static_cast<int32_t>((context + split.keys_per_split - 1) / split.keys_per_split);
  return split;
}

}  // namespace

CudaBackendOptions CudaBackendOptionsFromEnv() {
  CudaBackendOptions options;
  options.device = EnvInt("MOE_CUDA_DEVICE", options.device);
  options.gemv_max_rows = EnvInt("MOE_CUDA_GEMV_MAX_ROWS", options.gemv_max_rows);
  options.moe_gemv_max_rows = EnvInt("MOE_CUDA_MOE_GEMV_MAX_ROWS", options.moe_gemv_max_rows);
  options.bf16_activations = EnvInt("MOE_CUDA_BF16_ACTIVATIONS", 0) != 0;
  options.graph_max_tokens = EnvInt("MOE_CUDA_GRAPH_MAX_TOKENS", options.graph_max_tokens);
  options.graph_cache_size = EnvInt("MOE_CUDA_GRAPH_CACHE_SIZE", options.graph_cache_size);
  return options;
}

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options) {
  const int count = VisibleDeviceCount();
  if (count == 0) {
    return absl::FailedPreconditionError(
        "--backend=cuda: no CUDA GPU is visible (no NVIDIA driver loaded, or no device; check "
        "nvidia-smi and CUDA_VISIBLE_DEVICES); use --backend=cpu or --backend=auto");
  }
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda: device ", options.device, " requested but ", count, " visible"));
  }
  cudaDeviceProp properties;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&properties, options.device));
  if (properties.major < 8) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda: GPU ", options.device, " (", properties.name, ") is sm_", properties.major,
        properties.minor, "; the CUDA backend needs sm_80 or newer (bf16 tensor cores)"));
  }
  auto backend = std::make_unique<CudaBackend>(options, properties);
  RETURN_IF_ERROR(backend->Init());
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace moe::cuda
