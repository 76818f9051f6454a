// CommScheduler: ByteScheduler-style (SOSP'19) priority scheduling of a
// worker's parameter-server transfers with credits.
//
// A transfer is one blocking RPC stream (a layer group's pull from one
// shard: worker/layerwise_pull.h) submitted with
//   - a priority: lower goes first; the layer order of what it carries
//     (embeddings 0, block l l + 1, ln_f last), so the first layers' data
//     is never queued behind the last layers';
//   - its payload bytes;
//   - a lane (the shard it talks to), with at most `max_per_lane` transfers
//     of a lane in flight.
// Credits: at most `credit_bytes` of payload in flight. Dispatch looks at
// the queued transfers in priority order (ties: submission order): one
// whose lane is full is passed over (it does not hold up other lanes); the
// first other one starts if its bytes fit in the credit left, or if nothing
// is in flight (so a transfer larger than the credit still goes, alone);
// if it does not fit, nothing behind it starts (strict priority: a later
// layer never takes the credit a queued earlier layer is waiting for).
// Transfers run on a pool of `threads` threads (so at most that many are in
// flight).
//
// Thread-safety: thread-safe. The destructor runs the transfers still
// queued and waits for every transfer to finish (a caller that wants them
// dropped makes its functions return at once).
#ifndef LMPS_WORKER_COMM_SCHEDULER_H_
#define LMPS_WORKER_COMM_SCHEDULER_H_

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace lmps {

struct CommSchedulerOptions {
  int64_t credit_bytes = 4 << 20;  // > 0
  int max_per_lane = 2;            // >= 1
  int threads = 4;                 // >= 1
};

// The dispatch rule above as a pure function: `queued` lists the queued
// transfers' (bytes, lane) in priority order; `lane_busy(lane)` is how many
// of a lane are in flight. Returns the index of the transfer to start now,
// or -1.
struct QueuedTransfer {
  int64_t bytes = 0;
  int lane = 0;
};
int NextTransfer(const std::vector<QueuedTransfer>& queued,
                 int64_t in_flight_bytes, int in_flight,
                 const std::function<int(int lane)>& lane_busy,
                 const CommSchedulerOptions& options);

class CommScheduler {
 public:
  // Options are clamped to their minimums.
  explicit CommScheduler(CommSchedulerOptions options);
  CommScheduler(const CommScheduler&) = delete;
  CommScheduler& operator=(const CommScheduler&) = delete;
  ~CommScheduler();

  // Queues `run` (called on a pool thread; it should not throw).
  void Submit(int priority, int64_t bytes, int lane, std::function<void()> run);

  // Waits until nothing is queued or in flight.
  void WaitIdle();

  // Highest payload bytes in flight at once so far (for tests).
  int64_t max_bytes_in_flight() const;

 private:
  struct Transfer {
    int priority;
    uint64_t seq;
    int64_t bytes;
    int lane;
    std::function<void()> run;
  };
  void Loop();
  // The transfer to start now, or queue_.end().
  std::list<Transfer>::iterator NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool CanStartLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CommSchedulerOptions options_;
  mutable absl::Mutex mu_;
  std::list<Transfer> queue_ ABSL_GUARDED_BY(mu_);  // by (priority, seq)
  uint64_t next_seq_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t in_flight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int, int> lane_busy_ ABSL_GUARDED_BY(mu_);
  int64_t max_in_flight_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_COMM_SCHEDULER_H_
