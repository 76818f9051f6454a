#include "launcher/step_log_merge.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

namespace fs = std::filesystem;

class StepLogMergeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::string(std::getenv("TEST_TMPDIR")) + "/" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_ + "/steps");
    out_ = dir_ + "/steps.jsonl";
  }

  void Append(const std::string& node, const std::string& text) {
    std::ofstream(dir_ + "/steps/" + node + ".jsonl", std::ios::app) << text;
  }

  static std::string Line(int step, const std::string& node, double loss,
                          const std::string& extra = "") {
    return "{\"step\":" + std::to_string(step) + ",\"time\":" +
           std::to_string(100 + step) + ",\"node\":\"" + node +
           "\",\"loss\":" + std::to_string(loss) +
           ",\"tokens_per_second\":1000,\"compute_s\":0.5,\"pull_s\":0.1,"
           "\"push_s\":0.2,\"wait_s\":0.05,\"bytes_pulled\":10,"
           "\"bytes_pushed\":20,\"lr\":0.001" +
           extra + "}\n";
  }

  std::vector<nlohmann::json> Out() {
    std::ifstream f(out_);
    std::vector<nlohmann::json> lines;
    for (std::string line; std::getline(f, line);) {
      lines.push_back(nlohmann::json::parse(line));
    }
    return lines;
  }

  std::unique_ptr<StepLogMerger> Merger() {
    auto m = StepLogMerger::Create(
        dir_ + "/steps", out_,
        [this](const std::string& w) { warnings_.push_back(w); });
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? *std::move(m) : nullptr;
  }

  std::string dir_, out_;
  std::vector<std::string> warnings_;
};

TEST_F(StepLogMergeTest, MergesWorkersStepByStepOnceComplete) {
  auto m = Merger();
  ASSERT_NE(m, nullptr);
  Append("worker-0", Line(0, "worker-0", 3.0) + Line(1, "worker-0", 2.0));
  Append("worker-1", Line(0, "worker-1", 1.0) + Line(1, "worker-1", 1.0));
  ASSERT_TRUE(m->Poll(/*complete_before=*/1).ok());
  std::vector<nlohmann::json> out = Out();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0]["step"], 0);
  EXPECT_DOUBLE_EQ(out[0]["loss"].get<double>(), 2.0);  // the mean
  EXPECT_DOUBLE_EQ(out[0]["tokens_per_second"].get<double>(), 2000);
  EXPECT_DOUBLE_EQ(out[0]["bytes_pushed"].get<double>(), 40);
  EXPECT_DOUBLE_EQ(out[0]["lr"].get<double>(), 0.001);
  EXPECT_DOUBLE_EQ(out[0]["time"].get<double>(), 100);
  EXPECT_DOUBLE_EQ(out[0]["workers"]["worker-1"]["compute_s"].get<double>(),
                   0.5);
  EXPECT_FALSE(out[0].contains("eval_loss"));

  // A late line of a step already written changes nothing.
  Append("worker-2", Line(0, "worker-2", 1.0));
  ASSERT_TRUE(m->Poll(/*complete_before=*/1).ok());
  EXPECT_EQ(Out().size(), 1u);

  // The final evaluation's line for step 1 merges into it; Flush writes it.
  Append("worker-0", Line(1, "worker-0", 2.0, ",\"eval_loss\":2.5"));
  ASSERT_TRUE(m->Flush().ok());
  out = Out();
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[1]["step"], 1);
  EXPECT_DOUBLE_EQ(out[1]["eval_loss"].get<double>(), 2.5);
  EXPECT_DOUBLE_EQ(out[1]["loss"].get<double>(), 1.5);
  EXPECT_DOUBLE_EQ(out[1]["tokens_per_second"].get<double>(), 2000);
  EXPECT_EQ(m->last_written(), 1);
  EXPECT_TRUE(warnings_.empty());
}

// Tensor-parallel ranks of one replica report the same loss and tokens:
// tokens/s counts the replica once.
TEST_F(StepLogMergeTest, TensorParallelRanksCountTheirTokensOnce) {
  auto m = Merger();
  ASSERT_NE(m, nullptr);
  Append("worker-0", Line(0, "worker-0", 2.0, ",\"tp\":0"));
  Append("worker-1", Line(0, "worker-1", 2.0, ",\"tp\":1"));
  ASSERT_TRUE(m->Flush().ok());
  const std::vector<nlohmann::json> out = Out();
  ASSERT_EQ(out.size(), 1u);
  EXPECT_DOUBLE_EQ(out[0]["tokens_per_second"].get<double>(), 1000);
  EXPECT_EQ(out[0]["workers"].size(), 2u);
}

TEST_F(StepLogMergeTest, LineWithoutItsNewlineWaits) {
  auto m = Merger();
  ASSERT_NE(m, nullptr);
  std::string line = Line(0, "worker-0", 2.0);
  Append("worker-0", line.substr(0, 20));
  ASSERT_TRUE(m->Flush().ok());
  EXPECT_TRUE(Out().empty());
  EXPECT_TRUE(warnings_.empty());
  Append("worker-0", line.substr(20));
  ASSERT_TRUE(m->Flush().ok());
  ASSERT_EQ(Out().size(), 1u);
}

TEST_F(StepLogMergeTest, CorruptLinesAreReportedWithTheirNumberAndSkipped) {
  auto m = Merger();
  ASSERT_NE(m, nullptr);
  Append("worker-0", Line(0, "worker-0", 2.0) + "{\"step\": 1, \"no\n" +
                         "[1, 2]\n" + Line(1, "worker-0", 1.0));
  ASSERT_TRUE(m->Flush().ok());
  EXPECT_EQ(Out().size(), 2u);
  ASSERT_EQ(warnings_.size(), 2u);
  EXPECT_NE(warnings_[0].find("worker-0.jsonl:2: not a step record"),
            std::string::npos)
      << warnings_[0];
  EXPECT_NE(warnings_[1].find("worker-0.jsonl:3:"), std::string::npos)
      << warnings_[1];
}

TEST_F(StepLogMergeTest, ResumedRunContinuesWithoutRewritingPastSteps) {
  {
    auto m = Merger();
    ASSERT_NE(m, nullptr);
    Append("worker-0", Line(0, "worker-0", 3.0) + Line(1, "worker-0", 2.0) +
                           Line(2, "worker-0", 1.0));
    ASSERT_TRUE(m->Flush().ok());
  }
  // The resumed job redoes step 2 from its checkpoint and goes on.
  Append("worker-0", Line(2, "worker-0", 0.9) + Line(3, "worker-0", 0.8));
  auto m = Merger();
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->last_written(), 2);
  ASSERT_TRUE(m->Flush().ok());
  const std::vector<nlohmann::json> out = Out();
  ASSERT_EQ(out.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i]["step"], i);
  EXPECT_DOUBLE_EQ(out[2]["loss"].get<double>(), 1.0);  // not rewritten
}

TEST_F(StepLogMergeTest, UnwritableOutputIsAnError) {
  auto m = StepLogMerger::Create(dir_ + "/steps", "/nonexistent/steps.jsonl",
                                 nullptr);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kFailedPrecondition);
  auto full = StepLogMerger::Create(dir_ + "/steps", "/dev/full", nullptr);
  ASSERT_TRUE(full.ok()) << full.status();
  Append("worker-0", Line(0, "worker-0", 1.0));
  EXPECT_EQ((*full)->Flush().code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace lmps
