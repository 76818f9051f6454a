// SchedulerService: the gRPC (callback API) face of a SchedulerCore. It only
// translates messages and statuses; the logic lives in SchedulerCore.
//
// GetAssignment does not block a gRPC thread: the call's reactor is parked in
// the core and finished by whichever thread assembles the job, by the
// service's ticker thread (which calls SchedulerCore::Tick every
// `tick_interval` to resolve timeouts and leases), or by the client
// cancelling. A client's deadline is honoured `deadline_margin` early, so the
// client receives the scheduler's DEADLINE_EXCEEDED message naming what is
// missing rather than its own bare one. Deadlines are compared with the
// core's clock, so the core must run on real (wall-clock) time.
//
// Shutdown order: SchedulerCore::Shutdown() (finishes parked calls), then
// grpc::Server::Shutdown(), then destroy the service, then the core.
//
// Thread-safety: gRPC calls the methods from many threads; Create and the
// destructor are called once.
#ifndef LMPS_SERVER_SCHEDULER_SCHEDULER_SERVICE_H_
#define LMPS_SERVER_SCHEDULER_SCHEDULER_SERVICE_H_

#include <memory>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "absl/status/statusor.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "proto/lmps.grpc.pb.h"
#include "server/scheduler/scheduler_core.h"

namespace lmps {

struct SchedulerServiceOptions {
  absl::Duration tick_interval = absl::Milliseconds(100);
  absl::Duration deadline_margin = absl::Milliseconds(250);
};

class SchedulerService final : public Scheduler::CallbackService {
 public:
  // `core` must outlive the service. Starts the ticker thread.
  static absl::StatusOr<std::unique_ptr<SchedulerService>> Create(
      SchedulerCore* core, const SchedulerServiceOptions& options = {});

  SchedulerService(const SchedulerService&) = delete;
  SchedulerService& operator=(const SchedulerService&) = delete;
  // Stops the ticker thread.
  ~SchedulerService() override;

  grpc::ServerUnaryReactor* Register(grpc::CallbackServerContext* context,
                                     const RegisterRequest* request,
                                     RegisterResponse* response) override;
  grpc::ServerUnaryReactor* GetAssignment(
      grpc::CallbackServerContext* context,
      const GetAssignmentRequest* request, Assignment* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const HeartbeatRequest* request,
                                      HeartbeatResponse* response) override;
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* context,
                                      const GetStatusRequest* request,
                                      JobStatus* response) override;

 private:
  class AssignmentReactor;

  SchedulerService(SchedulerCore* core, const SchedulerServiceOptions& options);

  SchedulerCore* const core_;
  const SchedulerServiceOptions options_;
  absl::Notification stop_;
  std::thread ticker_;
};

}  // namespace lmps

#endif  // LMPS_SERVER_SCHEDULER_SCHEDULER_SERVICE_H_
