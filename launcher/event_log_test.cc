#include "launcher/event_log.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace lmps {
namespace {

std::vector<nlohmann::json> Lines(const std::string& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) {
    out.push_back(nlohmann::json::parse(line));
  }
  return out;
}

JobStatus WithEvents(int n) {
  JobStatus s;
  for (int i = 0; i < n; ++i) {
    NodeEvent* e = s.add_events();
    e->set_unix_ms(1000 + i);
    e->set_node_id(i == 0 ? "" : "worker-1");
    e->set_event(i == 0 ? "job state ASSEMBLING -> RUNNING" : "missed its lease");
    e->set_action("slot open for a replacement");
  }
  return s;
}

TEST(EventLogTest, EachEventOnceAcrossPollsAndResumes) {
  const std::string path =
      std::string(std::getenv("TEST_TMPDIR")) + "/events.jsonl";
  std::filesystem::remove(path);
  {
    auto log = EventLog::Create(path);
    ASSERT_TRUE(log.ok()) << log.status();
    ASSERT_TRUE((*log)->AddFrom(WithEvents(2)).ok());
    ASSERT_TRUE((*log)->AddFrom(WithEvents(3)).ok());  // sees two again
    ASSERT_TRUE((*log)->Add("", "restarting the job", "from step 20").ok());
  }
  std::vector<nlohmann::json> lines = Lines(path);
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_DOUBLE_EQ(lines[0]["time"].get<double>(), 1.0);
  EXPECT_EQ(lines[0]["node"], "");
  EXPECT_EQ(lines[1]["node"], "worker-1");
  EXPECT_EQ(lines[2]["action"], "slot open for a replacement");
  EXPECT_EQ(lines[3]["event"], "restarting the job");
  // A resumed run continues the file without repeating what it holds.
  auto log = EventLog::Create(path);
  ASSERT_TRUE(log.ok()) << log.status();
  ASSERT_TRUE((*log)->AddFrom(WithEvents(4)).ok());
  lines = Lines(path);
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_DOUBLE_EQ(lines[4]["time"].get<double>(), 1.003);
}

TEST(EventLogTest, WriteErrors) {
  EXPECT_EQ(EventLog::Create("/nonexistent/events.jsonl").status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto full = EventLog::Create("/dev/full");
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ((*full)->AddFrom(WithEvents(1)).code(),
            absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace lmps
