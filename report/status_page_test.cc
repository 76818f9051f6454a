#include "report/status_page.h"

#include <regex>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

NodeStatus* AddWorker(JobStatus* s, const std::string& id, int dp,
                      int64_t step, float loss, float eval = 0) {
  NodeStatus* n = s->add_nodes();
  n->set_node_id(id);
  n->set_role(WORKER);
  n->set_dp_rank(dp);
  n->set_address("127.0.0.1:500" + std::to_string(dp));
  n->set_step(step);
  n->set_loss(loss);
  n->set_eval_loss(eval);
  n->set_tokens_per_second(1000);
  n->set_lr(0.001f);
  n->set_pull_wire_bytes(300 + dp);
  n->set_push_wire_bytes(100 + dp);
  n->set_alive(true);
  n->set_heartbeat_age_ms(250);
  return n;
}

JobStatus TwoWorkers(int64_t step0, int64_t step1, float eval = 0) {
  JobStatus s;
  s.set_state(RUNNING);
  s.mutable_spec()->set_name("demo");
  AddWorker(&s, "worker-0", 0, step0, 3.0f, eval);
  AddWorker(&s, "worker-1", 1, step1, 5.0f);
  NodeStatus* server = s.add_nodes();
  server->set_node_id("server-0");
  server->set_role(SERVER);
  server->set_shard(0);
  server->set_address("127.0.0.1:6000");
  server->set_alive(true);
  return s;
}

TEST(StatusHistoryTest, OneRowPerStepOfTheSlowestWorker) {
  StatusHistory history;
  history.Observe(TwoWorkers(0, 0), 100);  // nothing finished yet
  EXPECT_TRUE(history.Rows().empty());
  history.Observe(TwoWorkers(2, 1), 101);
  history.Observe(TwoWorkers(3, 1), 102);  // the slowest is still at 1
  history.Observe(TwoWorkers(3, 3, /*eval=*/2.5f), 103);
  history.Observe(TwoWorkers(4, 4, /*eval=*/2.5f), 104);  // same eval
  const std::vector<StepRow> rows = history.Rows();
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].step, 1);
  EXPECT_EQ(rows[0].time, 101);
  EXPECT_DOUBLE_EQ(*rows[0].loss, 4.0);  // mean over the workers
  EXPECT_DOUBLE_EQ(*rows[0].tokens_per_second, 2000);  // sum
  EXPECT_DOUBLE_EQ(*rows[0].lr, 0.001f);
  EXPECT_DOUBLE_EQ(*rows[0].bytes_pulled, 601);  // sums
  EXPECT_DOUBLE_EQ(*rows[0].bytes_pushed, 201);
  EXPECT_FALSE(rows[0].eval_loss.has_value());
  EXPECT_EQ(rows[1].step, 3);
  EXPECT_DOUBLE_EQ(*rows[1].eval_loss, 2.5);
  EXPECT_FALSE(rows[2].eval_loss.has_value());  // unchanged: not repeated
}

TEST(StatusHistoryTest, KeepsTheLastRows) {
  StatusHistory history(/*max_rows=*/3);
  for (int step = 1; step <= 5; ++step) {
    history.Observe(TwoWorkers(step, step), step);
  }
  const std::vector<StepRow> rows = history.Rows();
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows.front().step, 3);
  EXPECT_EQ(rows.back().step, 5);
}

TEST(StatusPageTest, ShowsEveryNodeAndTheCharts) {
  JobStatus status = TwoWorkers(7, 6);
  NodeStatus* dead = AddWorker(&status, "worker-2", 2, 4, 6.0f);
  dead->set_alive(false);
  dead->set_heartbeat_age_ms(12500);
  dead->set_error("<lease> expired");
  NodeEvent* e = status.add_events();
  e->set_unix_ms(101500);
  e->set_node_id("worker-2");
  e->set_event("missed its heartbeat lease");
  e->set_action("slot open");
  StatusHistory history;
  for (int step = 1; step <= 4; ++step) {
    history.Observe(TwoWorkers(step, step), 100 + step);
  }
  const std::string html =
      RenderStatusPage(status, history.Rows(), /*refresh_seconds=*/2);
  EXPECT_THAT(html, HasSubstr("<meta http-equiv=\"refresh\" content=\"2\">"));
  EXPECT_THAT(html, HasSubstr("<title>lmps job demo: live status</title>"));
  EXPECT_THAT(html, HasSubstr("Job <b>RUNNING</b>"));
  for (const char* id : {"worker-0", "worker-1", "worker-2", "server-0"}) {
    EXPECT_THAT(html, HasSubstr(std::string("data-node=\"") + id + "\""));
  }
  EXPECT_THAT(html, HasSubstr("<tr class=\"node dead\" data-node=\"worker-2\">"));
  EXPECT_THAT(html, HasSubstr("12.5 s"));
  EXPECT_THAT(html, HasSubstr("&lt;lease&gt; expired"));  // escaped
  EXPECT_THAT(html, Not(HasSubstr("<lease>")));
  EXPECT_THAT(html, HasSubstr("127.0.0.1:6000"));
  EXPECT_THAT(html, HasSubstr("missed its heartbeat lease"));
  // The loss chart has the history's four steps and the event's marker.
  std::smatch m;
  const std::regex points("data-name=\"train\" data-points=\"([0-9]+)\"");
  ASSERT_TRUE(std::regex_search(html, m, points));
  EXPECT_EQ(m[1], "4");
  EXPECT_THAT(html, HasSubstr("class=\"event\""));
}

TEST(StatusPageTest, NoWorkersYet) {
  JobStatus status;
  status.set_state(ASSEMBLING);
  const std::string html = RenderStatusPage(status, {}, 0);
  EXPECT_THAT(html, HasSubstr("Job <b>ASSEMBLING</b>"));
  EXPECT_THAT(html, Not(HasSubstr("http-equiv=\"refresh\"")));
  EXPECT_THAT(html, HasSubstr("No steps logged"));
}

}  // namespace
}  // namespace lmps
