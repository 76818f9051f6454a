// A small HTTP server for a daemon's metrics port: civetweb (Debian's
// libcivetweb, the server prometheus-cpp's exposer is built on) serving GET
// handlers registered by path. Metrics (metrics.h) serves /metrics with it,
// and the scheduler its live /status page.
//
//   auto http = HttpServer::Create("127.0.0.1:0");
//   if (!http.ok()) return http.status();
//   (*http)->Handle("/hello", [](const HttpRequest& r) {
//     return HttpResponse{.body = "hello"};
//   });
//
// A handler gets the request's path, its decoded query parameters and its
// headers; what it returns is sent with Content-Length and
// `Cache-Control: no-store`. Requests for an unregistered path get 404,
// other methods than GET (and HEAD) 405. A handler that throws is answered
// with 500, never a crash. Handlers run on civetweb's threads (two by
// default), concurrently with each other and with Handle().
//
// Thread-safety: every method is thread-safe. The destructor stops serving
// and waits for handlers in progress: whatever they use must outlive the
// HttpServer (declare it after those objects).
#ifndef LMPS_COMMON_RPC_HTTP_SERVER_H_
#define LMPS_COMMON_RPC_HTTP_SERVER_H_

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

class CivetServer;

namespace lmps {

struct HttpRequest {
  std::string path;                           // e.g. "/status"
  std::map<std::string, std::string> params;  // decoded query parameters
  std::map<std::string, std::string> headers; // names in lower case

  // The query parameter or header, if present.
  std::optional<std::string> Param(const std::string& name) const;
  std::optional<std::string> Header(const std::string& lower_name) const;
  // The credential the request presents: `Authorization: Bearer <token>`
  // (scheme case-insensitive), else the query parameter `token` (what a
  // browser can carry through a self-refreshing page). Empty if neither.
  std::string BearerToken() const;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "text/html; charset=utf-8";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // extra ones
};

using HttpHandler = std::function<HttpResponse(const HttpRequest&)>;

class HttpServer {
 public:
  // Binds `listen_address` ("host:port", "[v6]:port", or "port" for every
  // interface; port 0 picks a free one) and
  // starts serving with `threads` worker threads. InvalidArgument for a
  // malformed address, Unavailable when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Create(
      const std::string& listen_address, int threads = 2);

  // Stops serving: in milliseconds for IPv4 listen addresses, up to
  // civetweb's 2 s poll quantum for others.
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Serves GET `path` (exactly that path) with `handler`, replacing an
  // earlier handler of the path. InvalidArgument unless path starts with '/'.
  absl::Status Handle(const std::string& path, HttpHandler handler);

  // The bound port (the actual one when asked for port 0).
  int port() const { return port_; }

 private:
  class Dispatcher;
  HttpServer(std::string listen_address);

  const std::string listen_address_;
  int port_ = 0;
  absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<const HttpHandler>>
      handlers_ ABSL_GUARDED_BY(mu_);
  // Declared after the handlers: stops serving before they go.
  std::unique_ptr<Dispatcher> dispatcher_;
  std::unique_ptr<CivetServer> civet_;
};

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_HTTP_SERVER_H_
