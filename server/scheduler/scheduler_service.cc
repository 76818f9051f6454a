#include "server/scheduler/scheduler_service.h"

#include <chrono>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/rpc/status_util.h"

namespace lmps {

// The reactor of one GetAssignment call. It may be finished by the core (from
// any thread) or by OnCancel, whichever comes first; the shared Slot makes
// sure Finish is called once and the reactor (deleted in OnDone) is not
// touched afterwards.
class SchedulerService::AssignmentReactor final
    : public grpc::ServerUnaryReactor {
 public:
  struct Slot {
    absl::Mutex mu;
    bool finished ABSL_GUARDED_BY(mu) = false;
    AssignmentReactor* reactor = nullptr;
    Assignment* response = nullptr;
  };

  explicit AssignmentReactor(Assignment* response)
      : slot_(std::make_shared<Slot>()) {
    slot_->reactor = this;
    slot_->response = response;
  }

  std::shared_ptr<Slot> slot() const { return slot_; }

  static void Complete(const std::shared_ptr<Slot>& slot,
                       absl::StatusOr<Assignment> result) {
    {
      absl::MutexLock lock(&slot->mu);
      if (slot->finished) return;
      slot->finished = true;
    }
    if (result.ok()) *slot->response = *std::move(result);
    slot->reactor->Finish(ToGrpcStatus(result.status()));
  }

  void OnCancel() override {
    Complete(slot_, absl::CancelledError("GetAssignment was cancelled"));
  }

  void OnDone() override { delete this; }

 private:
  std::shared_ptr<Slot> slot_;
};

absl::StatusOr<std::unique_ptr<SchedulerService>> SchedulerService::Create(
    SchedulerCore* core, const SchedulerServiceOptions& options) {
  if (core == nullptr) {
    return absl::InvalidArgumentError("SchedulerService needs a core");
  }
  if (options.tick_interval <= absl::ZeroDuration() ||
      options.deadline_margin < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "tick_interval must be positive and deadline_margin not negative");
  }
  return std::unique_ptr<SchedulerService>(
      new SchedulerService(core, options));
}

SchedulerService::SchedulerService(SchedulerCore* core,
                                   const SchedulerServiceOptions& options)
    : core_(core), options_(options) {
  ticker_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(options_.tick_interval)) {
      core_->Tick();
    }
  });
}

SchedulerService::~SchedulerService() {
  stop_.Notify();
  ticker_.join();
}

grpc::ServerUnaryReactor* SchedulerService::Register(
    grpc::CallbackServerContext* context, const RegisterRequest* request,
    RegisterResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<RegisterResponse> result = core_->Register(*request);
  if (result.ok()) *response = *std::move(result);
  reactor->Finish(ToGrpcStatus(result.status()));
  return reactor;
}

grpc::ServerUnaryReactor* SchedulerService::GetAssignment(
    grpc::CallbackServerContext* context, const GetAssignmentRequest* request,
    Assignment* response) {
  auto* reactor = new AssignmentReactor(response);
  // No client deadline arrives as the far future.
  absl::Time deadline = absl::FromChrono(context->deadline());
  if (deadline > absl::Now() + absl::Hours(24 * 365)) {
    deadline = absl::InfiniteFuture();
  } else {
    deadline -= options_.deadline_margin;
  }
  std::shared_ptr<AssignmentReactor::Slot> slot = reactor->slot();
  core_->GetAssignmentAsync(
      request->node_id(), deadline,
      [slot](absl::StatusOr<Assignment> result) {
        AssignmentReactor::Complete(slot, std::move(result));
      });
  return reactor;
}

grpc::ServerUnaryReactor* SchedulerService::Heartbeat(
    grpc::CallbackServerContext* context, const HeartbeatRequest* request,
    HeartbeatResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<HeartbeatResponse> result = core_->Heartbeat(*request);
  if (result.ok()) *response = *std::move(result);
  reactor->Finish(ToGrpcStatus(result.status()));
  return reactor;
}

grpc::ServerUnaryReactor* SchedulerService::GetStatus(
    grpc::CallbackServerContext* context, const GetStatusRequest* /*request*/,
    JobStatus* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  *response = core_->Status();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace lmps
