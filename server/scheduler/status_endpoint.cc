#include "server/scheduler/status_endpoint.h"

#include <utility>
#include <vector>

#include "common/rpc/security.h"

namespace lmps {

HttpResponse StatusEndpoint::Serve(const HttpRequest& request) const {
  if (!options_.token.empty() &&
      !TokenEquals(options_.token, request.BearerToken())) {
    HttpResponse denied;
    denied.status = 401;
    denied.headers.push_back({"WWW-Authenticate", "Bearer realm=\"lmps\""});
    denied.body =
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>lmps: token needed</title></head><body>"
        "<h1>This job needs its token</h1><p>Open <code>/status?token=TOKEN"
        "</code> with the job's shared token (the contents of the "
        "<code>--auth_token_file</code>), or send <code>Authorization: "
        "Bearer TOKEN</code>.</p></body></html>\n";
    return denied;
  }
  const std::vector<StepRow> rows = options_.history != nullptr
                                        ? options_.history->Rows()
                                        : std::vector<StepRow>{};
  HttpResponse page;
  page.body = RenderStatusPage(options_.job_status(), rows,
                               options_.refresh_seconds);
  return page;
}

}  // namespace lmps
