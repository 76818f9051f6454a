// The partition map: which parameter-server shard holds which chunk of which
// tensor. A pure function of (model config, number of shards, max chunk
// size), so every node computes the same map; `version` fingerprints it.
//
// Chunking: a tensor of n fp32 elements is cut into k = ceil(4n / max_bytes)
// contiguous chunks whose sizes differ by at most one element.
// Placement: longest-processing-time greedy over bytes: chunks in decreasing
// size (ties in canonical tensor order) each go to the shard holding the
// fewest bytes so far (ties: lowest shard id). The result is within 4/3 of
// the optimal makespan; `imbalance` = max / mean shard bytes reports it.
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_MODEL_PARTITION_H_
#define LMPS_COMMON_MODEL_PARTITION_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/lmps.pb.h"

namespace lmps {

absl::StatusOr<PartitionMap> ComputePartition(const ModelConfig& model,
                                              int num_shards,
                                              int64_t max_chunk_bytes);

// The chunks of `map` owned by `shard`, in map order.
std::vector<ChunkDesc> ChunksOfShard(const PartitionMap& map, int shard);

}  // namespace lmps

#endif  // LMPS_COMMON_MODEL_PARTITION_H_
