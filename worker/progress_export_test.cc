#include "worker/progress_export.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/rpc/metrics.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

class ProgressExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::string(std::getenv("TEST_TMPDIR")) + "/" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    MetricsOptions options;
    options.daemon = "worker";
    options.node_id = "test";
    auto metrics = Metrics::Create(options);
    ASSERT_TRUE(metrics.ok()) << metrics.status();
    metrics_ = *std::move(metrics);
  }

  std::unique_ptr<ProgressExport> Export(const std::string& step_log,
                                         bool pipeline) {
    StepLogIdentity who;
    who.node = "worker-1";
    who.dp = 1;
    who.pipeline = pipeline;
    return std::make_unique<ProgressExport>(
        metrics_.get(), step_log, who,
        [this](const std::string& w) { warnings_.push_back(w); });
  }

  // The exposition's lines for metric `name` (its samples, not # lines).
  std::vector<std::string> Samples(const std::string& name) const {
    std::vector<std::string> out;
    std::istringstream text(metrics_->Serialize());
    for (std::string line; std::getline(text, line);) {
      if (line.rfind(name + "{", 0) == 0) out.push_back(line);
    }
    return out;
  }

  // The value of the one sample of `name` whose labels contain `label`.
  double Value(const std::string& name, const std::string& label = "") const {
    double value = NAN;
    int found = 0;
    for (const std::string& line : Samples(name)) {
      if (line.find(label) == std::string::npos) continue;
      value = std::stod(line.substr(line.rfind(' ') + 1));
      ++found;
    }
    EXPECT_EQ(found, 1) << name << " " << label << "\n"
                        << metrics_->Serialize();
    return value;
  }

  static TrainerProgress Progress(int64_t step) {
    TrainerProgress p;
    p.step = step;
    p.loss = 2.5f;
    p.tokens_per_second = 1000;
    p.staleness = 1;
    p.compute_seconds = 0.25;
    p.pull_seconds = 0.125;
    p.push_seconds = 0.0625;
    p.sync_seconds = 0.5;
    p.push_bytes = 4096;
    p.push_bytes_overlapped = 1024;
    p.pull_bytes = 2048;
    p.comm_seconds = 0.5;
    p.comm_hidden_seconds = 0.125;
    p.bubble_fraction = 0.3;
    p.ideal_bubble_fraction = 0.2;
    p.max_live_micro_batches = 2;
    p.peak_activation_bytes = 1 << 20;
    p.peak_layernorm_activation_bytes = 1 << 18;
    return p;
  }

  static std::vector<std::string> Lines(const std::string& path) {
    std::ifstream f(path);
    std::vector<std::string> out;
    for (std::string line; std::getline(f, line);) out.push_back(line);
    return out;
  }

  std::string dir_;
  std::unique_ptr<Metrics> metrics_;
  std::vector<std::string> warnings_;
};

TEST_F(ProgressExportTest, SetsTheGaugesOfEachStep) {
  auto exporter = Export("", /*pipeline=*/false);
  EXPECT_FALSE(exporter->logging_steps());
  exporter->Export(Progress(41));
  EXPECT_EQ(Value("lmps_step"), 41);
  EXPECT_EQ(Value("lmps_loss"), 2.5);
  EXPECT_EQ(Value("lmps_tokens_per_second"), 1000);
  EXPECT_EQ(Value("lmps_staleness_steps"), 1);
  EXPECT_EQ(Value("lmps_step_phase_seconds", "phase=\"compute\""), 0.25);
  EXPECT_EQ(Value("lmps_step_phase_seconds", "phase=\"pull\""), 0.125);
  EXPECT_EQ(Value("lmps_step_phase_seconds", "phase=\"push\""), 0.0625);
  EXPECT_EQ(Value("lmps_step_phase_seconds", "phase=\"wait\""), 0.5);
  EXPECT_EQ(Value("lmps_push_bytes", "kind=\"total\""), 4096);
  EXPECT_EQ(Value("lmps_push_bytes", "kind=\"overlapped\""), 1024);
  EXPECT_EQ(Value("lmps_push_wire_bytes_total"), 4096);
  EXPECT_EQ(Value("lmps_pull_bytes"), 2048);
  EXPECT_EQ(Value("lmps_pull_wire_bytes_total"), 2048);
  EXPECT_EQ(Value("lmps_comm_seconds", "kind=\"total\""), 0.5);
  EXPECT_EQ(Value("lmps_comm_seconds", "kind=\"hidden\""), 0.125);
  EXPECT_EQ(Value("lmps_comm_hidden_fraction"), 0.25);
  // No evaluation yet, and no pipeline.
  EXPECT_TRUE(Samples("lmps_eval_loss").empty());
  EXPECT_TRUE(Samples("lmps_pipeline_bubble_fraction").empty());
  EXPECT_TRUE(Samples("lmps_pipeline_live_micro_batches").empty());
  EXPECT_TRUE(Samples("lmps_peak_activation_bytes").empty());

  TrainerProgress next = Progress(42);
  next.eval_loss = 3.0f;
  exporter->Export(next);
  EXPECT_EQ(Value("lmps_step"), 42);
  EXPECT_EQ(Value("lmps_push_wire_bytes_total"), 2 * 4096);
  exporter->Export(next);  // the same step again (a final evaluation)
  EXPECT_EQ(Value("lmps_push_wire_bytes_total"), 2 * 4096);
  EXPECT_EQ(Value("lmps_pull_wire_bytes_total"), 2 * 2048);
  EXPECT_EQ(Value("lmps_eval_loss"), 3.0);
  EXPECT_TRUE(warnings_.empty());
}

TEST_F(ProgressExportTest, PipelineStageExportsItsBubble) {
  auto exporter = Export("", /*pipeline=*/true);
  exporter->Export(Progress(3));
  EXPECT_DOUBLE_EQ(
      Value("lmps_pipeline_bubble_fraction", "kind=\"measured\""), 0.3);
  EXPECT_DOUBLE_EQ(Value("lmps_pipeline_bubble_fraction", "kind=\"ideal\""),
                   0.2);
  EXPECT_EQ(Value("lmps_pipeline_live_micro_batches"), 2);
  EXPECT_EQ(Value("lmps_peak_activation_bytes", "region=\"all\""), 1 << 20);
  EXPECT_EQ(Value("lmps_peak_activation_bytes", "region=\"layernorm\""),
            1 << 18);
}

TEST_F(ProgressExportTest, AppendsOneStepLogLinePerStep) {
  const std::string path = dir_ + "/worker-1.jsonl";
  auto exporter = Export(path, /*pipeline=*/false);
  EXPECT_TRUE(exporter->logging_steps());
  exporter->Export(Progress(0));  // nothing computed yet: no line
  exporter->Export(Progress(1));  // the line of step 0
  exporter->Export(Progress(2));
  const std::vector<std::string> lines = Lines(path);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[1].rfind("{\"step\":1,", 0), 0u) << lines[1];
  EXPECT_NE(lines[1].find("\"node\":\"worker-1\""), std::string::npos)
      << lines[1];
  EXPECT_NE(lines[1].find("\"dp\":1"), std::string::npos) << lines[1];
  EXPECT_TRUE(warnings_.empty());
}

TEST_F(ProgressExportTest, UnopenableStepLogIsReportedAndGaugesGoOn) {
  auto exporter = Export(dir_ + "/no/such/dir/worker-1.jsonl", false);
  ASSERT_EQ(warnings_.size(), 1u);
  EXPECT_EQ(warnings_[0].rfind("warning: no step log: ", 0), 0u)
      << warnings_[0];
  EXPECT_FALSE(exporter->logging_steps());
  exporter->Export(Progress(7));
  EXPECT_EQ(Value("lmps_step"), 7);
  EXPECT_EQ(warnings_.size(), 1u);
}

TEST_F(ProgressExportTest, FullDiskStopsTheStepLogOnceAndGaugesGoOn) {
  auto exporter = Export("/dev/full", false);
  ASSERT_TRUE(warnings_.empty());
  exporter->Export(Progress(1));
  ASSERT_EQ(warnings_.size(), 1u);
  EXPECT_EQ(warnings_[0].rfind("warning: the step log stops: ", 0), 0u)
      << warnings_[0];
  EXPECT_FALSE(exporter->logging_steps());
  exporter->Export(Progress(2));
  EXPECT_EQ(warnings_.size(), 1u);  // reported once
  EXPECT_EQ(Value("lmps_step"), 2);
}

}  // namespace
}  // namespace lmps
