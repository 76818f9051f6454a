// FakeScheduler: a scriptable Scheduler service for the daemons' in-process
// tests (server/daemon_test, worker/worker_daemon_test). Tests set its
// fields under mu_ and read what it recorded.
//
//   Register       answers register_answers_ in turn (the last repeats; OK
//                  registers as node_id_ with a 300 ms lease), a rejoin with
//                  refuse_rejoin_ when that is not OK; clears forgotten_.
//   GetAssignment  answers assignment_ with the caller's node id.
//   Heartbeat      records the request; NOT_FOUND while forgotten_ (as after
//                  a scheduler restart), else heartbeat_state_ and message_.
//   GetStatus      answers status_state_ and message_.
//
// Thread-safety: every field is under mu_; the gRPC threads and the test
// share it.
#ifndef LMPS_TESTS_TESTING_FAKE_SCHEDULER_H_
#define LMPS_TESTS_TESTING_FAKE_SCHEDULER_H_

#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/rpc/status_util.h"
#include "proto/lmps.grpc.pb.h"

namespace lmps {
namespace testing {

class FakeScheduler final : public Scheduler::Service {
 public:
  explicit FakeScheduler(std::string node_id) : node_id_(std::move(node_id)) {}

  grpc::Status Register(grpc::ServerContext*, const RegisterRequest* req,
                        RegisterResponse* resp) override {
    absl::MutexLock lock(&mu_);
    ++registers_;
    registered_ = *req;
    if (req->rejoin() && !refuse_rejoin_.ok()) {
      return ToGrpcStatus(refuse_rejoin_);
    }
    const absl::Status answer = register_answers_.front();
    if (register_answers_.size() > 1) register_answers_.pop_front();
    if (!answer.ok()) return ToGrpcStatus(answer);
    forgotten_ = false;
    resp->set_node_id(node_id_);
    resp->set_lease_ms(300);
    return grpc::Status::OK;
  }

  grpc::Status GetAssignment(grpc::ServerContext*,
                             const GetAssignmentRequest* req,
                             Assignment* resp) override {
    absl::MutexLock lock(&mu_);
    *resp = assignment_;
    resp->set_node_id(req->node_id());
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const HeartbeatRequest* req,
                         HeartbeatResponse* resp) override {
    absl::MutexLock lock(&mu_);
    heartbeats_.push_back(*req);
    if (forgotten_) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown node id");
    }
    resp->set_state(heartbeat_state_);
    resp->set_message(message_);
    return grpc::Status::OK;
  }

  grpc::Status GetStatus(grpc::ServerContext*, const GetStatusRequest*,
                         JobStatus* resp) override {
    absl::MutexLock lock(&mu_);
    ++get_status_;
    resp->set_state(status_state_);
    resp->set_message(message_);
    return grpc::Status::OK;
  }

  // Waits up to `timeout` for a recorded heartbeat that satisfies `pred`.
  bool AwaitHeartbeat(std::function<bool(const HeartbeatRequest&)> pred,
                      absl::Duration timeout = absl::Seconds(30)) {
    absl::MutexLock lock(&mu_);
    auto seen = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (const HeartbeatRequest& hb : heartbeats_) {
        if (pred(hb)) return true;
      }
      return false;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&seen), timeout);
  }

  absl::Mutex mu_;
  const std::string node_id_;
  std::deque<absl::Status> register_answers_ ABSL_GUARDED_BY(mu_) = {
      absl::OkStatus()};
  absl::Status refuse_rejoin_ ABSL_GUARDED_BY(mu_);  // OK: accepted
  int registers_ ABSL_GUARDED_BY(mu_) = 0;
  RegisterRequest registered_ ABSL_GUARDED_BY(mu_);
  Assignment assignment_ ABSL_GUARDED_BY(mu_);
  JobState status_state_ ABSL_GUARDED_BY(mu_) = ASSEMBLING;
  JobState heartbeat_state_ ABSL_GUARDED_BY(mu_) = RUNNING;
  std::string message_ ABSL_GUARDED_BY(mu_);
  std::vector<HeartbeatRequest> heartbeats_ ABSL_GUARDED_BY(mu_);
  int get_status_ ABSL_GUARDED_BY(mu_) = 0;
  // As after a restart: heartbeats are answered NOT_FOUND until a Register.
  bool forgotten_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace testing
}  // namespace lmps

#endif  // LMPS_TESTS_TESTING_FAKE_SCHEDULER_H_
