// Backend: the operations of the forward pass, implemented once per device (cpu/, cuda/).
// The decoder in engine/ops/ is written once against this interface.
//
// Conventions: activations are float32, row-major; a Matrix is [rows, cols] in the backend's
// memory. Weights are the checkpoint's TensorViews; a backend maps them to its own memory in
// PrepareWeights (the CPU backend reads the memory mapping in place). Per-step metadata
// (positions, KV slots, block tables) is handed over once per step by BeginStep.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/model/dtype.h"
#include "engine/model/model_weights.h"
#include "engine/model/safetensors.h"
#include "engine/ops/batch.h"

namespace moe {

// Memory owned by a backend. Move-only; released through the backend's deleter.
class DeviceBuffer {
 public:
  using Deleter = std::function<void(void*)>;
  DeviceBuffer() = default;
  DeviceBuffer(void* data, size_t bytes, Deleter deleter)
      : data_(data), bytes_(bytes), deleter_(std::move(deleter)) {}
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      Reset();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
      deleter_ = std::move(other.deleter_);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void Reset() {
    if (data_ != nullptr && deleter_) deleter_(data_);
    data_ = nullptr;
    bytes_ = 0;
  }
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Deleter deleter_;
};

// A float32 [rows, cols] view into backend memory; `stride` elements between rows.
struct Matrix {
  float* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t stride = 0;

  static Matrix Dense(float* data, int64_t rows, int64_t cols) { return {data, rows, cols, cols}; }
  float* row(int64_t r) const { return data + r * stride; }
};

// Geometry of the paged KV pool, identical for every layer.
struct KvCacheShape {
  int32_t num_layers = 0;
  int32_t num_blocks = 0;
  int32_t block_size = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  // What K and V are stored as: kF32 (exact), or kBF16 (half the memory and the bytes attention
  // reads; each cached value rounded to nearest even, computed with in float32).
  DType dtype = DType::kF32;

  // Elements of one layer's K (or V) pool: num_blocks x block_size x num_kv_heads x head_dim
  // (the order is the backend's).
  int64_t layer_elements() const {
    return int64_t{num_blocks} * block_size * num_kv_heads * head_dim;
  }
  // Bytes of one block across all layers, K and V.
  int64_t bytes_per_block() const {
    return int64_t{2} * num_layers * block_size * num_kv_heads * head_dim * DTypeSize(dtype);
  }
};

struct AttentionParams {
  int32_t layer = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  float scale = 1.0f;
  int32_t sliding_window = 0;  // 0 = unlimited
};

// Router output for one MoE layer and step, in backend memory.
struct RoutingResult {
  int32_t* expert_ids = nullptr;    // [tokens, top_k], by descending weight
  float* expert_weights = nullptr;  // [tokens, top_k]
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  virtual std::string device_description() const = 0;
  // What the backend has done so far that its description does not say, for benchmarks and
  // tests (the CUDA backend: decode steps captured and replayed as graphs); empty if nothing.
  virtual std::string execution_summary() const { return {}; }

  // ---- memory --------------------------------------------------------------------------------
  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  virtual absl::Status CopyToDevice(void* device_dst, const void* host_src, size_t bytes) = 0;
  virtual absl::Status CopyToHost(void* host_dst, const void* device_src, size_t bytes) = 0;

  // Makes every weight of the model usable by the ops below (upload, layout, ...).
  virtual absl::Status PrepareWeights(const ModelWeights& weights) = 0;
  // Allocates the K and V pools.
  virtual absl::Status AllocateKvCache(const KvCacheShape& shape) = 0;

  // ---- per step ------------------------------------------------------------------------------
  // Hands over the step's positions, KV slots and per-sequence block tables.
  virtual absl::Status BeginStep(const ForwardBatch& batch) = 0;
  // Waits until all work of the step is done (results may then be copied to the host).
  virtual absl::Status Synchronize() = 0;
  // After an op of the step failed: drops what the step left pending (work not yet enqueued,
  // host pointers into its output), so nothing of it runs later.
  virtual void AbandonStep() {}

  // ---- ops (all on the current step's tokens) --------------------------------------------------
  // out[t] = table[token_ids[t]]
  virtual absl::Status Embed(const TensorView& table, Matrix out) = 0;
  // out[r] = x[r] / rms(x[r]) * weight; in place when out == x. weight: [x.cols]
  virtual absl::Status RmsNorm(Matrix x, const TensorView& weight, float eps, Matrix out) = 0;
  // out = x * weight^T (+ bias). weight: [out.cols, x.cols]; bias: [out.cols] or null.
  virtual absl::Status Linear(Matrix x, const TensorView& weight, const TensorView* bias,
                              Matrix out) = 0;
  // x = clamp(x, -limit, limit)
  virtual absl::Status Clamp(Matrix x, float limit) = 0;
  // Rotary embedding (rotate-half pairing) of x viewed as [tokens, heads, head_dim], at the
  // step's positions, in place.
  virtual absl::Status Rope(Matrix x, int32_t head_dim, double theta) = 0;
  // Stores k and v ([tokens, kv_heads*head_dim]) at the step's KV slots of `layer`.
  virtual absl::Status WriteKv(int32_t layer, Matrix k, Matrix v) = 0;
  // Causal attention of q ([tokens, heads*head_dim]) over the paged KV of each token's
  // sequence, positions [0, position] (or the sliding window); out has q's shape.
  virtual absl::Status Attention(const AttentionParams& params, Matrix q, Matrix out) = 0;
  // x[r][c] = value
  virtual absl::Status Fill(Matrix x, float value) = 0;
  // residual += x
  virtual absl::Status AddInPlace(Matrix residual, Matrix x) = 0;
  // out = down(silu(gate(x)) * up(x)) for a dense SwiGLU MLP; scratch holds [tokens, ffn] x 2.
  virtual absl::Status SwigluMlp(Matrix x, const MlpWeights& mlp, Matrix out) = 0;
  // Router: softmax over x * router^T, top-k, optional renormalisation. Fills `result` and,
  // per expert, the step's sum of router probabilities (probability_mass [experts]) and the
  // sum over tokens of logsumexp(logits)^2 (router_z_sum), both on the host.
  virtual absl::Status Route(Matrix x, const TensorView& router, int32_t top_k,
                             bool normalize_top_k, RoutingResult result,
                             std::span<double> probability_mass, double* router_z_sum) = 0;
  // out += sum_j weights[t, j] * expert_{ids[t, j]}(x[t]): tokens grouped by expert, each
  // touched expert's weights read once for all its tokens.
  virtual absl::Status MoeExperts(Matrix x, std::span<const MlpWeights> experts, int32_t top_k,
                                  RoutingResult routing, Matrix out) = 0;
  // out[t] += sigmoid(x[t] . gate) * shared[t]  (Qwen2-MoE shared expert). gate: [1, x.cols]
  virtual absl::Status AddGated(Matrix x, const TensorView& gate, Matrix shared, Matrix out) = 0;
  // out[i] = x[rows[i]]
  virtual absl::Status GatherRows(Matrix x, std::span<const int32_t> rows, Matrix out) = 0;
  // out[r] = ArgMax(x[r]) (engine/common/argmax.h: the lowest index among equal maxima; a NaN
  // wins only in column 0). out: [x.rows] int32 in backend memory.
  virtual absl::Status RowArgMax(Matrix x, int32_t* out) = 0;
};

struct BackendOptions {
  int32_t num_threads = 0;  // CPU backend threads (0 = all hardware threads)
  // CPU backend only, opt-in, lower precision: bf16 activations with AVX512-BF16 dot products.
  bool cpu_bf16_activations = false;
};

// Creates the backend named "cpu" or "cuda" ("auto": CUDA when a GPU is present, else CPU).
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& name,
                                                       const BackendOptions& options = {});

}  // namespace moe
