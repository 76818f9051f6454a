#include "common/rpc/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <exception>
#include <thread>
#include <utility>

#include "CivetServer.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "civetweb.h"

namespace lmps {
namespace {

// Splits "host:port", "[v6]:port" or "port" and checks the port; the host
// part is left to civetweb.
absl::Status CheckListenAddress(const std::string& address) {
  const size_t colon = address.rfind(':');
  const std::string port =
      colon == std::string::npos ? address : address.substr(colon + 1);
  int value = -1;
  if (port.empty() || !absl::SimpleAtoi(port, &value) || value < 0 ||
      value > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "listen address \"", address,
        "\" is not host:port with a port in 0..65535"));
  }
  if (colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "listen address \"", address,
        "\" has no host: use 0.0.0.0:PORT or 127.0.0.1:PORT"));
  }
  return absl::OkStatus();
}

// The IPv4 address to connect to for reaching a listener bound to `address`
// ("0.0.0.0:p" and "localhost:p" via loopback); nullopt for anything else.
std::optional<in_addr> WakeAddress(const std::string& address) {
  const size_t colon = address.rfind(':');
  std::string host =
      colon == std::string::npos ? "" : address.substr(0, colon);
  if (host.empty() || host == "0.0.0.0" || host == "localhost") {
    host = "127.0.0.1";
  }
  in_addr addr{};
  if (inet_pton(AF_INET, host.c_str(), &addr) != 1) return std::nullopt;
  return addr;
}

// Opens and closes one TCP connection to addr:port, ignoring errors.
void Knock(in_addr addr, int port) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr = addr;
  (void)connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
  close(fd);
}

const char* Reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 302: return "Found";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "";
  }
}

void Send(mg_connection* conn, const HttpResponse& r, bool head) {
  std::string out = absl::StrCat("HTTP/1.1 ", r.status, " ", Reason(r.status),
                                 "\r\nContent-Type: ", r.content_type,
                                 "\r\nContent-Length: ", r.body.size(),
                                 "\r\nCache-Control: no-store\r\n");
  for (const auto& [name, value] : r.headers) {
    absl::StrAppend(&out, name, ": ", value, "\r\n");
  }
  out += "\r\n";
  if (!head) out += r.body;
  mg_write(conn, out.data(), out.size());
}

HttpResponse Text(int status, std::string body) {
  return HttpResponse{.status = status,
                      .content_type = "text/plain; charset=utf-8",
                      .body = std::move(body)};
}

HttpRequest ParseRequest(mg_connection* conn) {
  const mg_request_info* info = mg_get_request_info(conn);
  HttpRequest request;
  request.path = info->local_uri != nullptr ? info->local_uri : "/";
  if (info->query_string != nullptr) {
    for (absl::string_view kv :
         absl::StrSplit(info->query_string, '&', absl::SkipEmpty())) {
      const size_t eq = kv.find('=');
      std::string name, value;
      CivetServer::urlDecode(std::string(kv.substr(0, eq)), name, true);
      if (eq != absl::string_view::npos) {
        CivetServer::urlDecode(std::string(kv.substr(eq + 1)), value, true);
      }
      request.params.emplace(std::move(name), std::move(value));
    }
  }
  for (int i = 0; i < info->num_headers; ++i) {
    if (info->http_headers[i].name == nullptr) continue;
    request.headers.emplace(absl::AsciiStrToLower(info->http_headers[i].name),
                            info->http_headers[i].value != nullptr
                                ? info->http_headers[i].value
                                : "");
  }
  return request;
}

}  // namespace

std::optional<std::string> HttpRequest::Param(const std::string& name) const {
  auto it = params.find(name);
  if (it == params.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> HttpRequest::Header(
    const std::string& lower_name) const {
  auto it = headers.find(lower_name);
  if (it == headers.end()) return std::nullopt;
  return it->second;
}

std::string HttpRequest::BearerToken() const {
  if (std::optional<std::string> auth = Header("authorization")) {
    constexpr absl::string_view kScheme = "bearer ";
    if (auth->size() > kScheme.size() &&
        absl::EqualsIgnoreCase(absl::string_view(*auth).substr(0, kScheme.size()),
                               kScheme)) {
      return std::string(absl::StripAsciiWhitespace(
          absl::string_view(*auth).substr(kScheme.size())));
    }
  }
  return Param("token").value_or("");
}

// Civetweb's handler for every path: looks the path up in the server's
// handlers.
class HttpServer::Dispatcher : public CivetHandler {
 public:
  explicit Dispatcher(HttpServer* server) : server_(server) {}

  bool handleGet(CivetServer*, mg_connection* conn) override {
    return Serve(conn, /*head=*/false);
  }
  bool handleHead(CivetServer*, mg_connection* conn) override {
    return Serve(conn, /*head=*/true);
  }
  bool handlePost(CivetServer*, mg_connection* conn) override {
    return Refuse(conn);
  }
  bool handlePut(CivetServer*, mg_connection* conn) override {
    return Refuse(conn);
  }
  bool handleDelete(CivetServer*, mg_connection* conn) override {
    return Refuse(conn);
  }
  bool handlePatch(CivetServer*, mg_connection* conn) override {
    return Refuse(conn);
  }

 private:
  bool Refuse(mg_connection* conn) {
    HttpResponse r = Text(405, "only GET is served here\n");
    r.headers.push_back({"Allow", "GET, HEAD"});
    Send(conn, r, /*head=*/false);
    return true;
  }

  bool Serve(mg_connection* conn, bool head) {
    const HttpRequest request = ParseRequest(conn);
    std::shared_ptr<const HttpHandler> handler;
    {
      absl::MutexLock lock(&server_->mu_);
      auto it = server_->handlers_.find(request.path);
      if (it != server_->handlers_.end()) handler = it->second;
    }
    HttpResponse response;
    if (handler == nullptr) {
      response = Text(404, absl::StrCat("no page at ", request.path, "\n"));
    } else {
      try {
        response = (*handler)(request);
      } catch (const std::exception& e) {
        response = Text(500, absl::StrCat("error: ", e.what(), "\n"));
      }
    }
    Send(conn, response, head);
    return true;
  }

  HttpServer* const server_;
};

HttpServer::HttpServer(std::string listen_address)
    : listen_address_(std::move(listen_address)) {}

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Create(
    const std::string& listen_address, int threads) {
  if (absl::Status s = CheckListenAddress(listen_address); !s.ok()) return s;
  if (threads < 1) {
    return absl::InvalidArgumentError("http server: threads must be >= 1");
  }
  std::unique_ptr<HttpServer> server(new HttpServer(listen_address));
  server->dispatcher_ = std::make_unique<Dispatcher>(server.get());
  try {
    server->civet_ = std::make_unique<CivetServer>(std::vector<std::string>{
        "listening_ports", listen_address, "num_threads",
        std::to_string(threads)});
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat(
        "cannot serve HTTP on ", listen_address, ": ", e.what()));
  }
  server->civet_->addHandler("/", server->dispatcher_.get());
  const std::vector<int> ports = server->civet_->getListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(
        absl::StrCat("HTTP server on ", listen_address, " bound no port"));
  }
  server->port_ = ports.front();
  return server;
}

HttpServer::~HttpServer() {
  if (civet_ == nullptr) return;
  // civetweb's accept loop checks for a stop only between polls of its
  // listening socket, which wait up to 2 s: stopping an idle server would
  // take that long. Connections wake the poll, so knock until it is gone.
  const std::optional<in_addr> wake = WakeAddress(listen_address_);
  std::atomic<bool> stopped{false};
  std::thread knocker;
  if (wake.has_value() && port_ > 0) {
    knocker = std::thread([&] {
      for (int i = 0; i < 1000 && !stopped.load(); ++i) {
        Knock(*wake, port_);
        absl::SleepFor(absl::Milliseconds(5));
      }
    });
  }
  civet_.reset();
  stopped.store(true);
  if (knocker.joinable()) knocker.join();
}

absl::Status HttpServer::Handle(const std::string& path, HttpHandler handler) {
  if (path.empty() || path[0] != '/') {
    return absl::InvalidArgumentError(
        absl::StrCat("http server: path \"", path, "\" must start with /"));
  }
  auto shared = std::make_shared<const HttpHandler>(std::move(handler));
  absl::MutexLock lock(&mu_);
  handlers_[path] = std::move(shared);
  return absl::OkStatus();
}

}  // namespace lmps
