// The same checkpoint stored as bf16, f32 and f16 gives the same logits: f32 holds the bf16
// values exactly (so results are bit-identical); f16 holds them to within its precision.
#include <cmath>
#include <cstring>
#include <filesystem>

#include "engine/model/safetensors.h"
#include "engine/model/safetensors_writer.h"
#include "engine/ops/model_runner.h"
#include "engine/ops/offline_batch.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

uint16_t FloatToF16(float value) {
  // Round to nearest even; the fixture's weights are small and normal in f16's range.
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xff) - 127 + 15;
  uint32_t mantissa = bits & 0x7fffffu;
  if (exponent <= 0) {  // subnormal in f16
    if (exponent < -10) return static_cast<uint16_t>(sign);
    mantissa |= 0x800000u;
    const int shift = 14 - exponent;
    uint32_t half = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1);
    const uint32_t midpoint = 1u << (shift - 1);
    if (remainder > midpoint || (remainder == midpoint && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  if (exponent >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  uint32_t half = (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
  const uint32_t remainder = mantissa & 0x1fffu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (half & 1))) ++half;
  return static_cast<uint16_t>(sign | half);
}

// Rewrites the mixtral fixture with every bf16 tensor converted to `dtype`.
std::string ConvertedFixture(DType dtype) {
  const fs::path source = fs::path(MOE_SOURCE_DIR) / "tests/fixtures/models/mixtral";
  const fs::path dir = fs::temp_directory_path() /
                       ("moe_dtype_" + std::string(DTypeName(dtype)) + std::to_string(::getpid()));
  fs::create_directories(dir);
  fs::copy_file(source / "config.json", dir / "config.json", fs::copy_options::overwrite_existing);
  auto store = TensorStore::OpenFile((source / "model.safetensors").string());
  EXPECT_TRUE(store.ok());
  std::vector<TensorToWrite> tensors;
  for (const auto& [name, view] : store->tensors()) {
    TensorToWrite tensor{name, dtype, view->shape, {}};
    const auto* bf16 = reinterpret_cast<const uint16_t*>(view->data);
    for (int64_t i = 0; i < view->num_elements(); ++i) {
      const float value = Bf16ToFloat(bf16[i]);
      uint8_t bytes[4];
      if (dtype == DType::kF32) {
        std::memcpy(bytes, &value, 4);
      } else {
        const uint16_t half = FloatToF16(value);
        std::memcpy(bytes, &half, 2);
      }
      tensor.bytes.insert(tensor.bytes.end(), bytes, bytes + DTypeSize(dtype));
    }
    tensors.push_back(std::move(tensor));
  }
  EXPECT_TRUE(WriteSafetensors((dir / "model.safetensors").string(), tensors).ok());
  return dir.string();
}

std::vector<float> PromptLogits(const std::string& model_dir) {
  ModelRunnerOptions options;
  options.model_dir = model_dir;
  options.kv_cache_bytes = 4 << 20;
  auto runner = ModelRunner::Create(options);
  EXPECT_TRUE(runner.ok()) << runner.status();
  if (!runner.ok()) return {};
  OfflineBatcher batcher((*runner)->block_size(), (*runner)->num_blocks());
  const std::vector<int32_t> prompt = {3, 14, 15, 92, 65, 35, 89, 79, 32, 38};
  ForwardBatch batch;
  EXPECT_TRUE(batcher.Append(batch, batcher.AddSequence(prompt.size()).value(), prompt, false).ok());
  for (int32_t row = 0; row < batch.num_tokens(); ++row) batch.logits_rows.push_back(row);
  auto output = (*runner)->Forward(batch);
  EXPECT_TRUE(output.ok()) << output.status();
  return output.ok() ? output->logits : std::vector<float>{};
}

TEST(WeightDtypeTest, F32AndF16CheckpointsMatchBf16) {
  const std::vector<float> bf16 =
      PromptLogits(std::string(MOE_SOURCE_DIR) + "/tests/fixtures/models/mixtral");
  const std::string f32_dir = ConvertedFixture(DType::kF32);
  const std::string f16_dir = ConvertedFixture(DType::kF16);
  const std::vector<float> f32 = PromptLogits(f32_dir);
  const std::vector<float> f16 = PromptLogits(f16_dir);
  ASSERT_EQ(f32.size(), bf16.size());
  ASSERT_EQ(f16.size(), bf16.size());
  EXPECT_EQ(f32, bf16);  // the same values, the same arithmetic
  double diff = 0, norm = 0;
  for (size_t i = 0; i < bf16.size(); ++i) {
    diff += (f16[i] - bf16[i]) * double(f16[i] - bf16[i]);
    norm += bf16[i] * double(bf16[i]);
  }
  EXPECT_LE(std::sqrt(diff / norm), 1e-3);
  fs::remove_all(f32_dir);
  fs::remove_all(f16_dir);
}

}  // namespace
}  // namespace moe
