#include "launcher/run_logs.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lmps {
namespace {

namespace fs = std::filesystem;

std::vector<nlohmann::json> Lines(const std::string& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) {
    out.push_back(nlohmann::json::parse(line));
  }
  return out;
}

class RunLogsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::string(std::getenv("TEST_TMPDIR")) + "/" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }

  // One line of worker `node`'s own step log.
  void WorkerStep(const std::string& node, int step) {
    std::ofstream(dir_ + "/steps/" + node + ".jsonl", std::ios::app)
        << "{\"step\":" << step << ",\"time\":" << 100 + step
        << ",\"node\":\"" << node << "\",\"loss\":2.5}\n";
  }

  static JobStatus WorkersAt(const std::vector<int>& steps) {
    JobStatus status;
    for (int step : steps) {
      NodeStatus* n = status.add_nodes();
      n->set_role(WORKER);
      n->set_step(step);
    }
    NodeStatus* shard = status.add_nodes();  // ignored
    shard->set_role(SERVER);
    shard->set_step(0);
    return status;
  }

  std::string dir_;
};

TEST_F(RunLogsTest, WritesStepsEveryWorkerIsPastThenTheRestAtTheEnd) {
  RunLogs logs;
  logs.Open(dir_, /*resume=*/false);
  ASSERT_TRUE(fs::is_directory(dir_ + "/steps"));
  for (int step = 0; step < 4; ++step) WorkerStep("worker-0", step);
  for (int step = 0; step < 2; ++step) WorkerStep("worker-1", step);

  logs.MergeSteps(JobStatus(), /*final=*/false);  // no worker: nothing
  EXPECT_TRUE(Lines(dir_ + "/steps.jsonl").empty());

  // worker-1 is at step 2: steps 0 and 1 are complete.
  logs.MergeSteps(WorkersAt({4, 2}), /*final=*/false);
  std::vector<nlohmann::json> steps = Lines(dir_ + "/steps.jsonl");
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[1]["step"], 1);

  logs.MergeSteps(JobStatus(), /*final=*/true);  // every step read
  steps = Lines(dir_ + "/steps.jsonl");
  ASSERT_EQ(steps.size(), 4u);
  EXPECT_EQ(steps[3]["step"], 3);
}

TEST_F(RunLogsTest, FreshRunStartsTheLogsAfreshAResumedOneContinues) {
  {
    RunLogs logs;
    logs.Open(dir_, /*resume=*/false);
    logs.LogEvent("worker-1", "was killed by signal 9",
                  "a replacement takes its slot");
    WorkerStep("worker-0", 0);
    logs.MergeSteps(JobStatus(), /*final=*/true);
  }
  ASSERT_EQ(Lines(dir_ + "/events.jsonl").size(), 1u);
  ASSERT_EQ(Lines(dir_ + "/steps.jsonl").size(), 1u);
  {
    RunLogs logs;
    logs.Open(dir_, /*resume=*/true);
    logs.LogEvent("", "elastic resize", "the job restarts at step 1 with dp 2");
    WorkerStep("worker-0", 1);
    logs.MergeSteps(JobStatus(), /*final=*/true);
  }
  std::vector<nlohmann::json> events = Lines(dir_ + "/events.jsonl");
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0]["node"], "worker-1");
  EXPECT_EQ(events[1]["event"], "elastic resize");
  EXPECT_EQ(Lines(dir_ + "/steps.jsonl").size(), 2u);
  {
    RunLogs logs;
    logs.Open(dir_, /*resume=*/false);
  }
  EXPECT_FALSE(fs::exists(dir_ + "/steps.jsonl") &&
               fs::file_size(dir_ + "/steps.jsonl") > 0);
  EXPECT_FALSE(fs::exists(dir_ + "/events.jsonl") &&
               fs::file_size(dir_ + "/events.jsonl") > 0);
  EXPECT_FALSE(fs::exists(dir_ + "/steps/worker-0.jsonl"));
}

TEST_F(RunLogsTest, SchedulerEventsAreAddedOnce) {
  RunLogs logs;
  logs.Open(dir_, /*resume=*/false);
  JobStatus status;
  NodeEvent* e = status.add_events();
  e->set_unix_ms(1000);
  e->set_node_id("worker-1");
  e->set_event("missed its lease");
  logs.LogEvents(status);
  logs.LogEvents(status);
  EXPECT_EQ(Lines(dir_ + "/events.jsonl").size(), 1u);
}

TEST_F(RunLogsTest, UnopenedOrUnwritableLogsAreNoOps) {
  RunLogs unopened;
  unopened.MergeSteps(WorkersAt({1}), /*final=*/true);
  unopened.LogEvent("", "event", "action");
  unopened.WriteReport();

  // RUN_DIR is a file: neither log can be opened; the job goes on.
  const std::string file = dir_ + "/not_a_dir";
  std::ofstream(file) << "x";
  RunLogs logs;
  logs.Open(file, /*resume=*/true);
  logs.MergeSteps(WorkersAt({1}), /*final=*/false);
  logs.LogEvents(JobStatus());
  logs.LogEvent("", "event", "action");
  EXPECT_TRUE(fs::is_regular_file(file));
}

}  // namespace
}  // namespace lmps
