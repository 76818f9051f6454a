#include "common/rpc/http_server.h"

#include <stdexcept>
#include <string>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/rpc/http_test_util.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

std::unique_ptr<HttpServer> Serve() {
  auto server = HttpServer::Create("127.0.0.1:0");
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

TEST(HttpServerTest, ServesRegisteredPathsOnly) {
  auto server = Serve();
  ASSERT_NE(server, nullptr);
  ASSERT_TRUE(server->Handle("/hello", [](const HttpRequest& r) {
    return HttpResponse{.content_type = "text/plain",
                        .body = "hello " + r.Param("name").value_or("?")};
  }).ok());
  const std::string ok = HttpGet(server->port(), "/hello?name=a%20b&x");
  EXPECT_THAT(ok, StartsWith("HTTP/1.1 200 OK\r\n"));
  EXPECT_THAT(ok, HasSubstr("Content-Type: text/plain\r\n"));
  EXPECT_THAT(ok, HasSubstr("Content-Length: 9\r\n"));
  EXPECT_THAT(ok, HasSubstr("Cache-Control: no-store\r\n"));
  EXPECT_EQ(HttpBody(ok), "hello a b");

  EXPECT_THAT(HttpGet(server->port(), "/nothing"),
              StartsWith("HTTP/1.1 404 Not Found"));
  EXPECT_THAT(HttpGet(server->port(), "/hello/deeper"),
              StartsWith("HTTP/1.1 404 Not Found"));
  EXPECT_THAT(HttpRequestRaw(server->port(), "POST", "/hello"),
              StartsWith("HTTP/1.1 405 Method Not Allowed"));
  const std::string head = HttpRequestRaw(server->port(), "HEAD", "/hello");
  EXPECT_THAT(head, StartsWith("HTTP/1.1 200 OK"));
  EXPECT_EQ(HttpBody(head), "");

  // A later handler replaces the first.
  ASSERT_TRUE(server->Handle("/hello", [](const HttpRequest&) {
    return HttpResponse{.status = 503, .body = "later"};
  }).ok());
  const std::string later = HttpGet(server->port(), "/hello");
  EXPECT_THAT(later, StartsWith("HTTP/1.1 503 Service Unavailable"));
  EXPECT_EQ(HttpBody(later), "later");
}

TEST(HttpServerTest, AHandlerThatThrowsIsA500) {
  auto server = Serve();
  ASSERT_NE(server, nullptr);
  ASSERT_TRUE(server->Handle("/boom", [](const HttpRequest&) -> HttpResponse {
    throw std::runtime_error("kaput");
  }).ok());
  const std::string r = HttpGet(server->port(), "/boom");
  EXPECT_THAT(r, StartsWith("HTTP/1.1 500"));
  EXPECT_THAT(HttpBody(r), HasSubstr("kaput"));
  // And the server still serves.
  EXPECT_THAT(HttpGet(server->port(), "/boom"), StartsWith("HTTP/1.1 500"));
}

TEST(HttpServerTest, BearerTokenFromHeaderOrQuery) {
  auto server = Serve();
  ASSERT_NE(server, nullptr);
  ASSERT_TRUE(server->Handle("/who", [](const HttpRequest& r) {
    return HttpResponse{.body = "[" + r.BearerToken() + "]"};
  }).ok());
  const int port = server->port();
  EXPECT_EQ(HttpBody(HttpGet(port, "/who")), "[]");
  EXPECT_EQ(HttpBody(HttpGet(port, "/who?token=q%2By")), "[q+y]");
  EXPECT_EQ(HttpBody(HttpGet(port, "/who", "Authorization: bEaReR  h1\r\n")),
            "[h1]");
  // The header wins over the query; another scheme is no token.
  EXPECT_EQ(HttpBody(HttpGet(port, "/who?token=q",
                             "Authorization: Bearer h\r\n")),
            "[h]");
  EXPECT_EQ(HttpBody(HttpGet(port, "/who", "Authorization: Basic abc\r\n")),
            "[]");
}

TEST(HttpServerTest, BadAddressesAndPaths) {
  EXPECT_EQ(HttpServer::Create("127.0.0.1:99999").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpServer::Create(":80").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpServer::Create("127.0.0.1:0", 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto server = Serve();
  ASSERT_NE(server, nullptr);
  EXPECT_EQ(server->Handle("status", [](const HttpRequest&) {
    return HttpResponse{};
  }).code(), absl::StatusCode::kInvalidArgument);
  auto clash =
      HttpServer::Create("127.0.0.1:" + std::to_string(server->port()));
  EXPECT_EQ(clash.status().code(), absl::StatusCode::kUnavailable);
}

TEST(HttpServerTest, StopsPromptly) {
  auto server = Serve();
  ASSERT_NE(server, nullptr);
  const int port = server->port();
  const absl::Time start = absl::Now();
  server.reset();
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));  // not civetweb's 2 s
  EXPECT_EQ(HttpGet(port, "/"), "");
}

}  // namespace
}  // namespace lmps
