// Test helpers for the transformers reference fixtures (tests/fixtures/models/<name>/).
#pragma once

#include <cmath>
#include <cstdlib>
#include <span>
#include <string>
#include <vector>

#include "engine/model/safetensors.h"
#include "gtest/gtest.h"

namespace moe::testing_util {

// The fixtures of the source tree: $MOE_SOURCE_DIR when set (binaries run from another
// checkout, e.g. on a lent GPU machine), else the tree the test was built from.
inline std::string SourceDir() {
  const char* root = std::getenv("MOE_SOURCE_DIR");
  return root != nullptr && *root != '\0' ? root : MOE_SOURCE_DIR;
}

inline std::string FixtureDir(const std::string& model) {
  return SourceDir() + "/tests/fixtures/models/" + model;
}

// ||actual - expected|| / ||expected||; infinite for a size mismatch or a non-finite value.
inline double RelativeError(std::span<const float> actual, std::span<const float> expected) {
  if (actual.size() != expected.size()) return INFINITY;
  double diff = 0, norm = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (!std::isfinite(actual[i])) return INFINITY;
    diff += (actual[i] - expected[i]) * double(actual[i] - expected[i]);
    norm += expected[i] * double(expected[i]);
  }
  return std::sqrt(diff / norm);
}

// The golden outputs of one fixture model (reference.safetensors).
class ReferenceData {
 public:
  explicit ReferenceData(const std::string& model) {
    auto store = TensorStore::OpenFile(FixtureDir(model) + "/reference.safetensors");
    EXPECT_TRUE(store.ok()) << store.status();
    if (store.ok()) store_ = std::move(store).value();
  }
  std::vector<int32_t> Ints(const std::string& name) const {
    auto view = store_.Get(name, DType::kI32);
    EXPECT_TRUE(view.ok()) << view.status();
    if (!view.ok()) return {};
    const auto* data = reinterpret_cast<const int32_t*>((*view)->data);
    return {data, data + (*view)->num_elements()};
  }
  std::vector<float> Floats(const std::string& name) const {
    auto view = store_.Get(name, DType::kF32);
    EXPECT_TRUE(view.ok()) << view.status();
    if (!view.ok()) return {};
    const auto* data = reinterpret_cast<const float*>((*view)->data);
    return {data, data + (*view)->num_elements()};
  }

 private:
  TensorStore store_;
};

}  // namespace moe::testing_util
