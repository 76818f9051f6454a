#include "worker/step_log.h"

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lmps {
namespace {

std::vector<nlohmann::json> ReadLines(const std::string& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) {
    out.push_back(nlohmann::json::parse(line));
  }
  return out;
}

TrainerProgress Progress(int64_t step) {
  TrainerProgress p;
  p.step = step;
  p.loss = 2.5f;
  p.learning_rate = 6e-4;
  p.grad_norm = 0.75;
  p.tokens_per_second = 1000;
  p.compute_seconds = 0.2;
  p.pull_seconds = 0.01;
  p.push_seconds = 0.02;
  p.sync_seconds = 0.003;
  p.pull_bytes = 400;
  p.push_bytes = 300;
  p.comm_seconds = 0.04;
  p.comm_hidden_seconds = 0.01;
  p.bubble_fraction = 0.25;
  return p;
}

TEST(StepLogTest, LineHasEveryFieldAndOmitsUnknownValues) {
  StepLogIdentity who{"worker-3", 1, 0, 1, /*pipeline=*/true};
  TrainerProgress p = Progress(42);
  const nlohmann::json j =
      nlohmann::json::parse(StepLogLine(who, p, /*evaluated=*/false, 100.5));
  EXPECT_EQ(j["step"], 41);
  EXPECT_EQ(j["time"], 100.5);
  EXPECT_EQ(j["node"], "worker-3");
  EXPECT_EQ(j["dp"], 1);
  EXPECT_EQ(j["tp"], 1);
  EXPECT_FLOAT_EQ(j["loss"].get<double>(), 2.5);
  EXPECT_DOUBLE_EQ(j["lr"].get<double>(), 6e-4);
  // A float's rate is written to float precision.
  p.learning_rate = static_cast<float>(6e-4);
  EXPECT_NE(StepLogLine(who, p, false, 1).find("\"lr\":0.0006,"),
            std::string::npos)
      << StepLogLine(who, p, false, 1);
  EXPECT_DOUBLE_EQ(j["grad_norm"].get<double>(), 0.75);
  EXPECT_DOUBLE_EQ(j["compute_s"].get<double>(), 0.2);
  EXPECT_DOUBLE_EQ(j["wait_s"].get<double>(), 0.003);
  EXPECT_DOUBLE_EQ(j["comm_hidden"].get<double>(), 0.25);
  EXPECT_EQ(j["bytes_pulled"], 400);
  EXPECT_EQ(j["bytes_pushed"], 300);
  EXPECT_DOUBLE_EQ(j["bubble"].get<double>(), 0.25);
  EXPECT_FALSE(j.contains("eval_loss"));

  // NaN is not JSON: an unknown value is left out.
  p.loss = NAN;
  p.grad_norm = NAN;
  p.eval_loss = 3;
  who.pipeline = false;
  const nlohmann::json k =
      nlohmann::json::parse(StepLogLine(who, p, /*evaluated=*/true, 1));
  EXPECT_FALSE(k.contains("loss"));
  EXPECT_FALSE(k.contains("grad_norm"));
  EXPECT_FALSE(k.contains("bubble"));
  EXPECT_EQ(k["eval_loss"], 3.0);
}

TEST(StepLogTest, AppendsOneLinePerStepAndEachEvaluationOnce) {
  const std::string path =
      std::string(std::getenv("TEST_TMPDIR")) + "/steps.jsonl";
  {
    std::ofstream earlier(path);  // a resumed run continues the file
    earlier << "{\"step\": 0}\n";
  }
  auto log = StepLog::Open(path, {"worker-0", 0, 0, 0, false});
  ASSERT_TRUE(log.ok()) << log.status();
  TrainerProgress p = Progress(0);
  ASSERT_TRUE((*log)->Append(p).ok());  // nothing computed yet: no line
  p = Progress(1);
  ASSERT_TRUE((*log)->Append(p).ok());
  p = Progress(2);
  p.eval_loss = 2.75f;  // evaluated at step 1
  ASSERT_TRUE((*log)->Append(p).ok());
  p = Progress(3);
  p.eval_loss = 2.75f;  // the same evaluation: not repeated
  ASSERT_TRUE((*log)->Append(p).ok());
  p.eval_loss = 2.5f;  // the final evaluation, after the last step
  ASSERT_TRUE((*log)->Append(p).ok());

  const std::vector<nlohmann::json> lines = ReadLines(path);
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_EQ(lines[0]["step"], 0);  // the earlier run's line stays
  EXPECT_EQ(lines[1]["step"], 0);
  EXPECT_EQ(lines[2]["step"], 1);
  EXPECT_EQ(lines[3]["step"], 2);
  EXPECT_EQ(lines[4]["step"], 2);
  EXPECT_FALSE(lines[1].contains("eval_loss"));
  EXPECT_EQ(lines[2]["eval_loss"], 2.75);
  EXPECT_FALSE(lines[3].contains("eval_loss"));
  EXPECT_EQ(lines[4]["eval_loss"], 2.5);
}

TEST(StepLogTest, FullDiskIsAnError) {
  auto log = StepLog::Open("/dev/full", {"worker-0", 0, 0, 0, false});
  ASSERT_TRUE(log.ok()) << log.status();
  const absl::Status s = (*log)->Append(Progress(1));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("/dev/full"), std::string::npos) << s;
}

TEST(StepLogTest, UnopenablePathIsAnError) {
  auto log = StepLog::Open("/nonexistent/dir/steps.jsonl", {"w", 0, 0, 0, false});
  EXPECT_EQ(log.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(log.status().message().find("/nonexistent/dir/steps.jsonl"),
            std::string::npos);
}

}  // namespace
}  // namespace lmps
