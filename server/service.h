// ParameterServerService: the gRPC adapter (callback API) of one
// ParameterShard. It holds no training logic: every RPC converts its
// messages, calls the shard and converts the status (common/rpc/status_util).
//
//   Push           ServerReadReactor over raw byte buffers: collects the
//                  client stream (at most max_push_bytes in total, else
//                  RESOURCE_EXHAUSTED without touching the shard), then
//                  ParameterShard::Push on the messages read in place
//                  (common/wire/chunk_wire.h; PushRequest's wire format).
//   Pull           ServerWriteReactor over raw byte buffers (gRPC's raw
//                  callback method): ParameterShard::StartPull, then each
//                  message encoded by EncodePull straight into the slices
//                  gRPC sends (common/wire/chunk_wire.h; the wire format is
//                  PullResponse's, unchanged).
//   GradNorm, Apply, GetTensorInfo, StopAt   unary reactors.
//   Replicate      ServerReadReactor (primary -> backup, layout.shard_backups
//                  = 1): collects the stream, then ReplicatedShard::Replicate.
//
// With replication (SetShard's `replicated`), Push, Apply and StopAt go
// through the ReplicatedShard (forwarded to the backup first) and Pull,
// GradNorm and GetTensorInfo are served only while
// ReplicatedShard::CheckServing() is OK (a backup answers UNAVAILABLE
// until it takes over). Without it Replicate is FAILED_PRECONDITION.
//
// gRPC's callback threads never block: calls that wait for other workers
// (Pull, GradNorm) run on a "wait" thread pool, the others (Push, Apply
// with its checkpoint write, GetTensorInfo) on a "work" pool, so waits can
// never hold up the pushes and applies they wait for. Waits end at the
// client's deadline or the shard's wait_timeout, whichever is first.
//
// Until SetShard is called (the server starts before it has its assignment)
// every RPC fails with UNAVAILABLE.
//
// Thread-safety: thread-safe. Shutdown order: ParameterShard::Shutdown()
// (ends waits), grpc::Server::Shutdown(), then destroy this service (joins
// the pools), then the shard.
#ifndef LMPS_SERVER_SERVICE_H_
#define LMPS_SERVER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/lmps.grpc.pb.h"
#include "server/replication.h"
#include "server/rpc_work_pool.h"
#include "common/shm/shared_region.h"
#include "server/shard.h"

namespace lmps {

struct ServiceOptions {
  int wait_threads = 8;  // Pull and GradNorm
  int work_threads = 2;  // Push, Apply, GetTensorInfo
  // Cap on the serialized bytes of one push stream; 0: twice the shard's
  // fp32 bytes plus 4 MiB (room for a retried duplicate and headers).
  int64_t max_push_bytes = 0;
  // Maps the shared-memory regions workers on this host name
  // (docs/parameter-shard.md); false: refuses them, so workers use the socket.
  bool shared_memory = true;
  // Receives a line for every failed Push/Apply; may be empty.
  std::function<void(const std::string&)> log;
};

class ParameterServerService final
    : public ParameterServer::WithRawCallbackMethod_Push<
          ParameterServer::WithRawCallbackMethod_Pull<
              ParameterServer::CallbackService>> {
 public:
  explicit ParameterServerService(ServiceOptions options);
  ~ParameterServerService() override;

  // Starts serving `shard` (not owned; must outlive this service), through
  // `replicated` (not owned, may be null; wraps `shard`) when replicated.
  void SetShard(ParameterShard* shard, ReplicatedShard* replicated = nullptr);

  // The stream's messages are serialized PushRequests, `response` a
  // serialized PushResponse.
  grpc::ServerReadReactor<grpc::ByteBuffer>* Push(
      grpc::CallbackServerContext* context,
      grpc::ByteBuffer* response) override;
  // `request` is a serialized PullRequest.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Pull(
      grpc::CallbackServerContext* context,
      const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* GradNorm(grpc::CallbackServerContext* context,
                                     const GradNormRequest* request,
                                     GradNormResponse* response) override;
  grpc::ServerUnaryReactor* Apply(grpc::CallbackServerContext* context,
                                  const ApplyRequest* request,
                                  ApplyResponse* response) override;
  grpc::ServerUnaryReactor* GetTensorInfo(
      grpc::CallbackServerContext* context, const TensorInfoRequest* request,
      TensorInfoResponse* response) override;
  grpc::ServerUnaryReactor* StopAt(grpc::CallbackServerContext* context,
                                   const StopAtRequest* request,
                                   StopAtResponse* response) override;
  grpc::ServerReadReactor<ReplicateRequest>* Replicate(
      grpc::CallbackServerContext* context,
      ReplicateResponse* response) override;

 private:
  class PushReactor;
  class PullReactor;
  class ReplicateReactor;
  // What the RPCs serve: the shard, and its replication (or null).
  struct Target {
    ParameterShard* shard = nullptr;
    ReplicatedShard* replicated = nullptr;
    // OK when this node serves workers (always without replication).
    absl::Status Serving() const;
  };

  void Log(const std::string& line) const;
  // The unary RPCs: NotReady without a shard, else fn(shard) on `pool`
  // (gRPC's callback threads never block) and its status finishes the call.
  grpc::ServerUnaryReactor* OnPool(
      grpc::CallbackServerContext* context, RpcWorkPool* pool,
      std::function<grpc::Status(const Target&)> fn);
  int64_t MaxPushBytes(const ParameterShard& shard) const;
  // Apply of `step` through the replication when there is one; logs a
  // failure.
  absl::StatusOr<int64_t> ApplyStep(const Target& t, int64_t step,
                                    double global_sum_squares);
  // InvalidArgument unless the shard can do what a push of `step` asks
  // after it: PushRequest.then, and then_pull (serialized; empty: none),
  // parsed into *pull.
  absl::Status CheckPushThen(const ParameterShard& shard, int64_t step,
                             PushThen then, const std::string& then_pull,
                             PullRequest* pull) const;
  // StartPull of `request` on t's shard (the read rule's wait, until
  // `deadline`) and, for a shared-memory pull (PullRequest.shm), the part
  // of its plan that fits the worker's window; *region holds the window
  // mapped while the plan is encoded.
  absl::StatusOr<ParameterShard::PullPlan> PlanPull(
      const Target& t, const PullRequest& request, absl::Time deadline,
      std::shared_ptr<const SharedRegion>* region);
  Target target() const;
  // The worker's shared-memory region a request names
  // (docs/parameter-shard.md).
  absl::StatusOr<std::shared_ptr<const SharedRegion>> Region(
      const SharedRegionDesc& desc);

  const ServiceOptions options_;
  mutable absl::Mutex mu_;
  Target target_ ABSL_GUARDED_BY(mu_);
  RegionCache regions_;
  // Declared last: destroyed (joined) first, while the members above live.
  std::unique_ptr<RpcWorkPool> work_pool_;
  std::unique_ptr<RpcWorkPool> wait_pool_;
};

// The absl deadline of a server call (InfiniteFuture if the client set none).
absl::Time CallDeadline(const grpc::CallbackServerContext& context);

}  // namespace lmps

#endif  // LMPS_SERVER_SERVICE_H_
