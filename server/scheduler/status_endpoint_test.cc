#include "server/scheduler/status_endpoint.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

JobStatus Job() {
  JobStatus s;
  s.set_state(RUNNING);
  NodeStatus* n = s.add_nodes();
  n->set_node_id("worker-0");
  n->set_role(WORKER);
  n->set_address("10.0.0.7:7001");
  n->set_alive(true);
  return s;
}

StatusEndpoint Endpoint(const std::string& token, const StatusHistory* h) {
  return StatusEndpoint({.token = token,
                         .job_status = [] { return Job(); },
                         .history = h,
                         .refresh_seconds = 3});
}

TEST(StatusEndpointTest, OpenWithoutAToken) {
  StatusHistory history;
  const HttpResponse r = Endpoint("", &history).Serve(HttpRequest{});
  EXPECT_EQ(r.status, 200);
  EXPECT_THAT(r.body, HasSubstr("data-node=\"worker-0\""));
  EXPECT_THAT(r.body, HasSubstr("content=\"3\""));
}

TEST(StatusEndpointTest, TheTokenIsNeededWhenConfigured) {
  StatusHistory history;
  const StatusEndpoint endpoint = Endpoint("s3cret-token-abcdef", &history);

  const HttpResponse none = endpoint.Serve(HttpRequest{});
  EXPECT_EQ(none.status, 401);
  EXPECT_THAT(none.body, HasSubstr("/status?token=TOKEN"));
  EXPECT_THAT(none.body, Not(HasSubstr("worker-0")));
  EXPECT_THAT(none.body, Not(HasSubstr("10.0.0.7")));
  ASSERT_EQ(none.headers.size(), 1u);
  EXPECT_EQ(none.headers[0].first, "WWW-Authenticate");

  HttpRequest wrong;
  wrong.params["token"] = "s3cret-token-abcdeX";
  EXPECT_EQ(endpoint.Serve(wrong).status, 401);
  HttpRequest prefix;
  prefix.params["token"] = "s3cret";
  EXPECT_EQ(endpoint.Serve(prefix).status, 401);

  HttpRequest query;
  query.params["token"] = "s3cret-token-abcdef";
  EXPECT_EQ(endpoint.Serve(query).status, 200);
  HttpRequest header;
  header.headers["authorization"] = "Bearer s3cret-token-abcdef";
  const HttpResponse ok = endpoint.Serve(header);
  EXPECT_EQ(ok.status, 200);
  EXPECT_THAT(ok.body, HasSubstr("10.0.0.7:7001"));
}

}  // namespace
}  // namespace lmps
