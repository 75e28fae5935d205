// Rows of logits that probe an argmax implementation against ArgMax (engine/common/argmax.h):
// ties, NaNs (in column 0 and elsewhere), infinities, and random vocabulary-wide rows.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace moe::testing_util {

// [rows, cols] row-major; cols >= 16.
inline std::vector<float> ArgMaxTestRows(int64_t cols, int64_t& rows) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-20.0f, 20.0f);
  std::vector<std::vector<float>> all;
  auto random_row = [&] {
    std::vector<float> row(cols);
    for (float& v : row) v = dist(rng);
    return row;
  };
  all.push_back(random_row());
  std::vector<float> tie = random_row();  // the maximum twice: the lower index wins
  tie[cols - 3] = tie[7] = 100.0f;
  all.push_back(tie);
  std::vector<float> nan_first = random_row();  // NaN in column 0: nothing beats it
  nan_first[0] = kNaN;
  all.push_back(nan_first);
  std::vector<float> nans = random_row();  // NaNs elsewhere never win
  for (int64_t c = 1; c < cols; c += 7) nans[c] = kNaN;
  nans[cols / 2 + 1] = 50.0f;
  all.push_back(nans);
  all.push_back(std::vector<float>(cols, -kInf));  // all equal: column 0
  std::vector<float> lone(cols, kNaN);             // a single number among NaNs, column 0 = -inf
  lone[0] = -kInf;
  lone[cols - 1] = 1.0f;
  all.push_back(lone);
  std::vector<float> infinite = random_row();  // two +inf: the lower index
  infinite[cols - 1] = infinite[cols / 3] = kInf;
  all.push_back(infinite);
  std::vector<float> zeros(cols, 0.0f);  // -0 and +0 are equal: column 0
  zeros[0] = -0.0f;
  all.push_back(zeros);
  for (int i = 0; i < 4; ++i) all.push_back(random_row());

  rows = static_cast<int64_t>(all.size());
  std::vector<float> flat;
  for (const auto& row : all) flat.insert(flat.end(), row.begin(), row.end());
  return flat;
}

}  // namespace moe::testing_util
