// A node's side of the scheduler, the one client every node uses (workers,
// parameter-server shards, the benchmark): registration (retried while the
// scheduler is not up yet or has no free slot, up to a timeout that names
// the scheduler's address), the wait for the assignment, heartbeats with a
// rejoin when the scheduler restarted, the report of a node's error, and a
// heartbeat loop on its own thread. The stub's channel carries the node's
// transport security (MakeChannel with the node's Security,
// common/rpc/grpc_server.h).
//
// Errors are absl::Status converted from the scheduler's answers with
// FromGrpcStatus (common/rpc/status_util.h), so a structured reason such as
// JOB_FINISHED or ELASTIC_SURPLUS survives: act on ReasonOf(status), never
// on the message. By default the messages say which call to which scheduler
// failed; with set_raw_errors(true) they are the scheduler's answers as they
// came, for a caller that words its own errors.
//
// Cancel() ends the call in flight and every wait between retries, and
// makes later calls fail CANCELLED at once (a daemon stopping on SIGTERM);
// ReportError is still sent.
//
// Thread-safety: every method is thread-safe (the client's state is under
// its mutex; gRPC stubs are thread-safe). The intended use: the setters,
// Register, WaitForAssignment and EnableRejoin on one thread before the
// heartbeats start; Heartbeat on one thread at a time (a rejoin registers
// again); Cancel() from any thread, e.g. a signal handler's. The rejoin
// hooks run on the thread that calls Heartbeat, without the client's lock
// held (they may call its accessors).
#ifndef LMPS_COMMON_CLIENTS_SCHEDULER_CLIENT_H_
#define LMPS_COMMON_CLIENTS_SCHEDULER_CLIENT_H_

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "proto/lmps.grpc.pb.h"

namespace lmps {

// How Heartbeat rejoins a restarted scheduler (SchedulerClient::EnableRejoin).
struct RejoinOptions {
  // Called before each rejoin with the request about to be sent (the one
  // given to EnableRejoin, its step the heartbeat's) to fill in what it
  // carries at that time, e.g. a shard's epoch and role. May be empty.
  std::function<void(RegisterRequest*)> fill;
  // Called after each rejoin with the request sent and the scheduler's
  // answer (success or error). May be empty.
  std::function<void(const RegisterRequest&,
                     const absl::StatusOr<RegisterResponse>&)>
      done;
  // How long one rejoin may take, retries included; zero: the heartbeat's
  // timeout.
  absl::Duration timeout = absl::ZeroDuration();
};

class SchedulerClient {
 public:
  SchedulerClient(std::unique_ptr<Scheduler::StubInterface> stub,
                  std::string address)
      : stub_(std::move(stub)), address_(std::move(address)) {}

  // Register's waits between attempts: `initial`, doubling up to `max`
  // (default: 200 ms each time).
  void set_backoff(absl::Duration initial, absl::Duration max);
  // true: errors are the scheduler's answers as they came (code, message,
  // reason), without the client's words; Register's retries running out
  // return the last answer (its code one that IsRetryable accepts; an
  // attempt that timed out counts only when no attempt got an answer).
  void set_raw_errors(bool raw);

  // Registers, retrying UNAVAILABLE (scheduler not up yet), an attempt
  // timing out and RESOURCE_EXHAUSTED (no free slot until a dead node's
  // lease expires) until `timeout`; then fails with an error naming the
  // scheduler. Other errors, e.g. UNAUTHENTICATED for a missing or wrong
  // token (common/rpc/security.h) or JOB_FINISHED (ReasonOf), fail at once. An
  // attempt waits at most 5 s. On success node_id(), lease() and
  // backup_slot() are the response's.
  absl::StatusOr<RegisterResponse> Register(const RegisterRequest& request,
                                            absl::Duration timeout);
  // Waits for this node's assignment (the job must assemble in `timeout`),
  // retrying UNAVAILABLE (the scheduler restarting) as Register does.
  absl::StatusOr<Assignment> WaitForAssignment(absl::Duration timeout);
  // One heartbeat; `request.node_id` and `incarnation` are filled in (a
  // replaced registration is answered `fenced`). After EnableRejoin, a
  // NOT_FOUND answer (the scheduler restarted and does not know this node)
  // makes it register again (rejoin) and repeat the heartbeat; a failed
  // rejoin's error is returned.
  absl::StatusOr<HeartbeatResponse> Heartbeat(HeartbeatRequest request,
                                              absl::Duration timeout);
  // `request`: this node's registration with requested_rank = its assigned
  // rank (rejoin is set; the heartbeat's step is filled in, then
  // `options.fill` runs).
  void EnableRejoin(RegisterRequest request, RejoinOptions options = {});
  // Tells the scheduler that this node failed with `error` (a heartbeat
  // carrying only HeartbeatRequest.error, node id and incarnation): one
  // try, no rejoin, sent even after Cancel(). FailedPrecondition without
  // sending anything before a registration.
  absl::Status ReportError(absl::string_view error, absl::Duration timeout);

  // Cancels the call in flight and ends Register's and WaitForAssignment's
  // waits; every later call (but ReportError) fails CANCELLED without
  // reaching the scheduler. Idempotent.
  void Cancel();
  bool cancelled() const;

  // The codes Register retries (see Register).
  static bool IsRetryable(const absl::Status& status);

  std::string node_id() const {
    absl::MutexLock lock(&mu_);
    return node_id_;
  }
  const std::string& address() const { return address_; }
  absl::Duration lease() const {
    absl::MutexLock lock(&mu_);
    return lease_;
  }
  // RegisterResponse.backup_slot of the latest registration: this node
  // holds a shard's backup slot.
  bool backup_slot() const {
    absl::MutexLock lock(&mu_);
    return backup_slot_;
  }

 private:
  // Runs one RPC with a deadline `timeout` from now; unless `cancellable`
  // is false, Cancel() cancels it and after Cancel() it is not sent.
  absl::Status Call(
      absl::Duration timeout, bool cancellable,
      const std::function<grpc::Status(grpc::ClientContext*)>& rpc);
  // Sleeps `d`, or less when cancelled; returns true if cancelled.
  bool WaitUnlessCancelled(absl::Duration d) const;
  absl::Status CancelledStatus() const;

  std::unique_ptr<Scheduler::StubInterface> stub_;
  const std::string address_;
  mutable absl::Mutex mu_;
  std::string node_id_ ABSL_GUARDED_BY(mu_);
  // RegisterResponse.incarnation, sent with every heartbeat.
  int64_t incarnation_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Duration lease_ ABSL_GUARDED_BY(mu_) = absl::Seconds(10);
  bool backup_slot_ ABSL_GUARDED_BY(mu_) = false;
  absl::Duration initial_backoff_ ABSL_GUARDED_BY(mu_) =
      absl::Milliseconds(200);
  absl::Duration max_backoff_ ABSL_GUARDED_BY(mu_) = absl::Milliseconds(200);
  bool raw_errors_ ABSL_GUARDED_BY(mu_) = false;
  bool rejoin_enabled_ ABSL_GUARDED_BY(mu_) = false;
  RegisterRequest rejoin_ ABSL_GUARDED_BY(mu_);
  RejoinOptions rejoin_options_ ABSL_GUARDED_BY(mu_);
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  // The cancellable calls in flight (Cancel() cancels them).
  std::set<grpc::ClientContext*> active_ ABSL_GUARDED_BY(mu_);
};

// Sends `make_request()` to the scheduler every `period` on its own thread
// and hands every response (or error) to `on_response`. Stops on Stop() or
// destruction. The callbacks run on the loop's thread.
class HeartbeatLoop {
 public:
  HeartbeatLoop(SchedulerClient* client, absl::Duration period,
                std::function<HeartbeatRequest()> make_request,
                std::function<void(const absl::StatusOr<HeartbeatResponse>&)>
                    on_response);
  ~HeartbeatLoop();
  // Sends one heartbeat now (on the caller's thread) and returns its result.
  absl::StatusOr<HeartbeatResponse> BeatNow();
  void Stop();

 private:
  SchedulerClient* client_;
  absl::Duration period_;
  std::function<HeartbeatRequest()> make_request_;
  std::function<void(const absl::StatusOr<HeartbeatResponse>&)> on_response_;
  absl::Notification stop_;
  std::thread thread_;
};

}  // namespace lmps

#endif  // LMPS_COMMON_CLIENTS_SCHEDULER_CLIENT_H_
