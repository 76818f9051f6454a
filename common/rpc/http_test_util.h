// Test-only: a raw-socket HTTP/1.0 client for the daemons' metrics port.
#ifndef LMPS_COMMON_RPC_HTTP_TEST_UTIL_H_
#define LMPS_COMMON_RPC_HTTP_TEST_UTIL_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

namespace lmps {

// Sends `method path` (with `extra_headers`, each ending in "\r\n") to
// 127.0.0.1:`port` and returns the whole response, or "" if the connection
// failed.
inline std::string HttpRequestRaw(int port, const std::string& method,
                                  const std::string& path,
                                  const std::string& extra_headers = "") {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string response;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string request = method + " " + path +
                                " HTTP/1.0\r\nHost: 127.0.0.1\r\n" +
                                extra_headers + "\r\n";
    if (write(fd, request.data(), request.size()) ==
        static_cast<ssize_t>(request.size())) {
      char buf[4096];
      ssize_t n;
      while ((n = read(fd, buf, sizeof(buf))) > 0) response.append(buf, n);
    }
  }
  close(fd);
  return response;
}

// GET `path`; the whole response.
inline std::string HttpGet(int port, const std::string& path,
                           const std::string& extra_headers = "") {
  return HttpRequestRaw(port, "GET", path, extra_headers);
}

// The body of a response (after the blank line), or "".
inline std::string HttpBody(const std::string& response) {
  const size_t at = response.find("\r\n\r\n");
  return at == std::string::npos ? "" : response.substr(at + 4);
}

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_HTTP_TEST_UTIL_H_
