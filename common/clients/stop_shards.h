// StopShardsAt: the elastic-resize step of stopping a job at one step
// boundary on every parameter-server shard (ParameterServer.StopAt in
// proto/lmps.proto), shared by lmps_local and the elastic scheduler.
//
// Starting with max(first, the largest shard version now + `ahead`) (the
// versions asked with GetTensorInfo, so stale progress reports cost no
// rounds), every shard at `addresses` (the primaries) is asked to stop at
// the step; if one is already past it, every shard is asked again 4, 8,
// 16, ... steps later, up to 20 rounds. A shard that accepted a step keeps
// answering pulls of later steps with ABORTED, so callers pick `first` far
// enough ahead that no worker reaches it before every shard was asked (two
// steps past the most advanced shard), or at the version where a dead
// worker's replicas wait.
//
// Returns the step every shard accepted; Unavailable naming the shard and
// its answer when one fails otherwise; DeadlineExceeded after 20 rounds.
// Each call has a 5 s deadline. Thread-safe (no shared state).
#ifndef LMPS_COMMON_CLIENTS_STOP_SHARDS_H_
#define LMPS_COMMON_CLIENTS_STOP_SHARDS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/rpc/security.h"

namespace lmps {

absl::StatusOr<int64_t> StopShardsAt(const std::vector<std::string>& addresses,
                                     const Security& security, int64_t first,
                                     int64_t ahead);

}  // namespace lmps

#endif  // LMPS_COMMON_CLIENTS_STOP_SHARDS_H_
