// CPU backend kernels and thread pool: exactness of the fp32 path, batch invariance (a token's
// result never depends on which tile or batch computed it), the opt-in bf16-activation path's
// error bound, and ParallelFor covering every index exactly once.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "engine/backend/cpu/cpu_backend.h"
#include "engine/backend/cpu/kernels.h"
#include "engine/backend/cpu/thread_pool.h"
#include "engine/common/argmax.h"
#include "engine/model/dtype.h"
#include "engine/ops/model_runner.h"
#include "engine/ops/offline_batch.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "hwy/targets.h"
#include "tests/testing/argmax_rows.h"

namespace moe {
namespace {

struct Problem {
  int64_t tokens, in, rows;
  std::vector<float> x;      // [tokens, in]
  std::vector<uint16_t> w;   // [rows, in] bf16
  std::vector<float> w_f32;  // the same values as f32
};

Problem MakeProblem(int64_t tokens, int64_t in, int64_t rows, uint32_t seed) {
  Problem p{tokens, in, rows, {}, {}, {}};
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  p.x.resize(tokens * in);
  for (float& v : p.x) v = dist(rng);
  p.w.resize(rows * in);
  p.w_f32.resize(rows * in);
  for (int64_t i = 0; i < rows * in; ++i) {
    p.w[i] = FloatToBf16(dist(rng));
    p.w_f32[i] = Bf16ToFloat(p.w[i]);
  }
  return p;
}

// out[t][r] in double.
std::vector<double> Reference(const Problem& p, const std::vector<float>& x) {
  std::vector<double> out(p.tokens * p.rows);
  for (int64_t t = 0; t < p.tokens; ++t) {
    for (int64_t r = 0; r < p.rows; ++r) {
      double sum = 0;
      for (int64_t k = 0; k < p.in; ++k) sum += double(x[t * p.in + k]) * p.w_f32[r * p.in + k];
      out[t * p.rows + r] = sum;
    }
  }
  return out;
}

cpu::PackedMatrix Pack(const Problem& p, DType type) {
  const void* w = type == DType::kBF16 ? static_cast<const void*>(p.w.data()) : p.w_f32.data();
  absl::StatusOr<cpu::PackedMatrix> packed = cpu::PackedMatrix::Pack(w, type, p.rows, p.in);
  EXPECT_TRUE(packed.ok()) << packed.status();
  return *std::move(packed);
}

std::vector<float> RunFp32(const Problem& p, const cpu::PackedMatrix& w, int64_t token_begin,
                           int64_t tokens) {
  std::vector<float> out(tokens * p.rows);
  cpu::MatMulRows(p.x.data() + token_begin * p.in, p.in, tokens, w, 0, p.rows, out.data(), p.rows);
  return out;
}

TEST(PackedMatrixTest, LayoutIsFourRowBlocksOfThirtyTwoWideChunksZeroPadded) {
  const Problem p = MakeProblem(1, 40, 5, 3);  // 2 blocks (the second: 1 row), 2 chunks
  const cpu::PackedMatrix packed = Pack(p, DType::kBF16);
  ASSERT_EQ(packed.type(), DType::kBF16);
  ASSERT_EQ(packed.blocks(), 2);
  ASSERT_EQ(packed.chunks(), 2);
  const auto* data = static_cast<const uint16_t*>(packed.data());
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t c = 0; c < 2; ++c) {
      for (int64_t r = 0; r < 4; ++r) {
        for (int64_t i = 0; i < 32; ++i) {
          const int64_t row = b * 4 + r, k = c * 32 + i;
          const uint16_t expected = row < 5 && k < 40 ? p.w[row * 40 + k] : 0;
          ASSERT_EQ(data[((b * 2 + c) * 4 + r) * 32 + i], expected) << b << c << r << i;
        }
      }
    }
  }
  // f16 weights are widened to f32 exactly.
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x3555, 0x0001};  // 1, -2, ~1/3, 2^-24
  absl::StatusOr<cpu::PackedMatrix> widened =
      cpu::PackedMatrix::Pack(f16.data(), DType::kF16, 1, 4);
  ASSERT_TRUE(widened.ok());
  ASSERT_EQ(widened->type(), DType::kF32);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(static_cast<const float*>(widened->data())[i], F16ToFloat(f16[i]));
  }
  EXPECT_FALSE(cpu::PackedMatrix::Pack(f16.data(), DType::kI32, 1, 4).ok());
}

class MatMulShapes : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

TEST_P(MatMulShapes, Fp32PathIsAccurateAndBatchInvariant) {
  const auto [tokens, in, rows] = GetParam();
  const Problem p = MakeProblem(tokens, in, rows, 7);
  const std::vector<double> ref = Reference(p, p.x);
  const cpu::PackedMatrix w = Pack(p, DType::kBF16);
  const std::vector<float> all = RunFp32(p, w, 0, tokens);
  for (int64_t i = 0; i < tokens * rows; ++i) {
    EXPECT_NEAR(all[i], ref[i], 1e-5 * std::sqrt(double(in))) << i;
  }
  // f32 weights holding the same values: bit-identical.
  EXPECT_EQ(RunFp32(p, Pack(p, DType::kF32), 0, tokens), all);
  // Every token alone (decode tiles) and in odd-sized sub-batches: bit-identical.
  for (int64_t t = 0; t < tokens; ++t) {
    const std::vector<float> one = RunFp32(p, w, t, 1);
    for (int64_t r = 0; r < rows; ++r) ASSERT_EQ(one[r], all[t * rows + r]) << t << "," << r;
  }
  for (int64_t begin = 0; begin < tokens; begin += 3) {
    const int64_t n = std::min<int64_t>(3, tokens - begin);
    const std::vector<float> some = RunFp32(p, w, begin, n);
    for (int64_t i = 0; i < n * rows; ++i) ASSERT_EQ(some[i], all[begin * rows + i]);
  }
  // Split rows (as threads do, here across the 4-row blocks): the same values, and nothing
  // written outside each range.
  std::vector<float> split(tokens * rows, std::nanf(""));
  for (int64_t r0 = 0; r0 < rows; r0 += 5) {
    const int64_t r1 = std::min<int64_t>(rows, r0 + 5);
    const std::vector<float> before = split;
    cpu::MatMulRows(p.x.data(), in, tokens, w, r0, r1, split.data(), rows);
    for (int64_t i = 0; i < tokens * rows; ++i) {
      if (i % rows < r0) {
        ASSERT_EQ(split[i], before[i]) << i;
      }
      if (i % rows >= r1) {
        ASSERT_TRUE(std::isnan(split[i])) << i;
      }
    }
  }
  EXPECT_EQ(split, all);
}

TEST_P(MatMulShapes, Bf16ActivationPathIsCloseAndBatchInvariant) {
  if (!cpu::HasBf16DotProduct()) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  const auto [tokens, in, rows] = GetParam();
  const Problem p = MakeProblem(tokens, in, rows, 11);
  std::vector<uint16_t> xb(tokens * in);
  cpu::FloatToBf16Rows(p.x.data(), in, tokens, in, xb.data(), in);
  std::vector<float> x_rounded(tokens * in);
  for (int64_t i = 0; i < tokens * in; ++i) {
    ASSERT_EQ(xb[i], FloatToBf16(p.x[i]));  // round to nearest even, as the scalar helper
    x_rounded[i] = Bf16ToFloat(xb[i]);
  }
  const cpu::PackedMatrix w = Pack(p, DType::kBF16);
  auto run = [&](int64_t begin, int64_t n) {
    std::vector<float> out(n * rows);
    cpu::MatMulRowsBf16(xb.data() + begin * in, in, n, w, 0, rows, out.data(), rows);
    return out;
  };
  const std::vector<float> all = run(0, tokens);
  // Against the exact products of the rounded activations: only fp32 summation error.
  const std::vector<double> ref_rounded = Reference(p, x_rounded);
  // Against the unrounded activations: bf16 rounding of x (2^-9 relative per element).
  const std::vector<double> ref = Reference(p, p.x);
  for (int64_t i = 0; i < tokens * rows; ++i) {
    EXPECT_NEAR(all[i], ref_rounded[i], 1e-5 * std::sqrt(double(in))) << i;
    EXPECT_NEAR(all[i], ref[i], 4e-3 * std::sqrt(double(in))) << i;
  }
  for (int64_t t = 0; t < tokens; ++t) {
    const std::vector<float> one = run(t, 1);
    for (int64_t r = 0; r < rows; ++r) ASSERT_EQ(one[r], all[t * rows + r]) << t << "," << r;
  }
  std::vector<float> split(tokens * rows);
  for (int64_t r0 = 0; r0 < rows; r0 += 5) {
    cpu::MatMulRowsBf16(xb.data(), in, tokens, w, r0, std::min<int64_t>(rows, r0 + 5), split.data(),
                        rows);
  }
  EXPECT_EQ(split, all);
}

INSTANTIATE_TEST_SUITE_P(Shapes, MatMulShapes,
                         ::testing::Values(std::make_tuple(1, 64, 4), std::make_tuple(3, 100, 9),
                                           std::make_tuple(4, 1024, 8), std::make_tuple(9, 333, 13),
                                           // 4 token tiles over 3 k segments and a tail.
                                           std::make_tuple(13, 2085, 10),
                                           std::make_tuple(37, 2816, 21),
                                           std::make_tuple(150, 1024, 6)));

TEST(SiluMulTest, CloseToStdExpAndIndependentOfTheRange) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> dist(-30.0f, 30.0f);
  std::vector<float> gate(1000), up(1000), out(1000);
  for (size_t i = 0; i < gate.size(); ++i) {
    gate[i] = dist(rng);
    up[i] = dist(rng);
  }
  gate[0] = -100.0f;  // exp(100) overflows float: clamped
  gate[1] = 100.0f;
  gate[2] = 0.0f;
  cpu::SiluMul(gate.data(), up.data(), out.data(), static_cast<int64_t>(gate.size()));
  for (size_t i = 0; i < gate.size(); ++i) {
    const double g = gate[i], expected = g / (1.0 + std::exp(-g)) * up[i];
    ASSERT_NEAR(out[i], expected, 1e-6 * std::abs(expected) + 1e-30) << i << " g=" << g;
  }
  // Any sub-range (threads split the rows; the tail runs on a padded copy): the same bits.
  for (int64_t begin : {0, 3, 17}) {
    for (int64_t end : {5, 21, 999}) {
      if (end <= begin) continue;
      std::vector<float> part(end - begin);
      cpu::SiluMul(gate.data() + begin, up.data() + begin, part.data(), end - begin);
      for (int64_t i = begin; i < end; ++i) ASSERT_EQ(part[i - begin], out[i]) << begin << " " << i;
    }
  }
}

TEST(AttentionKernelsTest, GroupedRowKernelsEqualDotAndAxpyBitForBit) {
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  // 1-7 heads: the 4-head blocks and every remainder; 37 positions: 4-position blocks + 1.
  for (int64_t heads : {1, 3, 4, 5, 7}) {
    for (int64_t dim : {64, 128, 72, 5}) {
      std::vector<float> base(50 * 200), q(heads * dim), weights(heads * 37);
      for (float& v : base) v = dist(rng);
      for (float& v : q) v = dist(rng);
      for (float& v : weights) v = dist(rng);
      const int64_t n = 37;
      std::vector<int64_t> rows(n);
      for (int64_t p = 0; p < n; ++p) rows[p] = (p * 7919) % 45 * 200 + (p % 3);
      std::vector<float> scores(heads * n), sums(heads * dim);
      cpu::DotRows(q.data(), heads, base.data(), rows.data(), n, dim, scores.data());
      cpu::WeightedSumRows(weights.data(), heads, base.data(), rows.data(), n, dim, sums.data());
      for (int64_t h = 0; h < heads; ++h) {
        std::vector<float> expected(dim, 0.0f);
        for (int64_t p = 0; p < n; ++p) {
          ASSERT_EQ(scores[h * n + p], cpu::DotF32(q.data() + h * dim, base.data() + rows[p], dim))
              << heads << " " << dim << " " << h << " " << p;
          cpu::AxpyF32(weights[h * n + p], base.data() + rows[p], expected.data(), dim);
        }
        for (int64_t d = 0; d < dim; ++d) {
          ASSERT_EQ(sums[h * dim + d], expected[d]) << heads << " " << dim << " " << h << " " << d;
        }
      }
      // A bf16 KV cache: the same bits as the float kernels on the rows widened to float.
      std::vector<uint16_t> base_bf16(base.size());
      std::vector<float> widened(base.size());
      for (size_t i = 0; i < base.size(); ++i) {
        base_bf16[i] = FloatToBf16(base[i]);
        widened[i] = Bf16ToFloat(base_bf16[i]);
      }
      std::vector<float> bf16_scores(heads * n), bf16_sums(heads * dim);
      cpu::DotRows(q.data(), heads, base_bf16.data(), rows.data(), n, dim, bf16_scores.data());
      cpu::WeightedSumRows(weights.data(), heads, base_bf16.data(), rows.data(), n, dim,
                           bf16_sums.data());
      cpu::DotRows(q.data(), heads, widened.data(), rows.data(), n, dim, scores.data());
      cpu::WeightedSumRows(weights.data(), heads, widened.data(), rows.data(), n, dim, sums.data());
      ASSERT_EQ(bf16_scores, scores) << heads << " " << dim;
      ASSERT_EQ(bf16_sums, sums) << heads << " " << dim;
      ASSERT_NE(widened, base);  // the rounding happened
    }
  }
}

// The kernels on every instruction set this build dispatches to that the machine has (AVX-512,
// AVX2, SSE4, SSSE3, scalar): each target's own shuffles and lane counts, the same contracts.
TEST(KernelTargetsTest, EveryTargetIsAccurateAndKeepsItsBitIdentities) {
  const Problem p = MakeProblem(13, 2085, 10, 5);  // 4 token tiles, 3 k segments, a tail
  const std::vector<double> ref = Reference(p, p.x);
  const cpu::PackedMatrix bf16 = Pack(p, DType::kBF16), f32 = Pack(p, DType::kF32);
  // Attention over a bf16 KV cache: 5 heads of dim 72 (a 4-head block, a remainder, a tail).
  const int64_t heads = 5, dim = 72, n = 37;
  std::vector<uint16_t> kv(n * dim);
  std::vector<float> widened(n * dim), q(heads * dim), weights(heads * n);
  std::vector<int64_t> rows(n);
  for (int64_t i = 0; i < n * dim; ++i) widened[i] = Bf16ToFloat(kv[i] = p.w[i]);
  for (int64_t i = 0; i < heads * dim; ++i) q[i] = p.x[i];
  for (int64_t i = 0; i < heads * n; ++i) weights[i] = p.x[heads * dim + i];
  for (int64_t i = 0; i < n; ++i) rows[i] = (i * 11) % n * dim;
  const std::vector<int64_t> targets = hwy::SupportedAndGeneratedTargets();
  ASSERT_GE(targets.size(), 2u);
  for (int64_t target : targets) {
    hwy::SetSupportedTargetsForTest(target);
    ASSERT_STREQ(cpu::SelectedTarget(), hwy::TargetName(target));
    const std::vector<float> all = RunFp32(p, bf16, 0, p.tokens);
    for (int64_t i = 0; i < p.tokens * p.rows; ++i) {
      ASSERT_NEAR(all[i], ref[i], 1e-5 * std::sqrt(double(p.in))) << hwy::TargetName(target);
    }
    EXPECT_EQ(RunFp32(p, f32, 0, p.tokens), all) << hwy::TargetName(target);
    for (int64_t t = 0; t < p.tokens; ++t) {
      const std::vector<float> one = RunFp32(p, bf16, t, 1);
      ASSERT_TRUE(std::equal(one.begin(), one.end(), all.begin() + t * p.rows))
          << hwy::TargetName(target) << " token " << t;
    }
    std::vector<float> scores(heads * n), widened_scores(heads * n);
    std::vector<float> sums(heads * dim), widened_sums(heads * dim);
    cpu::DotRows(q.data(), heads, kv.data(), rows.data(), n, dim, scores.data());
    cpu::DotRows(q.data(), heads, widened.data(), rows.data(), n, dim, widened_scores.data());
    cpu::WeightedSumRows(weights.data(), heads, kv.data(), rows.data(), n, dim, sums.data());
    cpu::WeightedSumRows(weights.data(), heads, widened.data(), rows.data(), n, dim,
                         widened_sums.data());
    EXPECT_EQ(scores, widened_scores) << hwy::TargetName(target);
    EXPECT_EQ(sums, widened_sums) << hwy::TargetName(target);
    EXPECT_NEAR(scores[3 * n + 5],
                std::inner_product(q.begin() + 3 * dim, q.begin() + 4 * dim,
                                   widened.begin() + rows[5], 0.0),
                1e-4)
        << hwy::TargetName(target);
  }
  hwy::SetSupportedTargetsForTest(0);  // back to what the machine has
}

TEST(AttentionKernelsTest, ScaledSoftmaxMatchesDoublePrecision) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> dist(-40.0f, 40.0f);
  for (int64_t n : {1, 5, 16, 37, 300}) {
    std::vector<float> x(n);
    for (float& v : x) v = dist(rng);
    std::vector<float> y = x;
    cpu::ScaledSoftmax(y.data(), n, 0.125f);
    double max_score = -1e30, total = 0;
    for (float v : x) max_score = std::max(max_score, 0.125 * v);
    for (float v : x) total += std::exp(0.125 * v - max_score);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double expected = std::exp(0.125 * x[i] - max_score) / total;
      ASSERT_NEAR(y[i], expected, 1e-6 * expected + 1e-30) << n << " " << i;
      sum += y[i];
    }
    EXPECT_NEAR(sum, 1.0, 1e-5) << n;
  }
}

TEST(CpuBackendTest, MatmulWeightsMustBePreparedFirst) {
  const std::vector<float> values = {1, 2, 3, 4, 5, 6};  // [3, 2]
  auto view = [&](const char* name) {
    TensorView v;
    v.name = name;
    v.dtype = DType::kF32;
    v.shape = {3, 2};
    v.data = reinterpret_cast<const std::byte*>(values.data());
    v.num_bytes = static_cast<int64_t>(values.size() * sizeof(float));
    return v;
  };
  const TensorView head = view("lm_head"), stranger = view("stranger");
  ModelWeights weights;
  weights.lm_head = &head;
  const std::unique_ptr<Backend> cpu = CreateCpuBackend({.num_threads = 2});
  ASSERT_TRUE(cpu->PrepareWeights(weights).ok());
  std::vector<float> x = {1, -1}, out(3);
  const Matrix in = Matrix::Dense(x.data(), 1, 2), result = Matrix::Dense(out.data(), 1, 3);
  ASSERT_TRUE(cpu->Linear(in, head, nullptr, result).ok());
  EXPECT_EQ(out, (std::vector<float>{-1, -1, -1}));
  const absl::Status status = cpu->Linear(in, stranger, nullptr, result);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition) << status;
  EXPECT_NE(status.message().find("stranger"), absl::string_view::npos) << status;
}

TEST(CpuBackendTest, RowArgMaxIsArgMaxOfEachRow) {
  const std::unique_ptr<Backend> cpu = CreateCpuBackend({.num_threads = 2});
  for (int64_t cols : {16, 1000, 50000}) {
    int64_t rows = 0;
    std::vector<float> values = testing_util::ArgMaxTestRows(cols, rows);
    std::vector<int32_t> ids(rows, -1);
    ASSERT_TRUE(cpu->RowArgMax(Matrix::Dense(values.data(), rows, cols), ids.data()).ok());
    for (int64_t r = 0; r < rows; ++r) {
      EXPECT_EQ(ids[r], ArgMax(std::span<const float>(values).subspan(r * cols, cols)))
          << "row " << r << " of " << cols;
    }
    EXPECT_EQ(ids[1], 7);  // the tie
    EXPECT_EQ(ids[2], 0);  // NaN in column 0
    EXPECT_EQ(ids[5], cols - 1);
  }
}

TEST(ThreadPoolTest, EveryIndexExactlyOnce) {
  cpu::ThreadPool pool(3);
  std::mt19937 rng(3);
  for (int iteration = 0; iteration < 2000; ++iteration) {
    const int64_t count = std::uniform_int_distribution<int64_t>(1, 5000)(rng);
    const int64_t grain = std::uniform_int_distribution<int64_t>(1, 64)(rng);
    std::vector<std::atomic<int>> hits(count);
    pool.ParallelFor(count, grain, [&](int64_t begin, int64_t end) {
      ASSERT_TRUE(begin % grain == 0 || begin == 0);
      for (int64_t i = begin; i < end; ++i) hits[i].fetch_add(1);
    });
    for (int64_t i = 0; i < count; ++i) ASSERT_EQ(hits[i].load(), 1) << iteration << " " << i;
  }
}

TEST(ThreadPoolTest, WorkersThatSleptWakeUp) {
  cpu::ThreadPool pool(2);
  for (int round = 0; round < 3; ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));  // workers go to sleep
    std::atomic<int64_t> sum{0};
    pool.ParallelFor(1000, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) sum += i;
    });
    EXPECT_EQ(sum.load(), 999 * 1000 / 2);
  }
}

// ---- whole model: the opt-in lower-precision paths ---------------------------------------

// Logits of two prompts prefilled, then 6 greedy decode steps of both (the decode steps read
// the cache the prefill wrote); each sequence in its own batches, or packed together.
std::vector<float> Logits(bool bf16_activations, DType kv_cache_dtype, bool packed) {
  ModelRunnerOptions options;
  options.model_dir = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/models/mixtral";
  options.kv_cache_bytes = 4 << 20;
  options.num_threads = 2;
  options.cpu_bf16_activations = bf16_activations;
  options.kv_cache_dtype = kv_cache_dtype;
  auto runner = ModelRunner::Create(options);
  EXPECT_TRUE(runner.ok()) << runner.status();
  if (!runner.ok()) return {};
  std::vector<std::vector<int32_t>> next = {{3, 14, 15, 92, 65, 35, 89, 79, 32, 38},
                                            {2, 71, 82, 81, 82, 8}};
  OfflineBatcher batcher((*runner)->block_size(), (*runner)->num_blocks());
  for (size_t s = 0; s < next.size(); ++s) EXPECT_TRUE(batcher.AddSequence(64).ok());
  std::vector<float> logits;
  for (int step = 0; step < 7; ++step) {
    ForwardBatch batch;
    for (size_t s = 0; s < next.size(); ++s) {
      EXPECT_TRUE(batcher.Append(batch, s, next[s], true).ok());
      if (packed && s + 1 < next.size()) continue;
      auto output = (*runner)->Forward(batch);
      EXPECT_TRUE(output.ok()) << output.status();
      if (!output.ok()) return {};
      logits.insert(logits.end(), output->logits.begin(), output->logits.end());
      batch = ForwardBatch();
    }
    const int64_t vocab = (*runner)->config().vocab_size;
    for (size_t s = 0; s < next.size(); ++s) {
      const auto row = logits.end() - (next.size() - s) * vocab;
      next[s] = {static_cast<int32_t>(std::max_element(row, row + vocab) - row)};
    }
  }
  return logits;
}

// The bound an option documents: relative RMS error over all logits, and the largest error
// against the largest logit.
void ExpectCloseToExact(const std::vector<float>& exact, const std::vector<float>& other,
                        double bound) {
  ASSERT_EQ(exact.size(), other.size());
  ASSERT_FALSE(exact.empty());
  double diff = 0, norm = 0, max_abs = 0, max_err = 0;
  for (size_t i = 0; i < exact.size(); ++i) {
    diff += (other[i] - exact[i]) * double(other[i] - exact[i]);
    norm += exact[i] * double(exact[i]);
    max_abs = std::max(max_abs, std::abs(double(exact[i])));
    max_err = std::max(max_err, std::abs(double(other[i]) - exact[i]));
  }
  testing::Test::RecordProperty("relative_rms_error", std::to_string(std::sqrt(diff / norm)));
  testing::Test::RecordProperty("max_error_over_max_logit", std::to_string(max_err / max_abs));
  EXPECT_LE(std::sqrt(diff / norm), bound);
  EXPECT_LE(max_err / max_abs, bound);
  EXPECT_NE(exact, other);  // the option really took the other path
}

TEST(Bf16ActivationsTest, LogitsCloseToExactAndBatchInvariant) {
  if (!cpu::HasBf16DotProduct()) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  const std::vector<float> bf16 = Logits(true, DType::kF32, false);
  ExpectCloseToExact(Logits(false, DType::kF32, false), bf16, 2e-2);
  // Packed with another sequence: bit-identical to each sequence alone.
  EXPECT_EQ(Logits(true, DType::kF32, true), bf16);
}

TEST(Bf16KvCacheTest, LogitsCloseToExactAndBatchInvariant) {
  const std::vector<float> bf16_kv = Logits(false, DType::kBF16, false);
  ExpectCloseToExact(Logits(false, DType::kF32, false), bf16_kv, 2e-2);
  EXPECT_EQ(Logits(false, DType::kBF16, true), bf16_kv);
}

TEST(Bf16KvCacheTest, HoldsTwiceTheBlocksAndRefusesOtherTypes) {
  ModelRunnerOptions options;
  options.model_dir = std::string(MOE_SOURCE_DIR) + "/tests/fixtures/models/mixtral";
  options.kv_cache_bytes = 4 << 20;
  options.num_threads = 1;
  auto f32 = ModelRunner::Create(options);
  options.kv_cache_dtype = DType::kBF16;
  auto bf16 = ModelRunner::Create(options);
  ASSERT_TRUE(f32.ok() && bf16.ok()) << f32.status() << bf16.status();
  EXPECT_EQ((*bf16)->num_blocks(), 2 * (*f32)->num_blocks());
  options.kv_cache_dtype = DType::kF16;
  auto f16 = ModelRunner::Create(options);
  EXPECT_EQ(f16.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(f16.status().message()),
              testing::HasSubstr("KV cache type F16 is not supported; supported: F32, BF16"));
  EXPECT_EQ(*ParseKvCacheDType("bf16"), DType::kBF16);
  EXPECT_EQ(*ParseKvCacheDType("f32"), DType::kF32);
  EXPECT_THAT(std::string(ParseKvCacheDType("fp8").status().message()),
              testing::HasSubstr("KV cache type 'fp8' is not supported; supported: f32, bf16"));
}

}  // namespace
}  // namespace moe
