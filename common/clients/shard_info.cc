#include "common/clients/shard_info.h"

#include <grpcpp/grpcpp.h>

#include "absl/time/clock.h"
#include "common/rpc/status_util.h"

namespace lmps {

absl::StatusOr<TensorInfoResponse> SmallShardInfo(
    ParameterServer::StubInterface* stub, absl::Duration timeout) {
  TensorInfoRequest req;
  req.set_tensor("wpe.weight");  // small; NOT_FOUND on shards without it
  TensorInfoResponse resp;
  grpc::Status s;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    s = stub->GetTensorInfo(&ctx, req, &resp);
  }
  if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
    grpc::ClientContext all;
    all.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    req.clear_tensor();
    s = stub->GetTensorInfo(&all, req, &resp);
  }
  if (!s.ok()) return FromGrpcStatus(s);
  return resp;
}

}  // namespace lmps
