// The host-side bookkeeping of the CUDA backend's graph replay (engine/backend/cuda/
// step_graphs.h), on any machine: which steps run eagerly, are captured or replayed, and that a
// replay does exactly what the eager launches did. A fake "graph" records what the launches
// would have done during a capture and does it again on replay.
#include "engine/backend/cuda/step_graphs.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::cuda {
namespace {

using testing::ElementsAre;
using testing::IsEmpty;

// A fake device: launches append to `executed`, or to `recording` while a capture runs.
struct FakeDevice {
  std::vector<std::string> executed;
  std::vector<std::string>* recording = nullptr;
  int captures = 0;
  bool fail_capture = false;

  void Enqueue(const std::string& work) {
    (recording != nullptr ? *recording : executed).push_back(work);
  }
};

// A move-only graph: the work recorded during its capture.
struct FakeGraph {
  FakeGraph() = default;
  FakeGraph(FakeGraph&&) = default;
  FakeGraph& operator=(FakeGraph&&) = default;
  FakeGraph(const FakeGraph&) = delete;
  FakeGraph& operator=(const FakeGraph&) = delete;
  std::vector<std::string> work;
};

class StepGraphsTest : public testing::Test {
 protected:
  StepGraphsTest()
      : cache_(
            /*capacity=*/2,
            [this](const std::function<absl::Status()>& launches) -> absl::StatusOr<FakeGraph> {
              ++device_.captures;
              FakeGraph graph;
              device_.recording = &graph.work;
              const absl::Status status = launches();
              device_.recording = nullptr;
              if (device_.fail_capture) return absl::InternalError("capture not supported");
              if (!status.ok()) return status;
              return graph;
            },
            [this](const FakeGraph& graph) {
              for (const std::string& work : graph.work) device_.executed.push_back(work);
              return absl::OkStatus();
            }) {}

  // One step of `n` launches named "a0".."a<n-1>" whose key words are `base` + index.
  absl::Status Step(int n, uint64_t base) {
    launches_.Begin(true);
    for (int i = 0; i < n; ++i) {
      const std::string work = absl::StrCat("a", i);
      absl::Status status = launches_.Add("op", {base + i, 1.5f}, [this, work] {
        device_.Enqueue(work);
        return absl::OkStatus();
      });
      if (!status.ok()) return status;
    }
    launches_.AppendKey({static_cast<const void*>(&device_)});
    absl::Status status = cache_.Run(launches_);
    launches_.End();
    return status;
  }

  // Adds a launch that enqueues `work`, with one key word.
  absl::Status Push(const std::string& work) {
    return launches_.Add("op", {1}, [this, work] {
      device_.Enqueue(work);
      return absl::OkStatus();
    });
  }

  FakeDevice device_;
  StepLaunches launches_;
  StepGraphCache<FakeGraph> cache_;
};

TEST_F(StepGraphsTest, LaunchesRunAtOnceUnlessTheStepDefers) {
  launches_.Begin(false);
  ASSERT_TRUE(Push("now").ok());
  EXPECT_THAT(device_.executed, ElementsAre("now"));
  EXPECT_THAT(launches_.key(), IsEmpty());

  launches_.Begin(true);
  ASSERT_TRUE(Push("later").ok());
  EXPECT_THAT(device_.executed, ElementsAre("now"));
  EXPECT_EQ(launches_.size(), 1u);
}

TEST_F(StepGraphsTest, FirstSightRunsEagerlySecondCapturesThenReplays) {
  ASSERT_TRUE(Step(3, 10).ok());
  EXPECT_THAT(device_.executed, ElementsAre("a0", "a1", "a2"));
  EXPECT_EQ(device_.captures, 0);

  device_.executed.clear();
  ASSERT_TRUE(Step(3, 10).ok());
  // Captured (nothing ran during the capture), then replayed: the same work, in order.
  EXPECT_THAT(device_.executed, ElementsAre("a0", "a1", "a2"));
  EXPECT_EQ(device_.captures, 1);

  device_.executed.clear();
  ASSERT_TRUE(Step(3, 10).ok());
  EXPECT_THAT(device_.executed, ElementsAre("a0", "a1", "a2"));
  EXPECT_EQ(device_.captures, 1);
  EXPECT_EQ(cache_.counters().eager, 1);
  EXPECT_EQ(cache_.counters().captured, 1);
  EXPECT_EQ(cache_.counters().replayed, 2);
}

TEST_F(StepGraphsTest, ADifferentKeyNeverReplaysAnotherStepsGraph) {
  ASSERT_TRUE(Step(3, 10).ok());
  ASSERT_TRUE(Step(3, 10).ok());  // captured
  device_.executed.clear();
  ASSERT_TRUE(Step(3, 11).ok());  // one word differs
  ASSERT_TRUE(Step(2, 10).ok());  // a launch fewer
  EXPECT_THAT(device_.executed, ElementsAre("a0", "a1", "a2", "a0", "a1"));
  EXPECT_EQ(cache_.counters().eager, 3);
  EXPECT_EQ(cache_.counters().replayed, 1);
}

TEST_F(StepGraphsTest, RunQueuedNowRunsInOrderAndTheRestOfTheStepEagerly) {
  launches_.Begin(true);
  for (const char* work : {"x", "y"}) {
    ASSERT_TRUE(Push(work).ok());
  }
  EXPECT_THAT(device_.executed, IsEmpty());
  ASSERT_TRUE(launches_.RunQueuedNow().ok());
  EXPECT_THAT(device_.executed, ElementsAre("x", "y"));
  EXPECT_FALSE(launches_.deferring());
  EXPECT_THAT(launches_.key(), IsEmpty());
  ASSERT_TRUE(Push("z").ok());
  EXPECT_THAT(device_.executed, ElementsAre("x", "y", "z"));
}

TEST_F(StepGraphsTest, AFailedCaptureRunsEagerlyAndIsNotRetried) {
  device_.fail_capture = true;
  for (int step = 0; step < 3; ++step) {
    device_.executed.clear();
    ASSERT_TRUE(Step(2, 7).ok());
    EXPECT_THAT(device_.executed, ElementsAre("a0", "a1")) << "step " << step;
  }
  EXPECT_EQ(device_.captures, 1);
  EXPECT_EQ(cache_.counters().capture_failures, 1);
  EXPECT_EQ(cache_.counters().eager, 3);
  EXPECT_EQ(cache_.counters().replayed, 0);
}

TEST_F(StepGraphsTest, ALaunchErrorReachesTheCaller) {
  launches_.Begin(true);
  ASSERT_TRUE(launches_.Add("op", {1}, [] { return absl::InternalError("launch failed"); }).ok());
  EXPECT_EQ(cache_.Run(launches_).code(), absl::StatusCode::kInternal);
  // Seen once: the next sight captures, and the capture reports the same error: it runs
  // eagerly, which fails again.
  EXPECT_EQ(cache_.Run(launches_).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(cache_.counters().capture_failures, 1);
}

TEST_F(StepGraphsTest, TheLeastRecentlyUsedKeyIsDroppedBeyondCapacity) {
  ASSERT_TRUE(Step(1, 1).ok());
  ASSERT_TRUE(Step(1, 2).ok());
  ASSERT_TRUE(Step(1, 1).ok());  // 1 captured, now the most recent
  ASSERT_TRUE(Step(1, 3).ok());  // capacity 2: drops 2
  EXPECT_EQ(cache_.size(), 2u);
  ASSERT_TRUE(Step(1, 1).ok());  // still cached: replayed
  EXPECT_EQ(cache_.counters().replayed, 2);
  ASSERT_TRUE(Step(1, 2).ok());  // forgotten: a first sight again
  EXPECT_EQ(device_.captures, 1);
  EXPECT_EQ(cache_.counters().eager, 4);
}

TEST_F(StepGraphsTest, ClearForgetsEveryGraph) {
  ASSERT_TRUE(Step(2, 5).ok());
  ASSERT_TRUE(Step(2, 5).ok());
  cache_.Clear();
  EXPECT_EQ(cache_.size(), 0u);
  ASSERT_TRUE(Step(2, 5).ok());
  EXPECT_EQ(cache_.counters().eager, 2);
  EXPECT_EQ(cache_.counters().replayed, 1);
}

TEST(KeyWordTest, WordsOfEachKind) {
  int value = 0;
  EXPECT_EQ(KeyWord(int32_t{-1}).bits, ~uint64_t{0});
  EXPECT_EQ(KeyWord(1.0f).bits, 0x3f800000u);
  EXPECT_EQ(KeyWord(1.0).bits, 0x3ff0000000000000u);
  EXPECT_EQ(KeyWord(&value).bits, reinterpret_cast<uintptr_t>(&value));
  EXPECT_EQ(KeyWord(nullptr).bits, 0u);
  EXPECT_EQ(KeyWord(true).bits, 1u);
}

}  // namespace
}  // namespace moe::cuda
