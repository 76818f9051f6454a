// SmallShardInfo: one parameter-server shard's version and replica clocks
// (ParameterServer.GetTensorInfo) without computing every tensor's norm:
// it asks for a small tensor (wpe.weight) and, where the shard holds no
// chunk of it (NOT_FOUND), for all of the shard's tensors. Each call has
// `timeout` as its deadline. Errors are the RPC's. Thread-safe.
#ifndef LMPS_COMMON_CLIENTS_SHARD_INFO_H_
#define LMPS_COMMON_CLIENTS_SHARD_INFO_H_

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/lmps.grpc.pb.h"

namespace lmps {

absl::StatusOr<TensorInfoResponse> SmallShardInfo(
    ParameterServer::StubInterface* stub, absl::Duration timeout);

}  // namespace lmps

#endif  // LMPS_COMMON_CLIENTS_SHARD_INFO_H_
