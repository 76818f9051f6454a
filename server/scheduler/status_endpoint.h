// GET /status on the scheduler's metrics port: the live status page
// (report/status_page.h) of the job, read-only, behind the job's token.
//
// With a token configured (--auth_token_file), a request must present it,
// like every RPC: `Authorization: Bearer <token>`, or `?token=<token>` in
// the URL so that a browser can open the page and its self-refresh keeps
// it. Without it the answer is 401 with a page saying how, and nothing
// about the job. Without a token the page is open, like the job's RPCs.
// Without TLS the token travels in cleartext, as it does for the RPCs;
// bind the metrics port to a trusted network (the Kubernetes NetworkPolicy
// in deploy/ does).
//
// Thread-safety: StatusEndpoint is thread-safe; Serve runs on the HTTP
// server's threads. The job-status source and the history must outlive it.
#ifndef LMPS_SERVER_SCHEDULER_STATUS_ENDPOINT_H_
#define LMPS_SERVER_SCHEDULER_STATUS_ENDPOINT_H_

#include <functional>
#include <string>

#include "common/rpc/http_server.h"
#include "proto/lmps.pb.h"
#include "report/status_page.h"

namespace lmps {

class StatusEndpoint {
 public:
  struct Options {
    std::string token;  // empty: no token needed
    std::function<JobStatus()> job_status;  // the scheduler's current view
    const StatusHistory* history = nullptr;  // not owned
    int refresh_seconds = 2;
  };

  explicit StatusEndpoint(Options options) : options_(std::move(options)) {}

  HttpResponse Serve(const HttpRequest& request) const;

 private:
  const Options options_;
};

}  // namespace lmps

#endif  // LMPS_SERVER_SCHEDULER_STATUS_ENDPOINT_H_
