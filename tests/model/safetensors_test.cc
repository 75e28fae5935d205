// The safetensors loader refuses every kind of damaged file with a message naming the file
// and tensor, and never reads out of bounds (these run under ASan in the sanitizer preset).
#include <filesystem>
#include <fstream>

#include "engine/model/loaded_model.h"
#include "engine/model/safetensors.h"
#include "engine/model/safetensors_writer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe {
namespace {

using testing::HasSubstr;
namespace fs = std::filesystem;

TensorToWrite Bf16Tensor(const std::string& name, std::vector<int64_t> shape) {
  int64_t elements = 1;
  for (int64_t dim : shape) elements *= dim;
  TensorToWrite tensor{name, DType::kBF16, shape, std::vector<uint8_t>(elements * 2)};
  for (size_t i = 0; i < tensor.bytes.size(); ++i) tensor.bytes[i] = static_cast<uint8_t>(i * 7);
  return tensor;
}

class SafetensorsTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("moe_safetensors_" + std::to_string(::getpid()) + "_" +
            testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string WriteRaw(const std::string& name, const std::string& contents) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }
  // A file whose header is `json` (padded) followed by `data_bytes` zero bytes.
  std::string WriteWithHeader(const std::string& json, size_t data_bytes) {
    std::string contents(8, '\0');
    for (int i = 0; i < 8; ++i) contents[i] = static_cast<char>((json.size() >> (8 * i)) & 0xff);
    contents += json;
    contents.append(data_bytes, '\0');
    return WriteRaw("model.safetensors", contents);
  }

  fs::path dir_;
};

TEST_F(SafetensorsTest, ReadsTensorsWritten) {
  const std::string path = (dir_ / "model.safetensors").string();
  ASSERT_TRUE(WriteSafetensors(path, {Bf16Tensor("a", {2, 3}), Bf16Tensor("b", {4})}).ok());
  auto store = TensorStore::OpenFile(path);
  ASSERT_TRUE(store.ok()) << store.status();
  const TensorView* a = store->Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->num_bytes, 12);
  EXPECT_EQ(static_cast<uint8_t>(a->data[5]), 35);
  EXPECT_EQ(store->Find("missing"), nullptr);
  EXPECT_TRUE(store->GetWeight("b", {4}).ok());
}

TEST_F(SafetensorsTest, TruncatedFileNamesTheTensor) {
  const std::string contents = SerializeSafetensors({Bf16Tensor("layer.weight", {64, 64})});
  const std::string path = WriteRaw("model.safetensors", contents.substr(0, contents.size() - 100));
  auto store = TensorStore::OpenFile(path);
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr(path));
  EXPECT_THAT(store.status().message(), HasSubstr("'layer.weight'"));
  EXPECT_THAT(store.status().message(), HasSubstr("past the end"));
}

TEST_F(SafetensorsTest, TooShortForHeaderLength) {
  auto store = TensorStore::OpenFile(WriteRaw("model.safetensors", "abc"));
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("too short"));
}

TEST_F(SafetensorsTest, HeaderLengthPastEnd) {
  std::string contents(8, '\0');
  contents[0] = static_cast<char>(0xff);
  contents[1] = static_cast<char>(0xff);
  contents += "{}";
  auto store = TensorStore::OpenFile(WriteRaw("model.safetensors", contents));
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("header length"));
}

TEST_F(SafetensorsTest, HeaderNotJson) {
  auto store = TensorStore::OpenFile(WriteWithHeader("{not json", 0));
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("not a JSON object"));
}

TEST_F(SafetensorsTest, OverlappingOffsets) {
  const std::string header =
      R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
      R"("y":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})";
  auto store = TensorStore::OpenFile(WriteWithHeader(header, 24));
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("overlaps"));
}

TEST_F(SafetensorsTest, SizeDisagreesWithShape) {
  const std::string header = R"({"x":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}})";
  auto store = TensorStore::OpenFile(WriteWithHeader(header, 16));
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("'x'"));
  EXPECT_THAT(store.status().message(), HasSubstr("needs 20"));
}

TEST_F(SafetensorsTest, UnknownDtype) {
  const std::string header = R"({"x":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})";
  auto store = TensorStore::OpenFile(WriteWithHeader(header, 4));
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("F8_E4M3"));
  EXPECT_THAT(store.status().message(), HasSubstr("supported: BF16, F16, F32"));
}

TEST_F(SafetensorsTest, MalformedEntries) {
  for (const std::string& header : {
           std::string(R"({"x":{"shape":[1],"data_offsets":[0,4]}})"),
           std::string(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})"),
           std::string(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})"),
           std::string(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0]}})"),
           std::string(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})"),
           std::string(R"({"x":7})"),
       }) {
    auto store = TensorStore::OpenFile(WriteWithHeader(header, 4));
    ASSERT_FALSE(store.ok()) << header;
    EXPECT_THAT(store.status().message(), HasSubstr("'x'")) << header;
  }
}

TEST_F(SafetensorsTest, WrongShapeAndDtypeAgainstConfig) {
  const std::string path = (dir_ / "model.safetensors").string();
  TensorToWrite ints{"ids", DType::kI32, {2}, std::vector<uint8_t>(8)};
  ASSERT_TRUE(WriteSafetensors(path, {Bf16Tensor("w", {2, 3}), ints}).ok());
  auto store = TensorStore::OpenFile(path);
  ASSERT_TRUE(store.ok());
  auto shape = store->GetWeight("w", {3, 2});
  ASSERT_FALSE(shape.ok());
  EXPECT_THAT(shape.status().message(), HasSubstr("shape [2, 3] does not match the config's [3, 2]"));
  auto dtype = store->GetWeight("ids", {2});
  ASSERT_FALSE(dtype.ok());
  EXPECT_THAT(dtype.status().message(), HasSubstr("not a weight type"));
  auto missing = store->GetWeight("absent", {1});
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("'absent' is missing"));
}

TEST_F(SafetensorsTest, ShardedIndexErrors) {
  ASSERT_TRUE(WriteSafetensors((dir_ / "shard-1.safetensors").string(), {Bf16Tensor("a", {2})}).ok());
  WriteRaw("model.safetensors.index.json",
           R"({"weight_map":{"a":"shard-1.safetensors","b":"shard-1.safetensors"}})");
  auto store = TensorStore::OpenDirectory(dir_.string());
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("'b'"));
  EXPECT_THAT(store.status().message(), HasSubstr("shard-1.safetensors"));

  WriteRaw("model.safetensors.index.json", R"({"weight_map":{"a":"../escape.safetensors"}})");
  EXPECT_FALSE(TensorStore::OpenDirectory(dir_.string()).ok());
  WriteRaw("model.safetensors.index.json", R"({"weight_map":{"a":"absent.safetensors"}})");
  store = TensorStore::OpenDirectory(dir_.string());
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("absent.safetensors"));
}

TEST_F(SafetensorsTest, EmptyDirectory) {
  auto store = TensorStore::OpenDirectory(dir_.string());
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("no model.safetensors"));
}

// Copies a fixture checkpoint and rewrites its weights with one change.
class DamagedCheckpointTest : public SafetensorsTest {
 protected:
  // Returns the error of loading mixtral with `edit` applied to its tensors.
  absl::Status LoadEdited(const std::function<void(std::vector<TensorToWrite>&)>& edit) {
    const fs::path source = fs::path(MOE_SOURCE_DIR) / "tests/fixtures/models/mixtral";
    fs::copy_file(source / "config.json", dir_ / "config.json");
    auto store = TensorStore::OpenFile((source / "model.safetensors").string());
    EXPECT_TRUE(store.ok());
    std::vector<TensorToWrite> tensors;
    for (const auto& [name, view] : store->tensors()) {
      const auto* bytes = reinterpret_cast<const uint8_t*>(view->data);
      tensors.push_back({name, view->dtype, view->shape, {bytes, bytes + view->num_bytes}});
    }
    edit(tensors);
    EXPECT_TRUE(WriteSafetensors((dir_ / "model.safetensors").string(), tensors).ok());
    return LoadModel(dir_.string()).status();
  }
};

TEST_F(DamagedCheckpointTest, UnchangedCopyLoads) {
  EXPECT_TRUE(LoadEdited([](auto&) {}).ok());
}

TEST_F(DamagedCheckpointTest, MissingTensor) {
  const absl::Status status = LoadEdited([](std::vector<TensorToWrite>& tensors) {
    std::erase_if(tensors, [](const TensorToWrite& t) {
      return t.name == "model.layers.1.block_sparse_moe.experts.3.w2.weight";
    });
  });
  EXPECT_THAT(status.message(), HasSubstr("'model.layers.1.block_sparse_moe.experts.3.w2.weight' is missing"));
}

TEST_F(DamagedCheckpointTest, WrongShape) {
  const absl::Status status = LoadEdited([](std::vector<TensorToWrite>& tensors) {
    for (TensorToWrite& t : tensors) {
      if (t.name == "model.layers.0.self_attn.k_proj.weight") std::swap(t.shape[0], t.shape[1]);
    }
  });
  EXPECT_THAT(status.message(), HasSubstr("model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight': shape [64, 32]"));
}

TEST_F(DamagedCheckpointTest, WrongDtype) {
  const absl::Status status = LoadEdited([](std::vector<TensorToWrite>& tensors) {
    for (TensorToWrite& t : tensors) {
      if (t.name == "model.norm.weight") t.dtype = DType::kI32, t.shape = {t.shape[0] / 2};
    }
  });
  EXPECT_THAT(status.message(), HasSubstr("'model.norm.weight': dtype I32"));
}

}  // namespace
}  // namespace moe
