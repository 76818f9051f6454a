// Client side of the parameter servers for one worker: pulls its parameters
// into a flat fp32 buffer and pushes a flat gradient buffer, talking to the
// shards in parallel and streaming each shard's part in messages of at most
// max_message_bytes of payload.
//
// Without a view the flat buffers hold the whole model as in
// common/model/model_spec.h: tensors in GptTensorSpecs order, each row-major, back
// to back. With a view (pipeline and tensor parallel) they hold the worker's
// local parameters: for every tensor in GptTensorSpecs order the
// concatenation of the element ranges Held(tensor, pp_rank, tp_rank)
// (common/model/parallel_layout.h), tensors it holds nothing of left out -- each
// tensor in its local shape, as worker/model/stage_model lays them out.
// Pull asks the shards for those ranges only (PullRequest.owned_only) and
// only the shards holding some of them; Push sends only
// Pushed(tensor, pp_rank, tp_rank) (replicated tensors from tp rank 0 only)
// and only to the shards holding some of it; GradNorm and Apply address
// every shard.
//
// Both are one mechanism: per shard, a list of pieces (tensor, chunk, offset
// in the chunk, elements, offset in the local buffer) -- whole chunks
// without a view.
//
// Shard replication (layout.shard_backups = 1, SetBackups): a call to a
// shard that fails with UNAVAILABLE fails over between the shard's nodes
// as worker/shard_failover.h decides (the other node, then where the
// scheduler says the shard is now, with growing pauses, until
// failover_timeout). Every call is safe to repeat on another node: the
// primary acknowledges nothing its backup lacks (server/replication.h), so
// a retried push counts as a duplicate and a retried apply returns the
// version.
//
// Gradient compression (PsClientOptions.compression, worker/compression.h):
// every push slice (at most max_message_bytes / 4 elements of one chunk) is
// compressed with error feedback. The residual (one float per pushed
// element) lives here; a step's residual is computed from the previous
// step's, kept apart, so a push of the same step again (a failover retry)
// sends exactly the same bytes. A new client (a replacement worker) starts
// with a zero residual.
//
// Pull and Push messages travel as raw byte buffers in PullResponse's and
// PushRequest's wire format (common/wire/chunk_wire.h, raw_call.h): each
// payload byte is encoded once into the slice gRPC sends, and a pulled one
// decoded once from the slice gRPC received; protobuf copies none.
//
// Errors name the shard and its address. Thread-safety: one call at a time
// (the worker's training loop, or a thread it hands the pushes of a step to
// while it does not call the client itself), except PullTensors (layer-wise
// pulls: see there); stats() may be read from any thread.
#ifndef LMPS_WORKER_PS_CLIENT_H_
#define LMPS_WORKER_PS_CLIENT_H_

#include <grpcpp/channel.h>
#include <grpcpp/generic/generic_stub.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "absl/time/time.h"
#include "common/model/parallel_layout.h"
#include "common/shm/shared_region.h"
#include "common/wire/chunk_wire.h"
#include "proto/lmps.grpc.pb.h"
#include "worker/shard_failover.h"

namespace lmps {

// The part of the model a worker holds and pushes.
struct PsClientView {
  // Not owned; must outlive the client. nullptr: the whole model.
  const ParallelLayout* layout = nullptr;
  int pp_rank = 0;
  int tp_rank = 0;
};

struct PsClientOptions {
  int64_t max_message_bytes = 4 << 20;
  // A push sends each shard its chunks in streams of at most this many
  // payload bytes (whole chunks; a larger chunk goes alone), one after
  // another (JobSpec.max_push_stream_bytes); <= 0: one stream per shard.
  int64_t max_push_stream_bytes = 0;
  // Concurrent streams per shard for each pull and push
  // (JobSpec.streams_per_shard); 1: one at a time. Ignored (1) with shard
  // replication.
  int streams_per_shard = 1;
  absl::Duration rpc_timeout = absl::Seconds(120);
  DType push_dtype = F32;  // F32, or BF16 to halve push bytes
  // What Pull asks the shards for (train.pull_dtype): F32, or BF16 to halve
  // the pull bytes (each value rounded to nearest even by the shard and
  // widened back to fp32 here, exactly).
  DType pull_dtype = F32;
  // train.compression (then push_dtype must be F32), and train.seed for
  // RANDOMK.
  CompressionConfig compression;
  uint64_t seed = 0;
  // Called on the shard's push thread before each push stream of `step` to
  // `shard` starts (accepted = false) and after the shard accepted it
  // (true); PushChunks may send a step in several streams per shard. May be
  // empty. Used for fault injection in tests.
  std::function<void(int shard, int64_t step, bool accepted)> on_shard_push;
  // Replicated shards: how long to alternate between a shard's two nodes
  // while both answer UNAVAILABLE (covers the scheduler's lease, after
  // which it promotes the backup).
  absl::Duration failover_timeout = absl::Seconds(60);
  // JobSpec.shared_memory AUTO: pull and push payloads go through a
  // shared-memory region per shard (docs/parameter-shard.md) when the shard
  // can map it, else (another host) through the socket, as with false.
  bool shared_memory = false;
  // Bytes of each shared-memory window; 0: enough for two pull messages or
  // one push stream (tests make it small).
  int64_t shared_window_bytes = 0;
  // A line for the worker's log (the fall-back to the socket). May be empty.
  std::function<void(const std::string&)> log;
};

struct PsClientStats {
  // Payload bytes (ChunkSlice.data; pushes also compressed slices' indices
  // and scales: the wire bytes of the gradient; pulls 2 bytes per element
  // with pull_dtype BF16), headers not counted.
  std::atomic<int64_t> bytes_pushed{0};
  std::atomic<int64_t> bytes_pulled{0};
  std::atomic<int64_t> rpcs{0};
  std::atomic<int64_t> failovers{0};  // switches to a shard's other node
  // Of bytes_pushed and bytes_pulled: those that went through shared memory.
  std::atomic<int64_t> bytes_shared{0};
};

// Whether a worker's --backend names the CUDA backend ("cuda" or "cuda:N").
bool IsCudaBackendName(const std::string& backend);

// The pull dtype a worker asks for: train.pull_dtype when set (F32 or
// BF16), else BF16 for a CUDA backend and F32 for any other.
DType ResolvePullDtype(DType configured, const std::string& backend);

// Whether a data-parallel worker pulls layer by layer: train.layerwise_pull
// when set, else on for a CUDA backend (its host threads are idle while the
// device computes, so the pull hides behind the forward pass) and off for
// any other (the CPU backend's compute threads and the pull share the
// cores: layer-wise pulls measured slower there, docs/benchmarks.md, and a
// whole pull can travel in the push's answer, PushAndReduce).
bool ResolveLayerwisePull(LayerwisePullMode configured,
                          const std::string& backend);

class PsClient {
 public:
  // `stubs[s]` talks to shard s at `addresses[s]` (for messages). With
  // view.layout set, the buffers are the worker's local ones (see the file
  // comment); InvalidArgument when the ranks are outside the layout or the
  // layout is of another model.
  static absl::StatusOr<std::unique_ptr<PsClient>> Create(
      const ModelConfig& model, const PartitionMap& partition,
      std::vector<std::shared_ptr<grpc::Channel>> channels,
      std::vector<std::string> addresses, const PsClientOptions& options,
      const PsClientView& view = {});

  // Shard replication. `backups[s]`: shard s's backup ("": none);
  // `make_stub` makes a stub for an address; `resolve` (may be empty) says
  // where a shard's nodes are now (the scheduler's view: after a takeover
  // and a restart both may have moved), asked whenever both known nodes
  // answered UNAVAILABLE (the one known node, when no backup is known).
  // Call before any other method.
  struct ShardNodes {
    std::string primary;
    std::string backup;
  };
  using ChannelFactory = std::function<std::shared_ptr<grpc::Channel>(
      const std::string& address)>;
  void SetBackups(std::vector<std::string> backups,
                  ChannelFactory make_channel,
                  std::function<absl::StatusOr<ShardNodes>(int shard)> resolve);

  // Fills params[num_parameters] with the parameters the shards serve for
  // `step` (docs/parameter-shard.md has each consistency mode's read
  // rule). If `min_version` is not null, sets it to the smallest version
  // any shard pulled from returned (shards may differ in BOUNDED_STALENESS
  // and ASYNC).
  absl::Status Pull(int64_t step, float* params,
                    int64_t* min_version = nullptr);
  // Pull, plus the shards' optimizer state for the same elements into
  // state[k][num_parameters] (one buffer per OptimizerStateBuffers: SGD
  // momentum; AdamW m, v), for a worker that runs the optimizer itself
  // (train.dp_aggregation RING_ALLREDUCE) and starts or resumes where the
  // shards are. FailedPrecondition unless the pull dtype is F32; DataLoss
  // if a shard holds another number of buffers.
  absl::Status PullWithOptimizerState(int64_t step, float* params,
                                      absl::Span<float* const> state,
                                      int64_t* min_version = nullptr);
  // Part of Pull, for layer-wise pulls (worker/layerwise_pull.h): the
  // elements of `tensors` (names) this worker holds on `shard`, for `step`,
  // into their places in params (the other elements are not touched); sets
  // *version (if not null) to the version served. Several may run at once
  // for different shards, and -- without shard replication (SetBackups),
  // whose failover state is per shard and single-threaded -- also for one
  // shard and beside GradNorm / Apply / Push calls (each call has its own
  // RPC; the stubs are thread-safe).
  absl::Status PullTensors(int64_t step, int shard,
                           const std::set<std::string>& tensors, float* params,
                           int64_t* version = nullptr);
  // Elements of `tensors` PullTensors receives from `shard` (0: none).
  int64_t HeldElements(int shard, const std::set<std::string>& tensors) const;
  int num_shards() const { return static_cast<int>(stubs_.size()); }
  DType pull_dtype() const { return options_.pull_dtype; }
  // Whether SetBackups was called (shard replication).
  bool replicated() const { return !failover_.empty(); }
  // Pushes grads[num_parameters] as this replica's gradient for `step` (with
  // a view: the Pushed part of this worker's local gradient).
  absl::Status Push(int64_t step, const std::string& worker_id, int dp_rank,
                    const float* grads);
  // Pushes part of that gradient (to overlap pushing with the backward
  // pass): every chunk whose pushed elements all lie inside `range` of the
  // flat buffer and not all inside `done`, as one stream per shard (shards
  // in parallel; none for a shard without such a chunk). A chunk is never
  // split between calls: the shards accept a replica's chunks for a step in
  // any number of streams, each holding whole chunks. Only grads[range] is
  // read. Exactly-once rule: for calls of one step with growing ranges
  // r1 <= r2 <= ... <= rk = [0, num_parameters()), each passing the
  // previous call's range as `done` (empty for the first), every chunk is
  // pushed exactly once, and together they equal Push. With an empty `done`
  // and the whole buffer as `range` it is Push.
  absl::Status PushChunks(int64_t step, const std::string& worker_id,
                          int dp_rank, const float* grads, ElementRange range,
                          ElementRange done = {});
  // SYNC jobs where this worker pushes to every shard (pp = tp = 1):
  // Push, GradNorm and -- with one shard -- Apply in one round trip per
  // shard. Each shard's last push stream asks it to answer once the step's
  // gradient is complete there (PushRequest.then): PUSH_THEN_NORM with its
  // sum of squares; with one shard PUSH_THEN_APPLY, which also applies the
  // step with that sum (the one shard's norm is the job's).
  //
  // With `next_params` (num_parameters() floats) and one shard that shares
  // memory with this worker (PsClientOptions.shared_memory), the shard
  // also answers the pull of step + 1 once it applied the step
  // (PushRequest.then_pull): next_params receives what Pull(step + 1)
  // would, and the next step needs no pull of its own. `pulled` says
  // whether that happened; when not (several shards, no shared memory,
  // shard replication, the shard could not serve it, or the further
  // requests of a pull larger than the window failed -- logged) call Pull
  // as usual: next_params may then hold part of the new parameters.
  struct PushedStep {
    double sum_squares = 0;  // as GradNorm returns it, bitwise
    int64_t version = -1;    // Apply's, with one shard; else -1
    bool pulled = false;     // next_params holds version pulled_version
    int64_t pulled_version = -1;
  };
  absl::StatusOr<PushedStep> PushAndReduce(int64_t step,
                                           const std::string& worker_id,
                                           int dp_rank, const float* grads,
                                           float* next_params = nullptr);
  // Whether every shard receives part of this worker's push (PushAndReduce
  // needs it).
  bool pushes_to_every_shard() const {
    return static_cast<int>(push_shards_.size()) == num_shards();
  }
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
  // The smallest over shards of the steps replica `dp_rank` has completely
  // pushed (ASYNC: where a replacement of that replica resumes).
  absl::StatusOr<int64_t> ReplicaClock(int dp_rank);

  // Floats in the flat buffers: the whole model, or with a view
  // HeldElements(pp_rank, tp_rank).
  int64_t num_parameters() const { return num_parameters_; }
  // Divides the flat gradient buffer `grads` (num_parameters() floats, the
  // whole-model view) by `replicas` in place and returns its squared L2
  // norm bitwise as the shards and GradNorm compute it for the same pushed
  // gradient: per shard over its chunks (ShardMeanAndSumSquares,
  // server/optimizer.h), added in shard order. The ring all-reduce workers
  // use it, so their update and the shards' agree to the bit.
  double MeanAndSumSquares(float replicas, float* grads) const;
  const PsClientStats& stats() const { return stats_; }

 private:
  // Elements [chunk_offset, chunk_offset + n) of a chunk, at local_offset
  // in the flat buffer.
  struct LocalPiece {
    std::string tensor;
    int chunk = 0;
    int64_t chunk_offset = 0;
    int64_t n = 0;
    int64_t local_offset = 0;
  };
  PsClient() = default;
  // Runs fn(shard) for every shard (or those in `shards`) on its own
  // thread; the first error in shard order wins.
  absl::Status ForEachShard(const std::function<absl::Status(int)>& fn);
  // GetTensorInfo of a small tensor on every shard, handed to fn (called
  // from the shards' threads).
  absl::Status ForEachShardInfo(
      const std::function<void(int, const TensorInfoResponse&)>& fn);
  absl::Status ForEachShard(const std::vector<int>& shards,
                            const std::function<absl::Status(int)>& fn);
  absl::Status Annotate(int shard, const absl::Status& status) const;
  // fn(shard), and with a backup the failover described above.
  // Pulls `tensors` (all: nullptr) of shard s for `step` into params;
  // *version: the version served.
  // Pull and PullWithOptimizerState (`state` empty: no state).
  absl::Status PullAll(int64_t step, float* params,
                       absl::Span<float* const> state, int64_t* min_version);
  // With a non-empty `state` (one buffer per optimizer buffer, laid out
  // like params) also the shard's optimizer state (F32 pulls only).
  // options.streams_per_shard, or 1 with shard replication (whose failover
  // state is per shard and single-threaded).
  int StreamsPerShard() const {
    return replicated() ? 1 : std::max(1, options_.streams_per_shard);
  }
  // In StreamsPerShard() concurrent PullStreams.
  absl::Status PullShard(int64_t step, int s,
                         const std::set<std::string>* tensors, float* params,
                         int64_t* version,
                         absl::Span<float* const> state = {});
  // One pull stream, stream `stream` of `streams` (PullRequest.streams):
  // through a shared-memory window when there is one (several requests
  // when the pull does not fit), else one Pull RPC; adds the elements it
  // received to *received.
  absl::Status PullStream(int64_t step, int s,
                          const std::set<std::string>* tensors, float* params,
                          int64_t* version, absl::Span<float* const> state,
                          int stream, int streams, int64_t* received);
  PullRequest MakePullRequest(int64_t step,
                              const std::set<std::string>* tensors,
                              bool with_state, int stream, int streams) const;
  // Points `req` at `window` of `windows`, from the pull's first message.
  void SetPullWindow(WindowPool* windows, int64_t window,
                     PullRequest* req) const;
  // What one pull stream receives into, and where it stands.
  struct PullSink {
    int shard = 0;
    float* params = nullptr;
    absl::Span<float* const> state;
    int64_t* version = nullptr;
    int64_t* received = nullptr;
    const SharedRegion* region = nullptr;  // a shared-memory pull's
    bool first_answer = true;
    PullResponseView resp;  // the last answer
    absl::Status bad;       // a slice this worker did not ask for
  };
  // Parses one pull answer and writes its slices into the sink.
  absl::Status ReceivePullMessage(const grpc::ByteBuffer& message,
                                  PullSink* sink);
  // One Pull RPC of `req` to shard sink->shard.
  absl::Status RawPull(const PullRequest& req, PullSink* sink);
  // A shared-memory pull (`req` points at a window of `windows`): requests
  // from req->first_message on until the shard answers next_message 0.
  // `answered` (may be null): the answer to the first request, already in
  // hand (PushRequest.then_pull).
  absl::Status PullThroughWindow(PullRequest* req, WindowPool* windows,
                                 PullSink* sink,
                                 const grpc::ByteBuffer* answered);
  absl::Status CallWithFailover(int shard,
                                const std::function<absl::Status(int)>& fn);
  // The node of `shard` in use (on the shard's thread).
  // A shard node's stubs: generated (unary calls) and raw (Pull and Push,
  // whose messages common/wire/chunk_wire.h writes and reads).
  struct NodeStubs {
    explicit NodeStubs(std::shared_ptr<grpc::Channel> channel);
    std::unique_ptr<ParameterServer::StubInterface> rpc;
    std::unique_ptr<grpc::GenericStub> raw;
  };
  NodeStubs* Stub(int shard);
  std::string Address(int shard) const;
  // Fills `slice`'s payload with grads[p.local_offset + off, + n): dense in
  // push_dtype, or compressed (updating the residual).
  // One push stream of `pieces` (whole chunks) to shard s, in messages of
  // at most max_elems elements.
  // `then`, `then_pull` (serialized; may be empty) and `answer` (may be
  // null): PushRequest.then and then_pull, and the shard's PushResponse.
  absl::Status PushStream(int64_t step, const std::string& worker_id,
                          int dp_rank, const float* grads, int s,
                          absl::Span<const LocalPiece* const> pieces,
                          int64_t max_elems, PushThen then = PUSH_THEN_NOTHING,
                          const std::string& then_pull = "",
                          PushResponse* answer = nullptr);
  // PushChunks; with `then` (and `then_pull`), each shard's last stream
  // carries it and answers[s] gets shard s's answer to it (answers:
  // num_shards()). The caller makes sure every shard gets a stream
  // (PushAndReduce).
  absl::Status PushChunksThen(int64_t step, const std::string& worker_id,
                              int dp_rank, const float* grads,
                              ElementRange range, ElementRange done,
                              PushThen then, const std::string& then_pull,
                              std::vector<PushResponse>* answers);
  // With `shm` (a push window's first byte) the payload goes there at
  // *shm_at, which advances; else into the slice.
  absl::Status EncodePushSlice(int64_t step, int dp_rank, const LocalPiece& p,
                               int64_t off, int64_t n, const float* grads,
                               ChunkSliceOut* slice, char* shm = nullptr,
                               int64_t* shm_at = nullptr);
  // Writes a pulled slice of shard s into params (and state), checking it
  // is one this worker asked for; adds its elements to *received.
  absl::Status ReceivePulledSlice(int s, const ChunkSliceView& slice,
                                  float* params,
                                  absl::Span<float* const> state,
                                  int64_t* received);
  std::unique_ptr<grpc::ClientContext> Context() const;

  // Shared memory: shard s's window pool, created on first use; nullptr
  // when shared memory is off for s (the option, a refusal, or no memfd).
  WindowPool* SharedWindows(int s);
  // True (and shared memory turned off for s) when `status` is the shard's
  // refusal of the region (kSharedMemoryRefused): repeat over the socket.
  bool SharedMemoryRefused(int s, const absl::Status& status);
  // Bytes of one window: a push stream's payloads, or a pull's messages.
  int64_t WindowBytes() const;

  PsClientOptions options_;
  int64_t num_parameters_ = 0;
  uint64_t partition_version_ = 0;
  std::vector<std::unique_ptr<NodeStubs>> stubs_;
  std::vector<std::string> addresses_;
  // Replication (empty unless SetBackups): per shard the failover state
  // and the stubs of nodes other than addresses_[shard], by address.
  std::vector<ShardFailover> failover_;
  std::vector<std::map<std::string, std::unique_ptr<NodeStubs>>> node_stubs_;
  ChannelFactory make_channel_;
  std::function<absl::StatusOr<ShardNodes>(int)> resolve_;
  bool has_view_ = false;
  int pp_rank_ = 0, tp_rank_ = 0;
  // Per shard: what Pull receives (held) and what Push sends (pushed), in
  // partition order, adjacent pieces merged.
  std::vector<std::vector<LocalPiece>> pull_pieces_;
  std::vector<std::vector<LocalPiece>> push_pieces_;
  std::vector<int> pull_shards_, push_shards_;  // shards with pieces
  // Per shard: (tensor, chunk index) -> its pull pieces, by chunk_offset.
  std::vector<std::map<std::pair<std::string, int>, std::vector<const LocalPiece*>>>
      index_;
  PsClientStats stats_;
  std::unique_ptr<PeerWindowPools> shm_;  // by shard
  // Compression: residual_[prev_] is the residual after the step before
  // residual_step_, residual_[1 - prev_] the one after residual_step_ (only
  // the pushed elements are used).
  bool compress_ = false;
  std::vector<float> residual_[2];
  int prev_ = 0;
  int64_t residual_step_ = -1;
};

}  // namespace lmps

#endif  // LMPS_WORKER_PS_CLIENT_H_
