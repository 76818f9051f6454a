#include "common/scheduler_client.h"

#include "absl/strings/str_cat.h"
#include "common/status_util.h"

namespace lmps {

absl::StatusOr<RegisterResponse> SchedulerClient::Register(
    const RegisterRequest& request, absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  absl::Status last;
  while (true) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(
        std::min(give_up, absl::Now() + absl::Seconds(5))));
    RegisterResponse resp;
    last = FromGrpcStatus(stub_->Register(&ctx, request, &resp));
    if (last.ok()) {
      absl::MutexLock lock(&mu_);
      node_id_ = resp.node_id();
      incarnation_ = resp.incarnation();
      if (resp.lease_ms() > 0) lease_ = absl::Milliseconds(resp.lease_ms());
      return resp;
    }
    // UNAVAILABLE: the scheduler is not up yet. RESOURCE_EXHAUSTED: every
    // slot is taken; one frees up when a dead node's lease expires, and this
    // node (a replacement) takes it.
    const bool retry = last.code() == absl::StatusCode::kUnavailable ||
                       last.code() == absl::StatusCode::kDeadlineExceeded ||
                       last.code() == absl::StatusCode::kResourceExhausted;
    if (!retry) break;
    if (absl::Now() + absl::Milliseconds(200) >= give_up) {
      if (last.code() == absl::StatusCode::kResourceExhausted) {
        return WithMessage(last, absl::StrCat(
            "scheduler at ", address_, " had no free slot for ",
            absl::FormatDuration(timeout), ": ", last.message()));
      }
      return absl::UnavailableError(absl::StrCat(
          "scheduler at ", address_, " unreachable after ",
          absl::FormatDuration(timeout), ": ", last.message()));
    }
    absl::SleepFor(absl::Milliseconds(200));
  }
  return WithMessage(last, absl::StrCat("registering with scheduler ",
                                        address_, ": ", last.message()));
}

absl::StatusOr<Assignment> SchedulerClient::WaitForAssignment(
    absl::Duration timeout) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  GetAssignmentRequest req;
  req.set_node_id(node_id());
  Assignment assignment;
  absl::Status s = FromGrpcStatus(stub_->GetAssignment(&ctx, req, &assignment));
  if (!s.ok()) {
    return WithMessage(s, absl::StrCat("waiting for assignment from ",
                                       address_, ": ", s.message()));
  }
  return assignment;
}

void SchedulerClient::EnableRejoin(RegisterRequest request) {
  request.set_rejoin(true);
  absl::MutexLock lock(&mu_);
  rejoin_ = std::move(request);
  rejoin_enabled_ = true;
}

absl::StatusOr<HeartbeatResponse> SchedulerClient::Heartbeat(
    HeartbeatRequest request, absl::Duration timeout) {
  HeartbeatResponse resp;
  absl::Status s;
  for (int attempt = 0; attempt < 2; ++attempt) {
    {
      absl::MutexLock lock(&mu_);
      request.set_node_id(node_id_);
      request.set_incarnation(incarnation_);
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    s = FromGrpcStatus(stub_->Heartbeat(&ctx, request, &resp));
    RegisterRequest rejoin;
    {
      absl::MutexLock lock(&mu_);
      if (s.code() != absl::StatusCode::kNotFound || !rejoin_enabled_ ||
          attempt > 0) {
        break;
      }
      rejoin = rejoin_;
    }
    rejoin.set_step(request.step());
    absl::StatusOr<RegisterResponse> r = Register(rejoin, timeout);
    if (!r.ok()) {
      s = WithMessage(r.status(),
                      absl::StrCat("rejoining after a scheduler restart: ",
                                   r.status().message()));
      break;
    }
  }
  if (!s.ok()) {
    return WithMessage(s, absl::StrCat("heartbeat to scheduler ",
                                       address_, ": ", s.message()));
  }
  return resp;
}

HeartbeatLoop::HeartbeatLoop(
    SchedulerClient* client, absl::Duration period,
    std::function<HeartbeatRequest()> make_request,
    std::function<void(const absl::StatusOr<HeartbeatResponse>&)> on_response)
    : client_(client),
      period_(period),
      make_request_(std::move(make_request)),
      on_response_(std::move(on_response)) {
  thread_ = std::thread([this] {
    while (!stop_.WaitForNotificationWithTimeout(period_)) {
      on_response_(client_->Heartbeat(make_request_(), period_));
    }
  });
}

absl::StatusOr<HeartbeatResponse> HeartbeatLoop::BeatNow() {
  return client_->Heartbeat(make_request_(), absl::Seconds(10));
}

void HeartbeatLoop::Stop() {
  if (!stop_.HasBeenNotified()) stop_.Notify();
  if (thread_.joinable()) thread_.join();
}

HeartbeatLoop::~HeartbeatLoop() { Stop(); }

}  // namespace lmps
