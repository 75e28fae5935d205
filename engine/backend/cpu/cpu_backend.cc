#include "engine/backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <span>
#include <thread>
#include <type_traits>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "engine/backend/batch_validation.h"
#include "engine/backend/cpu/kernels.h"
#include "engine/backend/cpu/thread_pool.h"
#include "engine/common/argmax.h"
#include "engine/common/status_macros.h"

namespace moe {
namespace {

float ElementAsFloat(const TensorView& view, int64_t index) {
  switch (view.dtype) {
    case DType::kBF16:
      return Bf16ToFloat(reinterpret_cast<const uint16_t*>(view.data)[index]);
    case DType::kF16:
      return F16ToFloat(reinterpret_cast<const uint16_t*>(view.data)[index]);
    case DType::kF32:
      return reinterpret_cast<const float*>(view.data)[index];
    default:
      return 0.0f;
  }
}

// Rows of an MLP input that belong to one expert (or all rows, for a dense MLP), with the
// expert's packed weights.
struct ExpertGroup {
  const cpu::PackedMatrix* gate;  // [ffn, hidden]
  const cpu::PackedMatrix* up;    // [ffn, hidden]
  const cpu::PackedMatrix* down;  // [hidden, ffn]
  int64_t first_row;              // in the gathered [rows, hidden] input
  int64_t num_rows;
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const CpuBackendOptions& options)
      : pool_(options.num_threads > 0
                  ? options.num_threads
                  : std::max(1, static_cast<int32_t>(std::thread::hardware_concurrency()))),
        bf16_activations_(options.bf16_activations && cpu::HasBf16DotProduct()) {}

  std::string name() const override { return "cpu"; }
  std::string device_description() const override {
    return absl::StrCat("CPU, ", pool_.num_threads(), " threads, SIMD ", cpu::SelectedTarget(),
                        bf16_activations_ ? ", bf16 activations (AVX512-BF16)" : "");
  }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    void* data = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));
    if (data == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("cpu: cannot allocate ", bytes, " bytes"));
    }
    return DeviceBuffer(data, bytes, [](void* p) { std::free(p); });
  }
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }

  absl::Status PrepareWeights(const ModelWeights& weights) override {
    // Every matmul weight is repacked into this backend's memory (cpu::PackedMatrix: 4-row
    // blocks, one sequential stream per tile; f16 widened to f32). Embeddings, norms and biases
    // are read in place from the mapping.
    auto pack = [&](const TensorView* view) -> absl::Status {
      if (view == nullptr || packed_.contains(view)) return absl::OkStatus();
      if (view->shape.size() != 2) {
        return absl::InvalidArgumentError(
            absl::StrCat("cpu: weight ", view->name, " is not a matrix"));
      }
      absl::StatusOr<cpu::PackedMatrix> packed =
          cpu::PackedMatrix::Pack(view->data, view->dtype, view->shape[0], view->shape[1]);
      if (!packed.ok()) {
        return absl::Status(packed.status().code(),
                            absl::StrCat(view->name, ": ", packed.status().message()));
      }
      packed_.emplace(view, *std::move(packed));
      return absl::OkStatus();
    };
    auto pack_mlp = [&](const MlpWeights& mlp) -> absl::Status {
      for (const TensorView* view : {mlp.gate, mlp.up, mlp.down}) RETURN_IF_ERROR(pack(view));
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(pack(weights.lm_head));
    for (const LayerWeights& layer : weights.layers) {
      for (const TensorView* view :
           {layer.q, layer.k, layer.v, layer.o, layer.router, layer.shared_expert_gate}) {
        RETURN_IF_ERROR(pack(view));
      }
      for (const MlpWeights& expert : layer.experts) RETURN_IF_ERROR(pack_mlp(expert));
      RETURN_IF_ERROR(pack_mlp(layer.shared_expert));
      RETURN_IF_ERROR(pack_mlp(layer.dense_mlp));
    }
    return absl::OkStatus();
  }

  absl::Status AllocateKvCache(const KvCacheShape& shape) override {
    RETURN_IF_ERROR(ValidateKvCacheDType(shape, "cpu"));
    kv_shape_ = shape;
    const size_t layer_bytes = shape.layer_elements() * DTypeSize(shape.dtype);
    keys_.clear();
    values_.clear();
    for (int32_t layer = 0; layer < shape.num_layers; ++layer) {
      ASSIGN_OR_RETURN(DeviceBuffer keys, Allocate(layer_bytes));
      ASSIGN_OR_RETURN(DeviceBuffer values, Allocate(layer_bytes));
      keys_.push_back(std::move(keys));
      values_.push_back(std::move(values));
    }
    return absl::OkStatus();
  }

  absl::Status BeginStep(const ForwardBatch& batch) override {
    RETURN_IF_ERROR(ValidateBatch(batch, kv_shape_, token_sequence_));
    batch_ = &batch;
    return absl::OkStatus();
  }

  absl::Status Synchronize() override { return absl::OkStatus(); }

  absl::Status Embed(const TensorView& table, Matrix out) override {
    const int64_t vocab = table.shape[0];
    const int64_t hidden = table.shape[1];
    for (int64_t t = 0; t < out.rows; ++t) {
      const int32_t id = batch_->token_ids[t];
      if (id < 0 || id >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " outside the vocabulary [0, ", vocab, ")"));
      }
      for (int64_t c = 0; c < hidden; ++c) out.row(t)[c] = ElementAsFloat(table, id * hidden + c);
    }
    return absl::OkStatus();
  }

  absl::Status RmsNorm(Matrix x, const TensorView& weight, float eps, Matrix out) override {
    const int64_t n = x.cols;
    for (int64_t r = 0; r < x.rows; ++r) {
      const float* in = x.row(r);
      float* dst = out.row(r);
      const float mean_square = cpu::DotF32(in, in, n) / static_cast<float>(n);
      const float inverse_rms = 1.0f / std::sqrt(mean_square + eps);
      for (int64_t c = 0; c < n; ++c) dst[c] = ElementAsFloat(weight, c) * (in[c] * inverse_rms);
    }
    return absl::OkStatus();
  }

  absl::Status Linear(Matrix x, const TensorView& weight, const TensorView* bias,
                      Matrix out) override {
    return LinearImpl(x, weight, bias, out, /*allow_bf16_activations=*/true);
  }

  absl::Status LinearImpl(Matrix x, const TensorView& weight, const TensorView* bias, Matrix out,
                          bool allow_bf16_activations) {
    ASSIGN_OR_RETURN(const cpu::PackedMatrix* packed, Packed(weight));
    if (allow_bf16_activations && UseBf16Activations(*packed)) {
      // x: [rows, cols] -> bf16 once, then vdpbf16ps.
      x_bf16_.resize(x.rows * x.cols);
      cpu::FloatToBf16Rows(x.data, x.stride, x.rows, x.cols, x_bf16_.data(), x.cols);
      pool_.ParallelFor(out.cols, 16, [&](int64_t begin, int64_t end) {
        cpu::MatMulRowsBf16(x_bf16_.data(), x.cols, x.rows, *packed, begin, end, out.data,
                            out.stride);
      });
    } else {
      pool_.ParallelFor(out.cols, 16, [&](int64_t begin, int64_t end) {
        cpu::MatMulRows(x.data, x.stride, x.rows, *packed, begin, end, out.data, out.stride);
      });
    }
    if (bias != nullptr) {
      for (int64_t r = 0; r < out.rows; ++r) {
        for (int64_t c = 0; c < out.cols; ++c) out.row(r)[c] += ElementAsFloat(*bias, c);
      }
    }
    return absl::OkStatus();
  }

  absl::Status Clamp(Matrix x, float limit) override {
    for (int64_t r = 0; r < x.rows; ++r) {
      for (int64_t c = 0; c < x.cols; ++c) x.row(r)[c] = std::clamp(x.row(r)[c], -limit, limit);
    }
    return absl::OkStatus();
  }

  absl::Status Rope(Matrix x, int32_t head_dim, double theta) override {
    // Hugging Face "rotate_half": dimension i pairs with i + head_dim / 2;
    // inv_freq[i] = theta^(-2i / head_dim), computed in float32 as transformers does.
    const int32_t half = head_dim / 2;
    std::vector<float> inverse_frequency(half);
    for (int32_t i = 0; i < half; ++i) {
      inverse_frequency[i] = static_cast<float>(
          1.0 / std::pow(theta, static_cast<double>(static_cast<float>(2 * i) / head_dim)));
    }
    const int64_t heads = x.cols / head_dim;
    for (int64_t t = 0; t < x.rows; ++t) {
      const float position = static_cast<float>(batch_->positions[t]);
      for (int32_t i = 0; i < half; ++i) {
        const float angle = position * inverse_frequency[i];
        const float cos_angle = std::cos(angle), sin_angle = std::sin(angle);
        for (int64_t h = 0; h < heads; ++h) {
          float* head = x.row(t) + h * head_dim;
          const float first = head[i], second = head[i + half];
          head[i] = first * cos_angle - second * sin_angle;
          head[i + half] = second * cos_angle + first * sin_angle;
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status WriteKv(int32_t layer, Matrix k, Matrix v) override {
    if (kv_shape_.dtype == DType::kBF16) {
      WriteKvRows(k, v, keys_[layer].as<uint16_t>(), values_[layer].as<uint16_t>());
    } else {
      WriteKvRows(k, v, keys_[layer].as<float>(), values_[layer].as<float>());
    }
    return absl::OkStatus();
  }

  absl::Status Attention(const AttentionParams& params, Matrix q, Matrix out) override {
    if (kv_shape_.dtype == DType::kBF16) {
      AttendOverCache(params, q, out, keys_[params.layer].as<uint16_t>(),
                      values_[params.layer].as<uint16_t>());
    } else {
      AttendOverCache(params, q, out, keys_[params.layer].as<float>(),
                      values_[params.layer].as<float>());
    }
    return absl::OkStatus();
  }

  absl::Status Fill(Matrix x, float value) override {
    for (int64_t r = 0; r < x.rows; ++r) std::fill(x.row(r), x.row(r) + x.cols, value);
    return absl::OkStatus();
  }

  absl::Status AddInPlace(Matrix residual, Matrix x) override {
    for (int64_t r = 0; r < residual.rows; ++r) {
      cpu::AxpyF32(1.0f, x.row(r), residual.row(r), residual.cols);
    }
    return absl::OkStatus();
  }

  absl::Status SwigluMlp(Matrix x, const MlpWeights& mlp, Matrix out) override {
    gathered_.resize(x.rows * x.cols);
    for (int64_t r = 0; r < x.rows; ++r) {
      std::memcpy(gathered_.data() + r * x.cols, x.row(r), x.cols * sizeof(float));
    }
    ASSIGN_OR_RETURN(const ExpertGroup group, MakeGroup(mlp, 0, x.rows));
    RunExpertGroups({&group, 1}, x.cols);
    for (int64_t r = 0; r < x.rows; ++r) {
      std::memcpy(out.row(r), expert_out_.data() + r * x.cols, x.cols * sizeof(float));
    }
    return absl::OkStatus();
  }

  absl::Status Route(Matrix x, const TensorView& router, int32_t top_k, bool normalize_top_k,
                     RoutingResult result, std::span<double> probability_mass,
                     double* router_z_sum) override {
    const int64_t experts = router.shape[0];
    router_logits_.resize(x.rows * experts);
    // The router stays in fp32 even with bf16 activations: expert choices are discrete.
    RETURN_IF_ERROR(LinearImpl(x, router, nullptr,
                               Matrix::Dense(router_logits_.data(), x.rows, experts),
                               /*allow_bf16_activations=*/false));
    std::vector<float> probabilities(experts);
    std::vector<int32_t> order(experts);
    for (int64_t t = 0; t < x.rows; ++t) {
      const float* logits = router_logits_.data() + t * experts;
      const float max_logit = *std::max_element(logits, logits + experts);
      float total = 0.0f;
      for (int64_t e = 0; e < experts; ++e) {
        probabilities[e] = std::exp(logits[e] - max_logit);
        total += probabilities[e];
      }
      for (int64_t e = 0; e < experts; ++e) {
        probabilities[e] /= total;
        probability_mass[e] += probabilities[e];
      }
      const double log_sum_exp = max_logit + std::log(static_cast<double>(total));
      *router_z_sum += log_sum_exp * log_sum_exp;
      // Top-k by probability; ties go to the lower expert id.
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                        [&](int32_t a, int32_t b) {
                          return probabilities[a] > probabilities[b] ||
                                 (probabilities[a] == probabilities[b] && a < b);
                        });
      float chosen_total = 0.0f;
      for (int32_t j = 0; j < top_k; ++j) chosen_total += probabilities[order[j]];
      for (int32_t j = 0; j < top_k; ++j) {
        result.expert_ids[t * top_k + j] = order[j];
        result.expert_weights[t * top_k + j] =
            normalize_top_k ? probabilities[order[j]] / chosen_total : probabilities[order[j]];
      }
    }
    return absl::OkStatus();
  }

  absl::Status MoeExperts(Matrix x, std::span<const MlpWeights> experts, int32_t top_k,
                          RoutingResult routing, Matrix out) override {
    // Counting sort of the (token, choice) pairs by expert, then one pass per touched expert.
    const int64_t assignments = x.rows * top_k;
    const int64_t num_experts = static_cast<int64_t>(experts.size());
    std::vector<int64_t> offsets(num_experts + 1, 0);
    for (int64_t a = 0; a < assignments; ++a) {
      const int32_t expert = routing.expert_ids[a];
      if (expert < 0 || expert >= num_experts) {
        return absl::InternalError(
            absl::StrCat("router chose expert ", expert, " of ", num_experts));
      }
      ++offsets[expert + 1];
    }
    std::partial_sum(offsets.begin(), offsets.end(), offsets.begin());
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    std::vector<int64_t> row_of_assignment(assignments);
    gathered_.resize(assignments * x.cols);
    for (int64_t a = 0; a < assignments; ++a) {
      const int64_t row = cursor[routing.expert_ids[a]]++;
      row_of_assignment[a] = row;
      std::memcpy(gathered_.data() + row * x.cols, x.row(a / top_k), x.cols * sizeof(float));
    }
    std::vector<ExpertGroup> groups;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (offsets[e + 1] > offsets[e]) {
        ASSIGN_OR_RETURN(ExpertGroup group,
                         MakeGroup(experts[e], offsets[e], offsets[e + 1] - offsets[e]));
        groups.push_back(group);
      }
    }
    RunExpertGroups(groups, x.cols);
    // Weighted combine, in choice order for every token.
    for (int64_t t = 0; t < x.rows; ++t) {
      for (int32_t j = 0; j < top_k; ++j) {
        const int64_t a = t * top_k + j;
        cpu::AxpyF32(routing.expert_weights[a], expert_out_.data() + row_of_assignment[a] * x.cols,
                     out.row(t), x.cols);
      }
    }
    return absl::OkStatus();
  }

  absl::Status AddGated(Matrix x, const TensorView& gate, Matrix shared, Matrix out) override {
    std::vector<float> gate_logit(x.rows);
    RETURN_IF_ERROR(LinearImpl(x, gate, nullptr, Matrix::Dense(gate_logit.data(), x.rows, 1),
                               /*allow_bf16_activations=*/false));
    for (int64_t t = 0; t < x.rows; ++t) {
      const float scale = 1.0f / (1.0f + std::exp(-gate_logit[t]));
      cpu::AxpyF32(scale, shared.row(t), out.row(t), out.cols);
    }
    return absl::OkStatus();
  }

  absl::Status GatherRows(Matrix x, std::span<const int32_t> rows, Matrix out) override {
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i] < 0 || rows[i] >= x.rows) {
        return absl::InvalidArgumentError(
            absl::StrCat("logits row ", rows[i], " outside the batch"));
      }
      std::memcpy(out.row(i), x.row(rows[i]), x.cols * sizeof(float));
    }
    return absl::OkStatus();
  }

  absl::Status RowArgMax(Matrix x, int32_t* out) override {
    pool_.ParallelFor(x.rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        out[r] = ArgMax(std::span<const float>(x.row(r), static_cast<size_t>(x.cols)));
      }
    });
    return absl::OkStatus();
  }

 private:
  bool UseBf16Activations(const cpu::PackedMatrix& weight) const {
    return bf16_activations_ && weight.type() == DType::kBF16;
  }

  // Stores k and v ([tokens, kv_heads * head_dim]) at the step's slots: KvT float copies,
  // uint16_t (bf16) rounds to nearest even.
  template <class KvT>
  void WriteKvRows(Matrix k, Matrix v, KvT* keys, KvT* values) const {
    const int64_t head_dim = kv_shape_.head_dim;
    auto store = [head_dim](const float* from, KvT* to) {
      if constexpr (std::is_same_v<KvT, float>) {
        std::memcpy(to, from, head_dim * sizeof(float));
      } else {
        cpu::FloatToBf16Rows(from, head_dim, 1, head_dim, to, head_dim);
      }
    };
    for (int64_t t = 0; t < k.rows; ++t) {
      const int64_t slot = batch_->slot_mapping[t];
      const int64_t block = slot / kv_shape_.block_size, offset = slot % kv_shape_.block_size;
      for (int32_t kv_head = 0; kv_head < kv_shape_.num_kv_heads; ++kv_head) {
        const int64_t row = KvRow(block, kv_head, offset);
        store(k.row(t) + kv_head * head_dim, keys + row);
        store(v.row(t) + kv_head * head_dim, values + row);
      }
    }
  }

  // Attention of every batch token over its sequence's cached K/V (KvT: float or bf16 bits).
  // One item per (token, KV head): the group's query heads share every K/V row read.
  template <class KvT>
  void AttendOverCache(const AttentionParams& params, Matrix q, Matrix out, const KvT* keys,
                       const KvT* values) {
    const int32_t group = params.num_heads / params.num_kv_heads;
    const int32_t block_size = kv_shape_.block_size;
    pool_.ParallelFor(q.rows * params.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;  // [group, positions]
      std::vector<int64_t> rows;  // [positions] offset of each position's K/V head vector
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / params.num_kv_heads;
        const int32_t kv_head = static_cast<int32_t>(item % params.num_kv_heads);
        const SequenceChunk& chunk = batch_->sequences[token_sequence_[t]];
        const int32_t position = batch_->positions[t];
        const int32_t first =
            params.sliding_window > 0 ? std::max(0, position - params.sliding_window + 1) : 0;
        const int64_t n = position - first + 1;
        rows.resize(n);
        // Block by block (no division per position).
        for (int32_t p = first; p <= position;) {
          const int32_t offset = p % block_size;
          const int32_t count = std::min(block_size - offset, position + 1 - p);
          const int64_t row = KvRow(chunk.block_table[p / block_size], kv_head, offset);
          for (int32_t i = 0; i < count; ++i) rows[p - first + i] = row + i * params.head_dim;
          p += count;
        }
        scores.resize(group * n);
        const int64_t first_head = int64_t{kv_head} * group;
        cpu::DotRows(q.row(t) + first_head * params.head_dim, group, keys, rows.data(), n,
                     params.head_dim, scores.data());
        for (int32_t h = 0; h < group; ++h)
          cpu::ScaledSoftmax(scores.data() + h * n, n, params.scale);
        cpu::WeightedSumRows(scores.data(), group, values, rows.data(), n, params.head_dim,
                             out.row(t) + first_head * params.head_dim);
      }
    });
  }

  // Element offset of a position's vector of one KV head in a layer's K or V pool, laid out
  // [blocks, kv_heads, block_size, head_dim]: a head's positions in a block are contiguous, so
  // attention streams block_size * head_dim floats at a time.
  int64_t KvRow(int64_t block, int32_t kv_head, int64_t offset) const {
    return ((block * kv_shape_.num_kv_heads + kv_head) * kv_shape_.block_size + offset) *
           kv_shape_.head_dim;
  }

  absl::StatusOr<const cpu::PackedMatrix*> Packed(const TensorView& view) const {
    const auto it = packed_.find(&view);
    if (it == packed_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("cpu: weight ", view.name, " was not prepared by PrepareWeights"));
    }
    return &it->second;
  }

  absl::StatusOr<ExpertGroup> MakeGroup(const MlpWeights& mlp, int64_t first_row,
                                        int64_t num_rows) const {
    if (mlp.gate == nullptr || mlp.up == nullptr || mlp.down == nullptr) {
      return absl::InvalidArgumentError("cpu: an MLP without gate, up or down weights");
    }
    ASSIGN_OR_RETURN(const cpu::PackedMatrix* gate, Packed(*mlp.gate));
    ASSIGN_OR_RETURN(const cpu::PackedMatrix* up, Packed(*mlp.up));
    ASSIGN_OR_RETURN(const cpu::PackedMatrix* down, Packed(*mlp.down));
    return ExpertGroup{gate, up, down, first_row, num_rows};
  }

  // For every group: expert_out_[rows] = down(silu(gate(x)) * up(x)) of gathered_[rows].
  // Both phases split the rows of all groups' weight matrices across threads in one loop, so
  // every touched expert's weights are read exactly once and there are two barriers in all.
  void RunExpertGroups(std::span<const ExpertGroup> groups, int64_t hidden) {
    if (groups.empty()) return;
    const int64_t total_rows = groups.back().first_row + groups.back().num_rows;
    int64_t max_ffn = 0;
    std::vector<int64_t> ffn_begin(groups.size() + 1, 0), hidden_begin(groups.size() + 1, 0);
    for (size_t g = 0; g < groups.size(); ++g) {
      const int64_t ffn = groups[g].gate->rows();
      max_ffn = std::max(max_ffn, ffn);
      ffn_begin[g + 1] = ffn_begin[g] + ffn;
      hidden_begin[g + 1] = hidden_begin[g] + hidden;
    }
    // activation_: [total_rows, max_ffn]; up_: same.
    activation_.resize(total_rows * max_ffn);
    up_.resize(total_rows * max_ffn);
    expert_out_.resize(total_rows * hidden);
    // With bf16 activations (bf16 expert weights): gathered_ and activation_ rounded to bf16.
    const bool bf16 = std::all_of(groups.begin(), groups.end(), [&](const ExpertGroup& group) {
      return UseBf16Activations(*group.gate) && UseBf16Activations(*group.up) &&
             UseBf16Activations(*group.down);
    });
    if (bf16) {
      x_bf16_.resize(total_rows * hidden);
      cpu::FloatToBf16Rows(gathered_.data(), hidden, total_rows, hidden, x_bf16_.data(), hidden);
      activation_bf16_.resize(total_rows * max_ffn);
    }

    // Runs body(group, local_begin, local_end) over the pieces of [begin, end) of a flattened
    // index space whose group g spans [starts[g], starts[g + 1]).
    auto for_each_piece = [&](const std::vector<int64_t>& starts, int64_t begin, int64_t end,
                              auto&& body) {
      size_t g = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
      for (; g < groups.size() && starts[g] < end; ++g) {
        const int64_t lo = std::max(begin, starts[g]) - starts[g];
        const int64_t hi = std::min(end, starts[g + 1]) - starts[g];
        if (lo < hi) body(groups[g], lo, hi);
      }
    };

    pool_.ParallelFor(ffn_begin.back(), 16, [&](int64_t begin, int64_t end) {
      for_each_piece(ffn_begin, begin, end, [&](const ExpertGroup& group, int64_t lo, int64_t hi) {
        const float* x = gathered_.data() + group.first_row * hidden;
        float* gate_out = activation_.data() + group.first_row * max_ffn;
        float* up_out = up_.data() + group.first_row * max_ffn;
        if (bf16) {
          const uint16_t* xb = x_bf16_.data() + group.first_row * hidden;
          cpu::MatMulRowsBf16(xb, hidden, group.num_rows, *group.gate, lo, hi, gate_out, max_ffn);
          cpu::MatMulRowsBf16(xb, hidden, group.num_rows, *group.up, lo, hi, up_out, max_ffn);
        } else {
          cpu::MatMulRows(x, hidden, group.num_rows, *group.gate, lo, hi, gate_out, max_ffn);
          cpu::MatMulRows(x, hidden, group.num_rows, *group.up, lo, hi, up_out, max_ffn);
        }
        for (int64_t r = 0; r < group.num_rows; ++r) {
          cpu::SiluMul(gate_out + r * max_ffn + lo, up_out + r * max_ffn + lo,
                       gate_out + r * max_ffn + lo, hi - lo);
          if (bf16) {
            cpu::FloatToBf16Rows(gate_out + r * max_ffn + lo, max_ffn, 1, hi - lo,
                                 activation_bf16_.data() + (group.first_row + r) * max_ffn + lo,
                                 max_ffn);
          }
        }
      });
    });
    pool_.ParallelFor(hidden_begin.back(), 16, [&](int64_t begin, int64_t end) {
      for_each_piece(
          hidden_begin, begin, end, [&](const ExpertGroup& group, int64_t lo, int64_t hi) {
            float* out = expert_out_.data() + group.first_row * hidden;
            if (bf16) {
              cpu::MatMulRowsBf16(activation_bf16_.data() + group.first_row * max_ffn, max_ffn,
                                  group.num_rows, *group.down, lo, hi, out, hidden);
            } else {
              cpu::MatMulRows(activation_.data() + group.first_row * max_ffn, max_ffn,
                              group.num_rows, *group.down, lo, hi, out, hidden);
            }
          });
    });
  }

  cpu::ThreadPool pool_;
  const bool bf16_activations_;  // requested and supported by this CPU
  // Every matmul weight in the kernels' layout (PrepareWeights).
  absl::flat_hash_map<const TensorView*, cpu::PackedMatrix> packed_;
  KvCacheShape kv_shape_;
  std::vector<DeviceBuffer> keys_, values_;  // per layer: [blocks, kv_heads, block_size, head_dim]
  const ForwardBatch* batch_ = nullptr;
  std::vector<int32_t> token_sequence_;  // [tokens] index into batch_->sequences
  // Scratch.
  std::vector<float> router_logits_;       // [tokens, experts]
  std::vector<float> gathered_;            // [assignments, hidden] inputs grouped by expert
  std::vector<float> activation_;          // [assignments, ffn] silu(gate) * up
  std::vector<float> up_;                  // [assignments, ffn]
  std::vector<float> expert_out_;          // [assignments, hidden]
  std::vector<uint16_t> x_bf16_;           // bf16 activations: [rows, cols] input of a matmul
  std::vector<uint16_t> activation_bf16_;  // bf16 activations: [assignments, ffn]
};

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend(const CpuBackendOptions& options) {
  return std::make_unique<CpuBackend>(options);
}

}  // namespace moe
