// Client side of the parameter servers for one worker: pulls the whole model
// into a flat fp32 buffer and pushes a flat gradient buffer, talking to every
// shard in parallel and streaming each shard's chunks in messages of at most
// max_message_bytes of payload.
//
// The flat buffers follow common/model_spec.h: tensors in GptTensorSpecs
// order, each row-major, back to back.
//
// Errors name the shard and its address. Thread-safety: one call at a time
// (the worker's training loop); Stats() may be read from any thread.
#ifndef LMPS_WORKER_PS_CLIENT_H_
#define LMPS_WORKER_PS_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/lmps.grpc.pb.h"

namespace lmps {

struct PsClientOptions {
  int64_t max_message_bytes = 4 << 20;
  absl::Duration rpc_timeout = absl::Seconds(120);
  DType push_dtype = F32;  // F32, or BF16 to halve push bytes
  // Called on the shard's push thread before the push of `step` to `shard`
  // starts (accepted = false) and after the shard accepted it (true). May be
  // empty. Used for fault injection in tests.
  std::function<void(int shard, int64_t step, bool accepted)> on_shard_push;
};

struct PsClientStats {
  std::atomic<int64_t> bytes_pushed{0};
  std::atomic<int64_t> bytes_pulled{0};
  std::atomic<int64_t> rpcs{0};
};

class PsClient {
 public:
  // `stubs[s]` talks to shard s at `addresses[s]` (for messages).
  static absl::StatusOr<std::unique_ptr<PsClient>> Create(
      const ModelConfig& model, const PartitionMap& partition,
      std::vector<std::unique_ptr<ParameterServer::StubInterface>> stubs,
      std::vector<std::string> addresses, const PsClientOptions& options);

  // Fills params[num_parameters] with the parameters the shards serve for
  // `step` (see server/shard.h for each consistency mode's read rule). If
  // `min_version` is not null, sets it to the smallest version any shard
  // returned (shards may differ in BOUNDED_STALENESS and ASYNC).
  absl::Status Pull(int64_t step, float* params,
                    int64_t* min_version = nullptr);
  // Pushes grads[num_parameters] as this replica's gradient for `step`.
  absl::Status Push(int64_t step, const std::string& worker_id, int dp_rank,
                    const float* grads);
  // Sum over shards of each shard's averaged-gradient sum of squares.
  absl::StatusOr<double> GradNorm(int64_t step);
  // Applies the optimizer for `step` on every shard; returns the new version.
  absl::StatusOr<int64_t> Apply(int64_t step, double global_sum_squares);
  // BOUNDED_STALENESS: like Apply, but shards may already be past step + 1
  // (faster replicas applied later steps). Returns the smallest version;
  // Internal if a shard is still at or below `step`.
  absl::StatusOr<int64_t> ApplyBounded(int64_t step,
                                       double global_sum_squares);

  // The parameter version of every shard (index = shard id).
  absl::StatusOr<std::vector<int64_t>> Versions();

  int64_t num_parameters() const { return num_parameters_; }
  const PsClientStats& stats() const { return stats_; }

 private:
  struct Chunk {
    ChunkDesc desc;
    int64_t flat_offset;  // of element desc.begin in the flat buffer
  };
  PsClient() = default;
  // Runs fn(shard) for every shard on its own thread; the first error wins.
  absl::Status ForEachShard(const std::function<absl::Status(int)>& fn);
  absl::Status Annotate(int shard, const absl::Status& status) const;
  std::unique_ptr<grpc::ClientContext> Context() const;

  PsClientOptions options_;
  int64_t num_parameters_ = 0;
  uint64_t partition_version_ = 0;
  std::vector<std::unique_ptr<ParameterServer::StubInterface>> stubs_;
  std::vector<std::string> addresses_;
  std::vector<std::vector<Chunk>> chunks_;  // per shard
  // (tensor, chunk index) -> chunk, per shard.
  std::vector<std::map<std::pair<std::string, int>, const Chunk*>> index_;
  PsClientStats stats_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_PS_CLIENT_H_
