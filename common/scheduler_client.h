// A node's side of the scheduler: registration (retried while the scheduler
// is not up yet, up to a timeout that names the scheduler's address), the
// wait for the assignment, and a heartbeat loop on its own thread. The stub's
// channel carries the node's transport security (MakeChannel with the
// node's Security, common/grpc_server.h).
//
// Thread-safety: Register/WaitForAssignment from one thread before the
// heartbeat loop starts; Heartbeat() is thread-safe (gRPC stubs are).
#ifndef LMPS_COMMON_SCHEDULER_CLIENT_H_
#define LMPS_COMMON_SCHEDULER_CLIENT_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "proto/lmps.grpc.pb.h"

namespace lmps {

class SchedulerClient {
 public:
  SchedulerClient(std::unique_ptr<Scheduler::StubInterface> stub,
                  std::string address)
      : stub_(std::move(stub)), address_(std::move(address)) {}

  // Registers, retrying UNAVAILABLE (scheduler not up yet) and
  // RESOURCE_EXHAUSTED (no free slot until a dead node's lease expires)
  // until `timeout`; then fails with an error naming the scheduler. Other
  // errors, e.g. UNAUTHENTICATED for a missing or wrong token
  // (common/security.h), fail at once.
  absl::StatusOr<RegisterResponse> Register(const RegisterRequest& request,
                                            absl::Duration timeout);
  // Waits for this node's assignment (the job must assemble in `timeout`).
  absl::StatusOr<Assignment> WaitForAssignment(absl::Duration timeout);
  // One heartbeat; `request.node_id` and `incarnation` are filled in (a
  // replaced registration is answered `fenced`). After EnableRejoin, a
  // NOT_FOUND answer (the scheduler restarted and does not know this node)
  // makes it register again with that request and repeat the heartbeat.
  absl::StatusOr<HeartbeatResponse> Heartbeat(HeartbeatRequest request,
                                              absl::Duration timeout);
  // `request`: this node's registration with rejoin = true and
  // requested_rank = its assigned rank (the heartbeat's step is filled in).
  void EnableRejoin(RegisterRequest request);

  std::string node_id() const {
    absl::MutexLock lock(&mu_);
    return node_id_;
  }
  const std::string& address() const { return address_; }
  absl::Duration lease() const { return lease_; }

 private:
  std::unique_ptr<Scheduler::StubInterface> stub_;
  std::string address_;
  mutable absl::Mutex mu_;
  std::string node_id_ ABSL_GUARDED_BY(mu_);
  // RegisterResponse.incarnation, sent with every heartbeat.
  int64_t incarnation_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Duration lease_ = absl::Seconds(10);
  bool rejoin_enabled_ ABSL_GUARDED_BY(mu_) = false;
  RegisterRequest rejoin_ ABSL_GUARDED_BY(mu_);
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

#endif  // LMPS_COMMON_SCHEDULER_CLIENT_H_
