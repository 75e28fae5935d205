// Every op of the CUDA backend against the CPU backend (the reference) on random inputs.
// Skipped when no GPU is visible.
//
// Error measure: ||cuda - cpu|| / ||cpu|| over the whole output (NaN or Inf fails; outputs are
// poisoned with NaN first, so an unwritten element fails too). Bounds per op:
//   exact (0):    Embed, Fill, Clamp, AddInPlace, GatherRows (pure data movement / one add)
//   1e-6:         RmsNorm, Rope, AddGated (float32, different summation order / libm ulps)
//   1e-5:         Attention (float32 online softmax vs two-pass)
//   products:     Linear, SwigluMlp, Route, MoeExperts: per mode (see kModes):
//                 weight-streaming kernel (float32 arithmetic) 2e-5; cuBLASLt / WMMA GEMMs with
//                 split activations (|x - hi - lo| <= 2^-17 |x|) 1e-4; bf16 activations 2e-2.
#include "engine/backend/cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "engine/backend/cpu/cpu_backend.h"
#include "engine/backend/cuda/cuda_device.h"
#include "engine/common/argmax.h"
#include "engine/model/dtype.h"
#include "gtest/gtest.h"
#include "tests/testing/argmax_rows.h"

namespace moe {
namespace {

constexpr int64_t kHidden = 256;
constexpr int32_t kHeads = 8;
constexpr int32_t kKvHeads = 2;
constexpr int32_t kHeadDim = 32;
constexpr int64_t kExpertFfn = 128;
constexpr int64_t kDenseFfn = 192;
constexpr int32_t kExperts = 16;
constexpr int32_t kTopK = 4;
constexpr int64_t kVocab = 300;
constexpr int32_t kBlockSize = 16;
constexpr int32_t kNumBlocks = 160;

double RelativeError(const std::vector<float>& actual, const std::vector<float>& expected) {
  if (actual.size() != expected.size()) return std::numeric_limits<double>::infinity();
  double diff = 0, norm = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (!std::isfinite(actual[i])) return std::numeric_limits<double>::infinity();
    diff += (double{actual[i]} - expected[i]) * (double{actual[i]} - expected[i]);
    norm += double{expected[i]} * expected[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

double RelativeError(const std::vector<double>& actual, const std::vector<double>& expected) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (!std::isfinite(actual[i])) return std::numeric_limits<double>::infinity();
    diff += (actual[i] - expected[i]) * (actual[i] - expected[i]);
    norm += expected[i] * expected[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Normal-range float -> IEEE half bits (round to nearest), for f16 test weights.
uint16_t FloatToF16Bits(float value) {
  const uint16_t sign = value < 0 ? 0x8000 : 0;
  float magnitude = std::fabs(value);
  if (magnitude < 6.2e-5f) return sign;
  int exponent = 0;
  const float fraction = std::frexp(magnitude, &exponent);  // [0.5, 1)
  int biased = exponent - 1 + 15;
  int mantissa = static_cast<int>(std::lround((fraction * 2.0f - 1.0f) * 1024.0f));
  if (mantissa == 1024) {
    mantissa = 0;
    ++biased;
  }
  biased = std::min(biased, 30);
  return static_cast<uint16_t>(sign | (biased << 10) | mantissa);
}

// Random host weights with stable addresses, and the ModelWeights that binds them.
class WeightFactory {
 public:
  explicit WeightFactory(uint32_t seed) : rng_(seed) {}

  const TensorView* Make(const std::string& name, DType dtype, std::vector<int64_t> shape,
                         float scale, float offset = 0.0f) {
    int64_t count = 1;
    for (int64_t dim : shape) count *= dim;
    std::vector<std::byte>& bytes = storage_.emplace_back(count * DTypeSize(dtype));
    std::uniform_real_distribution<float> dist(-scale, scale);
    for (int64_t i = 0; i < count; ++i) {
      const float value = offset + dist(rng_);
      if (dtype == DType::kBF16) {
        const uint16_t bits = FloatToBf16(value);
        std::memcpy(bytes.data() + 2 * i, &bits, 2);
      } else if (dtype == DType::kF16) {
        const uint16_t bits = FloatToF16Bits(value);
        std::memcpy(bytes.data() + 2 * i, &bits, 2);
      } else {
        std::memcpy(bytes.data() + 4 * i, &value, 4);
      }
    }
    TensorView& view = views_.emplace_back();
    view.name = name;
    view.dtype = dtype;
    view.shape = std::move(shape);
    view.data = bytes.data();
    view.num_bytes = static_cast<int64_t>(bytes.size());
    return &view;
  }

  MlpWeights Mlp(const std::string& name, DType dtype, int64_t ffn) {
    const float scale = 1.0f / std::sqrt(static_cast<float>(kHidden));
    return {Make(name + ".gate", dtype, {ffn, kHidden}, scale),
            Make(name + ".up", dtype, {ffn, kHidden}, scale),
            Make(name + ".down", dtype, {kHidden, ffn}, 1.0f / std::sqrt(static_cast<float>(ffn)))};
  }

 private:
  std::mt19937 rng_;
  std::deque<std::vector<std::byte>> storage_;
  std::deque<TensorView> views_;
};

struct Mode {
  const char* name;
  int32_t gemv_max_rows;
  int32_t moe_gemv_max_rows;
  bool bf16_activations;
  double product_tolerance;
};

const Mode kModes[] = {
    {"default", 16, 16, false, 1e-4},
    {"streaming", 1 << 20, 1 << 20, false, 2e-5},
    {"tensor_cores", 0, 0, false, 1e-4},
    {"bf16_activations", 0, 0, true, 2e-2},
};

// A sequence of a test batch: `cached` positions already in the KV cache, `fresh` new ones.
struct SequenceSpec {
  int32_t cached;
  int32_t fresh;
};

class CudaBackendTest : public testing::TestWithParam<Mode> {
 protected:
  void SetUp() override {
    if (cuda::VisibleDeviceCount() == 0) GTEST_SKIP() << "no CUDA GPU visible";
    cpu_ = CreateCpuBackend({.num_threads = 2});
    cuda::CudaBackendOptions options;
    options.gemv_max_rows = GetParam().gemv_max_rows;
    options.moe_gemv_max_rows = GetParam().moe_gemv_max_rows;
    options.bf16_activations = GetParam().bf16_activations;
    auto cuda = cuda::CreateCudaBackend(options);
    ASSERT_TRUE(cuda.ok()) << cuda.status();
    cuda_ = std::move(cuda).value();
    BuildWeights();
    for (Backend* backend : {cpu_.get(), cuda_.get()}) {
      ASSERT_TRUE(backend->PrepareWeights(model_).ok());
    }
    AllocateKv(kHeads, kKvHeads, kHeadDim);
  }

  void BuildWeights() {
    const float scale = 1.0f / std::sqrt(static_cast<float>(kHidden));
    model_.embed_tokens = factory_.Make("embed", DType::kBF16, {kVocab, kHidden}, 1.0f);
    model_.final_norm = factory_.Make("final_norm", DType::kBF16, {kHidden}, 0.2f, 1.0f);
    model_.lm_head = factory_.Make("lm_head", DType::kBF16, {kVocab, kHidden}, scale);
    // Layer 0: bf16 throughout.
    LayerWeights& bf16 = model_.layers.emplace_back();
    bf16.input_norm = factory_.Make("input_norm", DType::kBF16, {kHidden}, 0.2f, 1.0f);
    bf16.q = factory_.Make("q", DType::kBF16, {kHeads * kHeadDim, kHidden}, scale);
    bf16.q_bias = factory_.Make("q_bias", DType::kBF16, {kHeads * kHeadDim}, 0.5f);
    bf16.q_norm = factory_.Make("q_norm", DType::kBF16, {kHeadDim}, 0.2f, 1.0f);
    bf16.router = factory_.Make("router", DType::kBF16, {kExperts, kHidden}, 4 * scale);
    bf16.shared_expert_gate = factory_.Make("shared_gate", DType::kBF16, {1, kHidden}, scale);
    for (int e = 0; e < kExperts; ++e) {
      bf16.experts.push_back(factory_.Mlp("expert" + std::to_string(e), DType::kBF16, kExpertFfn));
    }
    bf16.dense_mlp = factory_.Mlp("dense", DType::kBF16, kDenseFfn);
    // Layer 1: f32 and f16 checkpoints, and a shape the vector kernels cannot take.
    LayerWeights& wide = model_.layers.emplace_back();
    wide.q = factory_.Make("q_f32", DType::kF32, {kHeads * kHeadDim, kHidden}, scale);
    wide.k = factory_.Make("k_f16", DType::kF16, {kKvHeads * kHeadDim, kHidden}, scale);
    wide.v = factory_.Make("odd_bf16", DType::kBF16, {24, 37}, 0.2f);
    wide.o = factory_.Make("odd_f32", DType::kF32, {24, 37}, 0.2f);
    wide.router = factory_.Make("router_f32", DType::kF32, {kExperts, kHidden}, 4 * scale);
    for (int e = 0; e < kExperts; ++e) {
      wide.experts.push_back(
          factory_.Mlp("f32_expert" + std::to_string(e), DType::kF32, kExpertFfn));
    }
    wide.dense_mlp = factory_.Mlp("f16_dense", DType::kF16, kDenseFfn);
  }

  void AllocateKv(int32_t heads, int32_t kv_heads, int32_t head_dim, DType kv_dtype = DType::kF32) {
    heads_ = heads;
    kv_shape_ = KvCacheShape{.num_layers = 2,
                             .num_blocks = kNumBlocks,
                             .block_size = kBlockSize,
                             .num_kv_heads = kv_heads,
                             .head_dim = head_dim,
                             .dtype = kv_dtype};
    for (Backend* backend : {cpu_.get(), cuda_.get()}) {
      ASSERT_TRUE(backend->AllocateKvCache(kv_shape_).ok());
    }
    // Blocks handed out in a shuffled order, so block tables are not contiguous.
    free_blocks_.resize(kNumBlocks);
    std::iota(free_blocks_.begin(), free_blocks_.end(), 0);
    std::shuffle(free_blocks_.begin(), free_blocks_.end(), rng_);
    tables_.clear();
  }

  // A batch continuing the sequences (sequence i keeps its block table across calls).
  ForwardBatch MakeBatch(const std::vector<SequenceSpec>& specs) {
    ForwardBatch batch;
    for (size_t s = 0; s < specs.size(); ++s) {
      if (tables_.size() <= s) tables_.emplace_back();
      std::vector<int32_t>& table = tables_[s];
      const int32_t context = specs[s].cached + specs[s].fresh;
      while (static_cast<int32_t>(table.size()) * kBlockSize < context) {
        table.push_back(free_blocks_.back());
        free_blocks_.pop_back();
      }
      SequenceChunk chunk;
      chunk.seq_id = static_cast<int64_t>(s);
      chunk.token_begin = batch.num_tokens();
      chunk.num_tokens = specs[s].fresh;
      chunk.context_len = context;
      chunk.block_table = table;
      for (int32_t p = specs[s].cached; p < context; ++p) {
        batch.token_ids.push_back(static_cast<int32_t>(rng_() % kVocab));
        batch.positions.push_back(p);
        batch.slot_mapping.push_back(table[p / kBlockSize] * kBlockSize + p % kBlockSize);
      }
      batch.logits_rows.push_back(batch.num_tokens() - 1);
      batch.sequences.push_back(std::move(chunk));
    }
    return batch;
  }

  void Begin(const ForwardBatch& batch) {
    for (Backend* backend : {cpu_.get(), cuda_.get()}) {
      ASSERT_TRUE(backend->BeginStep(batch).ok());
    }
  }

  std::vector<float> Random(int64_t count, float scale = 1.0f) {
    std::uniform_real_distribution<float> dist(-scale, scale);
    std::vector<float> values(count);
    for (float& v : values) v = dist(rng_);
    return values;
  }

  // The same host matrix in both backends' memory.
  struct Twin {
    DeviceBuffer cpu, cuda;
    int64_t rows = 0, cols = 0;
    Matrix on(bool gpu) const { return Matrix::Dense((gpu ? cuda : cpu).as<float>(), rows, cols); }
  };
  Twin Put(const std::vector<float>& host, int64_t rows, int64_t cols) {
    Twin twin;
    twin.rows = rows;
    twin.cols = cols;
    const size_t bytes = std::max<size_t>(1, host.size()) * sizeof(float);
    auto cpu = cpu_->Allocate(bytes);
    auto gpu = cuda_->Allocate(bytes);
    EXPECT_TRUE(cpu.ok() && gpu.ok());
    twin.cpu = std::move(cpu).value();
    twin.cuda = std::move(gpu).value();
    EXPECT_TRUE(cpu_->CopyToDevice(twin.cpu.data(), host.data(), host.size() * sizeof(float)).ok());
    EXPECT_TRUE(
        cuda_->CopyToDevice(twin.cuda.data(), host.data(), host.size() * sizeof(float)).ok());
    return twin;
  }
  Twin Poisoned(int64_t rows, int64_t cols) {
    return Put(std::vector<float>(rows * cols, std::numeric_limits<float>::quiet_NaN()), rows,
               cols);
  }
  // Results of both backends: {cpu, cuda}.
  std::pair<std::vector<float>, std::vector<float>> Get(const Twin& twin) {
    std::vector<float> cpu(twin.rows * twin.cols), gpu(twin.rows * twin.cols);
    EXPECT_TRUE(cpu_->Synchronize().ok());
    auto status = cuda_->Synchronize();
    EXPECT_TRUE(status.ok()) << status;
    EXPECT_TRUE(cpu_->CopyToHost(cpu.data(), twin.cpu.data(), cpu.size() * sizeof(float)).ok());
    EXPECT_TRUE(cuda_->CopyToHost(gpu.data(), twin.cuda.data(), gpu.size() * sizeof(float)).ok());
    return {std::move(cpu), std::move(gpu)};
  }
  double Error(const Twin& twin) {
    auto [cpu, gpu] = Get(twin);
    return RelativeError(gpu, cpu);
  }

  // Runs `op(backend, on_gpu)` on both backends, expecting OK.
  template <typename Op>
  void Both(Op&& op) {
    for (bool gpu : {false, true}) {
      const absl::Status status = op(gpu ? *cuda_ : *cpu_, gpu);
      ASSERT_TRUE(status.ok()) << (gpu ? "cuda: " : "cpu: ") << status;
    }
  }

  double tolerance() const { return GetParam().product_tolerance; }

  std::mt19937 rng_{1234};
  WeightFactory factory_{42};
  ModelWeights model_;
  std::unique_ptr<Backend> cpu_, cuda_;
  KvCacheShape kv_shape_;
  int32_t heads_ = 0;
  std::vector<int32_t> free_blocks_;
  std::vector<std::vector<int32_t>> tables_;
};

TEST_P(CudaBackendTest, ElementwiseOps) {
  // Positions around 1000: large RoPE angles.
  const ForwardBatch batch = MakeBatch({{1000, 37}});
  Begin(batch);
  const int64_t tokens = batch.num_tokens();
  const LayerWeights& layer = model_.layers[0];

  const Twin embedded = Poisoned(tokens, kHidden);
  Both([&](Backend& b, bool gpu) { return b.Embed(*model_.embed_tokens, embedded.on(gpu)); });
  EXPECT_EQ(Error(embedded), 0.0) << "Embed";

  const Twin x = Put(Random(tokens * kHidden), tokens, kHidden);
  const Twin normed = Poisoned(tokens, kHidden);
  Both([&](Backend& b, bool gpu) {
    return b.RmsNorm(x.on(gpu), *layer.input_norm, 1e-6f, normed.on(gpu));
  });
  EXPECT_LE(Error(normed), 1e-6) << "RmsNorm";

  // Per-head norm in place: [tokens * heads, head_dim].
  const Twin heads = Put(Random(tokens * kHeads * kHeadDim, 3.0f), tokens * kHeads, kHeadDim);
  Both([&](Backend& b, bool gpu) {
    return b.RmsNorm(heads.on(gpu), *layer.q_norm, 1e-5f, heads.on(gpu));
  });
  EXPECT_LE(Error(heads), 1e-6) << "RmsNorm per head, in place";

  const Twin rotated = Put(Random(tokens * kHeads * kHeadDim), tokens, kHeads * kHeadDim);
  Both([&](Backend& b, bool gpu) { return b.Rope(rotated.on(gpu), kHeadDim, 1e6); });
  EXPECT_LE(Error(rotated), 1e-6) << "Rope";

  const Twin clamped = Put(Random(tokens * kHidden, 2.0f), tokens, kHidden);
  Both([&](Backend& b, bool gpu) { return b.Clamp(clamped.on(gpu), 0.75f); });
  EXPECT_EQ(Error(clamped), 0.0) << "Clamp";

  const Twin filled = Poisoned(tokens, kHidden);
  Both([&](Backend& b, bool gpu) { return b.Fill(filled.on(gpu), 0.25f); });
  EXPECT_EQ(Error(filled), 0.0) << "Fill";

  const Twin residual = Put(Random(tokens * kHidden), tokens, kHidden);
  Both([&](Backend& b, bool gpu) { return b.AddInPlace(residual.on(gpu), x.on(gpu)); });
  EXPECT_EQ(Error(residual), 0.0) << "AddInPlace";

  const Twin shared = Put(Random(tokens * kHidden), tokens, kHidden);
  const Twin gated = Put(Random(tokens * kHidden), tokens, kHidden);
  Both([&](Backend& b, bool gpu) {
    return b.AddGated(x.on(gpu), *layer.shared_expert_gate, shared.on(gpu), gated.on(gpu));
  });
  EXPECT_LE(Error(gated), 1e-6) << "AddGated";

  const std::vector<int32_t> rows = {5, 0, 36, 5};
  const Twin gathered = Poisoned(4, kHidden);
  Both([&](Backend& b, bool gpu) { return b.GatherRows(x.on(gpu), rows, gathered.on(gpu)); });
  EXPECT_EQ(Error(gathered), 0.0) << "GatherRows";
  const Twin last = Poisoned(1, kHidden);
  Both([&](Backend& b, bool gpu) {
    return b.GatherRows(x.on(gpu), batch.logits_rows, last.on(gpu));
  });
  EXPECT_EQ(Error(last), 0.0) << "GatherRows (the batch's logits rows)";
}

TEST_P(CudaBackendTest, Linear) {
  const LayerWeights& bf16 = model_.layers[0];
  const LayerWeights& wide = model_.layers[1];
  for (int64_t rows : {1, 2, 3, 8, 9, 16, 17, 48, 130}) {
    const Twin x = Put(Random(rows * kHidden), rows, kHidden);
    struct Case {
      const char* name;
      const TensorView* weight;
      const TensorView* bias;
    };
    for (const Case& c : {Case{"bf16 + bias", bf16.q, bf16.q_bias}, Case{"f32", wide.q, nullptr},
                          Case{"f16", wide.k, nullptr}, Case{"lm_head", model_.lm_head, nullptr}}) {
      const Twin out = Poisoned(rows, c.weight->shape[0]);
      Both([&](Backend& b, bool gpu) {
        return b.Linear(x.on(gpu), *c.weight, c.bias, out.on(gpu));
      });
      EXPECT_LE(Error(out), tolerance()) << c.name << ", " << rows << " rows";
    }
    // [24, 37]: odd inner size (no 16-byte rows), and a strided input view.
    std::vector<float> padded = Random(rows * 40);
    const Twin odd_x = Put(padded, rows, 40);
    for (const TensorView* weight : {wide.v, wide.o}) {
      const Twin out = Poisoned(rows, 24);
      Both([&](Backend& b, bool gpu) {
        const Matrix in{odd_x.on(gpu).data, rows, 37, 40};
        return b.Linear(in, *weight, nullptr, out.on(gpu));
      });
      EXPECT_LE(Error(out), tolerance()) << weight->name << ", " << rows << " rows";
    }
  }
}

TEST_P(CudaBackendTest, SwigluMlp) {
  for (int64_t rows : {1, 5, 16, 17, 64}) {
    const Twin x = Put(Random(rows * kHidden), rows, kHidden);
    for (const LayerWeights* layer : {&model_.layers[0], &model_.layers[1]}) {
      const Twin out = Poisoned(rows, kHidden);
      Both([&](Backend& b, bool gpu) {
        return b.SwigluMlp(x.on(gpu), layer->dense_mlp, out.on(gpu));
      });
      EXPECT_LE(Error(out), tolerance()) << layer->dense_mlp.gate->name << ", " << rows << " rows";
    }
  }
}

TEST_P(CudaBackendTest, RouteAndExperts) {
  for (int64_t tokens : {1, 3, 16, 64, 300}) {
    for (const LayerWeights* layer : {&model_.layers[0], &model_.layers[1]}) {
      const bool normalize = tokens % 2 == 0;
      const Twin x = Put(Random(tokens * kHidden), tokens, kHidden);
      const Twin ids = Poisoned(tokens, kTopK);  // int32 through float-sized buffers
      const Twin weights = Poisoned(tokens, kTopK);
      std::vector<double> mass_cpu(kExperts, 0.0), mass_gpu(kExperts, 0.0);
      double z_cpu = 0.0, z_gpu = 0.0;
      Both([&](Backend& b, bool gpu) {
        const RoutingResult result{reinterpret_cast<int32_t*>(ids.on(gpu).data),
                                   weights.on(gpu).data};
        return b.Route(x.on(gpu), *layer->router, kTopK, normalize, result,
                       gpu ? std::span<double>(mass_gpu) : std::span<double>(mass_cpu),
                       gpu ? &z_gpu : &z_cpu);
      });
      const std::string what = absl::StrCat(layer->router->name, ", ", tokens, " tokens");
      auto [ids_cpu_f, ids_gpu_f] = Get(ids);  // synchronizes: statistics arrive
      std::vector<int32_t> ids_cpu(tokens * kTopK), ids_gpu(tokens * kTopK);
      std::memcpy(ids_cpu.data(), ids_cpu_f.data(), ids_cpu.size() * 4);
      std::memcpy(ids_gpu.data(), ids_gpu_f.data(), ids_gpu.size() * 4);
      // The router stays fp32 in every mode (bf16 activations included), as on the CPU.
      EXPECT_EQ(ids_gpu, ids_cpu) << what;
      EXPECT_LE(Error(weights), tolerance()) << what;
      EXPECT_LE(RelativeError(mass_gpu, mass_cpu), tolerance()) << what;
      EXPECT_NEAR(z_gpu, z_cpu, tolerance() * std::abs(z_cpu) + 1e-9) << what;
      EXPECT_NEAR(std::accumulate(mass_gpu.begin(), mass_gpu.end(), 0.0), tokens, 1e-4 * tokens);

      // MoeExperts on the CPU's routing in both backends, accumulating into the same values.
      const Twin cpu_ids = Put(ids_cpu_f, tokens, kTopK);
      auto [weights_cpu, unused] = Get(weights);
      const Twin cpu_weights = Put(weights_cpu, tokens, kTopK);
      const Twin out = Put(Random(tokens * kHidden, 0.01f), tokens, kHidden);
      Both([&](Backend& b, bool gpu) {
        const RoutingResult routing{reinterpret_cast<int32_t*>(cpu_ids.on(gpu).data),
                                    cpu_weights.on(gpu).data};
        return b.MoeExperts(x.on(gpu), layer->experts, kTopK, routing, out.on(gpu));
      });
      EXPECT_LE(Error(out), tolerance()) << "MoeExperts, " << what;
    }
  }
}

// The device-side greedy choice: the same ids as the CPU backend (and ArgMax) over ties, NaNs,
// infinities and random rows, at widths below, around and far above a thread block.
TEST_P(CudaBackendTest, RowArgMax) {
  for (int64_t cols : {16, 300, 50304}) {
    int64_t rows = 0;
    const std::vector<float> values = testing_util::ArgMaxTestRows(cols, rows);
    const Twin x = Put(values, rows, cols);
    const Twin ids = Poisoned(rows, 1);  // int32 ids in float-sized slots
    Both([&](Backend& b, bool gpu) {
      return b.RowArgMax(x.on(gpu), reinterpret_cast<int32_t*>(ids.on(gpu).data));
    });
    auto [cpu, gpu] = Get(ids);
    for (int64_t r = 0; r < rows; ++r) {
      int32_t cpu_id = 0, gpu_id = 0;
      std::memcpy(&cpu_id, &cpu[r], sizeof(int32_t));
      std::memcpy(&gpu_id, &gpu[r], sizeof(int32_t));
      EXPECT_EQ(gpu_id, cpu_id) << "row " << r << " of " << cols;
      EXPECT_EQ(cpu_id, ArgMax(std::span<const float>(values).subspan(r * cols, cols)));
    }
  }
}

TEST_P(CudaBackendTest, BadExpertIdIsReported) {
  const int64_t tokens = 2;
  const Twin x = Put(Random(tokens * kHidden), tokens, kHidden);
  std::vector<int32_t> ids = {0, 1, 2, 3, 4, 5, 6, kExperts + 3};
  std::vector<float> ids_as_float(ids.size());
  std::memcpy(ids_as_float.data(), ids.data(), ids.size() * 4);
  const Twin device_ids = Put(ids_as_float, tokens, kTopK);
  const Twin weights = Put(std::vector<float>(tokens * kTopK, 0.25f), tokens, kTopK);
  const Twin out = Put(Random(tokens * kHidden), tokens, kHidden);
  const RoutingResult routing{reinterpret_cast<int32_t*>(device_ids.on(true).data),
                              weights.on(true).data};
  ASSERT_TRUE(
      cuda_->MoeExperts(x.on(true), model_.layers[0].experts, kTopK, routing, out.on(true)).ok());
  const absl::Status status = cuda_->Synchronize();
  EXPECT_EQ(status.code(), absl::StatusCode::kInternal) << status;
  EXPECT_TRUE(cuda_->Synchronize().ok()) << "the error is reported once";
}

TEST_P(CudaBackendTest, UnpreparedWeightAndBadTokenAreErrors) {
  WeightFactory other(7);
  const TensorView* stranger = other.Make("stranger", DType::kBF16, {8, kHidden}, 0.1f);
  const Twin x = Put(Random(kHidden), 1, kHidden);
  const Twin out = Poisoned(1, 8);
  EXPECT_EQ(cuda_->Linear(x.on(true), *stranger, nullptr, out.on(true)).code(),
            absl::StatusCode::kFailedPrecondition);
  ForwardBatch batch = MakeBatch({{0, 1}});
  batch.token_ids[0] = static_cast<int32_t>(kVocab);
  ASSERT_TRUE(cuda_->BeginStep(batch).ok());
  const Twin embedded = Poisoned(1, kHidden);
  EXPECT_EQ(cuda_->Embed(*model_.embed_tokens, embedded.on(true)).code(),
            absl::StatusCode::kInvalidArgument);
}

// Paged attention: a prefill step fills the cache, then a mixed step (a long decode, a
// continued prefill chunk, a fresh prompt) attends over non-contiguous block tables.
struct AttentionShape {
  int32_t heads, kv_heads, head_dim;
};

// Over an f32 and a bf16 KV cache (both backends round K/V to nearest even: the same cached
// values, so the same tolerance).
TEST_P(CudaBackendTest, Attention) {
  for (const auto& [shape, kv_dtype] : {std::pair{AttentionShape{8, 2, 32}, DType::kF32},
                                        std::pair{AttentionShape{4, 4, 16}, DType::kF32},
                                        std::pair{AttentionShape{40, 1, 64}, DType::kF32},
                                        std::pair{AttentionShape{8, 2, 32}, DType::kBF16},
                                        std::pair{AttentionShape{40, 1, 64}, DType::kBF16}}) {
    AllocateKv(shape.heads, shape.kv_heads, shape.head_dim, kv_dtype);
    const int64_t q_dim = int64_t{shape.heads} * shape.head_dim;
    const int64_t kv_dim = int64_t{shape.kv_heads} * shape.head_dim;
    for (int32_t window : {0, 50}) {
      const AttentionParams params{.layer = 1,
                                   .num_heads = shape.heads,
                                   .num_kv_heads = shape.kv_heads,
                                   .head_dim = shape.head_dim,
                                   .scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim)),
                                   .sliding_window = window};
      tables_.clear();
      free_blocks_.resize(kNumBlocks);
      std::iota(free_blocks_.begin(), free_blocks_.end(), 0);
      std::shuffle(free_blocks_.begin(), free_blocks_.end(), rng_);
      for (const std::vector<SequenceSpec>& specs :
           {std::vector<SequenceSpec>{{0, 700}, {0, 40}},
            std::vector<SequenceSpec>{{700, 1}, {40, 20}, {0, 7}}}) {
        const ForwardBatch batch = MakeBatch(specs);
        Begin(batch);
        const int64_t tokens = batch.num_tokens();
        const Twin k = Put(Random(tokens * kv_dim), tokens, kv_dim);
        const Twin v = Put(Random(tokens * kv_dim), tokens, kv_dim);
        const Twin q = Put(Random(tokens * q_dim, 2.0f), tokens, q_dim);
        const Twin out = Poisoned(tokens, q_dim);
        Both([&](Backend& b, bool gpu) {
          absl::Status status = b.WriteKv(params.layer, k.on(gpu), v.on(gpu));
          if (!status.ok()) return status;
          return b.Attention(params, q.on(gpu), out.on(gpu));
        });
        EXPECT_LE(Error(out), 1e-5)
            << shape.heads << "/" << shape.kv_heads << "x" << shape.head_dim << " window " << window
            << ", " << tokens << " tokens, KV " << DTypeName(kv_dtype);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, CudaBackendTest, testing::ValuesIn(kModes),
                         [](const testing::TestParamInfo<Mode>& info) {
                           return std::string(info.param.name);
                         });

}  // namespace
}  // namespace moe
