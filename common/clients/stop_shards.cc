#include "common/clients/stop_shards.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/clients/shard_info.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/status_util.h"
#include "proto/lmps.grpc.pb.h"

namespace lmps {

absl::StatusOr<int64_t> StopShardsAt(const std::vector<std::string>& addresses,
                                     const Security& security, int64_t first,
                                     int64_t ahead) {
  int64_t step = first;
  for (const std::string& address : addresses) {
    auto stub = ParameterServer::NewStub(MakeChannel(address, nullptr, security));
    absl::StatusOr<TensorInfoResponse> info =
        SmallShardInfo(stub.get(), absl::Seconds(5));
    // An unanswered version leaves `first`; StopAt then says "past".
    if (info.ok()) step = std::max(step, info->version() + ahead);
  }
  int64_t last = step;
  // A shard past the step: every shard is asked again, 4, 8, 16, ... steps
  // later (a fast job moves many steps during one round of calls).
  for (int round = 0; round < 20; step += int64_t{4} << std::min(round, 20),
           ++round) {
    last = step;
    bool past = false;
    for (const std::string& address : addresses) {
      auto stub = ParameterServer::NewStub(MakeChannel(address, nullptr, security));
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
      StopAtRequest req;
      req.set_step(step);
      StopAtResponse resp;
      const grpc::Status s = stub->StopAt(&ctx, req, &resp);
      if (ReasonOf(FromGrpcStatus(s)) == STOP_STEP_PASSED) {
        past = true;  // ask everyone again, later
      } else if (!s.ok()) {
        return absl::UnavailableError(absl::StrCat(
            "shard at ", address, " refused to stop at step ", step, ": ",
            s.error_message()));
      }
    }
    if (!past) return step;
  }
  return absl::DeadlineExceededError(absl::StrCat(
      "the shards kept moving past the stop step (last tried ", last,
      ") for 20 rounds"));
}

}  // namespace lmps
