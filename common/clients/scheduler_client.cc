#include "common/clients/scheduler_client.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/rpc/status_util.h"

namespace lmps {

void SchedulerClient::set_backoff(absl::Duration initial, absl::Duration max) {
  absl::MutexLock lock(&mu_);
  initial_backoff_ = initial;
  max_backoff_ = std::max(initial, max);
}

void SchedulerClient::set_raw_errors(bool raw) {
  absl::MutexLock lock(&mu_);
  raw_errors_ = raw;
}

bool SchedulerClient::IsRetryable(const absl::Status& status) {
  // UNAVAILABLE: the scheduler is not up yet. RESOURCE_EXHAUSTED: every
  // slot is taken; one frees up when a dead node's lease expires, and this
  // node (a replacement) takes it.
  return status.code() == absl::StatusCode::kUnavailable ||
         status.code() == absl::StatusCode::kDeadlineExceeded ||
         status.code() == absl::StatusCode::kResourceExhausted;
}

void SchedulerClient::Cancel() {
  absl::MutexLock lock(&mu_);
  cancelled_ = true;
  for (grpc::ClientContext* context : active_) context->TryCancel();
}

bool SchedulerClient::cancelled() const {
  absl::MutexLock lock(&mu_);
  return cancelled_;
}

absl::Status SchedulerClient::CancelledStatus() const {
  return absl::CancelledError(
      absl::StrCat("calls to the scheduler at ", address_, " were cancelled"));
}

absl::Status SchedulerClient::Call(
    absl::Duration timeout, bool cancellable,
    const std::function<grpc::Status(grpc::ClientContext*)>& rpc) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  if (cancellable) {
    absl::MutexLock lock(&mu_);
    if (cancelled_) return CancelledStatus();
    active_.insert(&context);
  }
  const grpc::Status status = rpc(&context);
  if (cancellable) {
    absl::MutexLock lock(&mu_);
    active_.erase(&context);
  }
  return FromGrpcStatus(status);
}

bool SchedulerClient::WaitUnlessCancelled(absl::Duration d) const {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&cancelled_), d);
  return cancelled_;
}

absl::StatusOr<RegisterResponse> SchedulerClient::Register(
    const RegisterRequest& request, absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  absl::Duration delay;
  absl::Duration max_delay;
  bool raw;
  {
    absl::MutexLock lock(&mu_);
    delay = initial_backoff_;
    max_delay = max_backoff_;
    raw = raw_errors_;
  }
  absl::Status last;
  // The scheduler's last answer. An attempt that ran out of time (the last
  // one is cut short by `give_up`) is not an answer: retries running out
  // report what the scheduler said before it, where it said anything.
  absl::Status answer;
  while (true) {
    RegisterResponse resp;
    last = Call(std::min(give_up - absl::Now(), absl::Seconds(5)),
                /*cancellable=*/true, [&](grpc::ClientContext* ctx) {
                  return stub_->Register(ctx, request, &resp);
                });
    if (last.ok()) {
      absl::MutexLock lock(&mu_);
      node_id_ = resp.node_id();
      incarnation_ = resp.incarnation();
      backup_slot_ = resp.backup_slot();
      if (resp.lease_ms() > 0) lease_ = absl::Milliseconds(resp.lease_ms());
      return resp;
    }
    if (cancelled()) return CancelledStatus();
    if (!IsRetryable(last)) break;
    if (last.code() != absl::StatusCode::kDeadlineExceeded) answer = last;
    if (!answer.ok()) last = answer;
    const absl::Duration sleep = std::min(delay, give_up - absl::Now());
    if (sleep <= absl::ZeroDuration() || WaitUnlessCancelled(sleep) ||
        absl::Now() >= give_up) {
      if (cancelled()) return CancelledStatus();
      if (raw) return last;
      if (last.code() == absl::StatusCode::kResourceExhausted) {
        return WithMessage(
            last,
            absl::StrCat("scheduler at ", address_, " had no free slot for ",
                         absl::FormatDuration(timeout), ": ", last.message()));
      }
      return absl::UnavailableError(
          absl::StrCat("scheduler at ", address_, " unreachable after ",
                       absl::FormatDuration(timeout), ": ", last.message()));
    }
    delay = std::min(delay * 2, max_delay);
  }
  if (raw) return last;
  return WithMessage(last, absl::StrCat("registering with scheduler ", address_,
                                        ": ", last.message()));
}

absl::StatusOr<Assignment> SchedulerClient::WaitForAssignment(
    absl::Duration timeout) {
  const absl::Time give_up = absl::Now() + timeout;
  absl::Duration delay;
  absl::Duration max_delay;
  bool raw;
  {
    absl::MutexLock lock(&mu_);
    delay = initial_backoff_;
    max_delay = max_backoff_;
    raw = raw_errors_;
  }
  GetAssignmentRequest req;
  req.set_node_id(node_id());
  Assignment assignment;
  absl::Status s;
  while (true) {
    s = Call(give_up - absl::Now(), /*cancellable=*/true,
             [&](grpc::ClientContext* ctx) {
               return stub_->GetAssignment(ctx, req, &assignment);
             });
    if (s.ok()) return assignment;
    if (cancelled()) return CancelledStatus();
    if (s.code() != absl::StatusCode::kUnavailable) break;
    const absl::Duration sleep = std::min(delay, give_up - absl::Now());
    if (sleep <= absl::ZeroDuration() || WaitUnlessCancelled(sleep) ||
        absl::Now() >= give_up) {
      if (cancelled()) return CancelledStatus();
      break;
    }
    delay = std::min(delay * 2, max_delay);
  }
  if (raw) return s;
  return WithMessage(s, absl::StrCat("waiting for assignment from ", address_,
                                     ": ", s.message()));
}

void SchedulerClient::EnableRejoin(RegisterRequest request,
                                   RejoinOptions options) {
  request.set_rejoin(true);
  absl::MutexLock lock(&mu_);
  rejoin_ = std::move(request);
  rejoin_options_ = std::move(options);
  rejoin_enabled_ = true;
}

absl::StatusOr<HeartbeatResponse> SchedulerClient::Heartbeat(
    HeartbeatRequest request, absl::Duration timeout) {
  HeartbeatResponse resp;
  absl::Status s;
  bool raw = false;
  for (int attempt = 0; attempt < 2; ++attempt) {
    {
      absl::MutexLock lock(&mu_);
      request.set_node_id(node_id_);
      request.set_incarnation(incarnation_);
    }
    resp.Clear();
    s = Call(timeout, /*cancellable=*/true, [&](grpc::ClientContext* ctx) {
      return stub_->Heartbeat(ctx, request, &resp);
    });
    RegisterRequest rejoin;
    RejoinOptions options;
    {
      absl::MutexLock lock(&mu_);
      raw = raw_errors_;
      if (s.code() != absl::StatusCode::kNotFound || !rejoin_enabled_ ||
          attempt > 0) {
        break;
      }
      rejoin = rejoin_;
      options = rejoin_options_;
    }
    rejoin.set_step(request.step());
    if (options.fill) options.fill(&rejoin);
    const absl::StatusOr<RegisterResponse> r = Register(
        rejoin,
        options.timeout > absl::ZeroDuration() ? options.timeout : timeout);
    if (options.done) options.done(rejoin, r);
    if (!r.ok()) {
      s = raw ? r.status()
              : WithMessage(
                    r.status(),
                    absl::StrCat("rejoining after a scheduler restart: ",
                                 r.status().message()));
      break;
    }
  }
  if (!s.ok()) {
    if (raw) return s;
    return WithMessage(s, absl::StrCat("heartbeat to scheduler ", address_,
                                       ": ", s.message()));
  }
  return resp;
}

absl::Status SchedulerClient::ReportError(absl::string_view error,
                                          absl::Duration timeout) {
  HeartbeatRequest request;
  {
    absl::MutexLock lock(&mu_);
    if (node_id_.empty()) {
      return absl::FailedPreconditionError(
          "not registered: no error report to send");
    }
    request.set_node_id(node_id_);
    request.set_incarnation(incarnation_);
  }
  request.set_error(std::string(error));
  HeartbeatResponse resp;
  return Call(timeout, /*cancellable=*/false, [&](grpc::ClientContext* ctx) {
    return stub_->Heartbeat(ctx, request, &resp);
  });
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
