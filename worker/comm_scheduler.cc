#include "worker/comm_scheduler.h"

#include <algorithm>
#include <iterator>
#include <utility>

namespace lmps {

CommScheduler::CommScheduler(CommSchedulerOptions options)
    : options_{std::max<int64_t>(1, options.credit_bytes),
               std::max(1, options.max_per_lane), std::max(1, options.threads)} {
  for (int i = 0; i < options_.threads; ++i) {
    threads_.emplace_back([this] { Loop(); });
  }
}

CommScheduler::~CommScheduler() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void CommScheduler::Submit(int priority, int64_t bytes, int lane,
                           std::function<void()> run) {
  absl::MutexLock lock(&mu_);
  Transfer t{priority, next_seq_++, std::max<int64_t>(0, bytes), lane,
             std::move(run)};
  auto at = std::find_if(queue_.begin(), queue_.end(), [&](const Transfer& q) {
    return q.priority > t.priority;
  });
  queue_.insert(at, std::move(t));
}

void CommScheduler::WaitIdle() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](CommScheduler* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
        return s->queue_.empty() && s->in_flight_ == 0;
      },
      this));
}

int64_t CommScheduler::max_bytes_in_flight() const {
  absl::MutexLock lock(&mu_);
  return max_in_flight_bytes_;
}

int NextTransfer(const std::vector<QueuedTransfer>& queued,
                 int64_t in_flight_bytes, int in_flight,
                 const std::function<int(int lane)>& lane_busy,
                 const CommSchedulerOptions& options) {
  for (size_t i = 0; i < queued.size(); ++i) {
    if (lane_busy(queued[i].lane) >= options.max_per_lane) {
      continue;  // its lane is full: others may go
    }
    if (in_flight == 0 ||
        in_flight_bytes + queued[i].bytes <= options.credit_bytes) {
      return static_cast<int>(i);
    }
    return -1;  // strict priority: nothing overtakes it
  }
  return -1;
}

std::list<CommScheduler::Transfer>::iterator CommScheduler::NextLocked() {
  std::vector<QueuedTransfer> queued;
  queued.reserve(queue_.size());
  for (const Transfer& t : queue_) queued.push_back({t.bytes, t.lane});
  const int next = NextTransfer(
      queued, in_flight_bytes_, in_flight_,
      [this](int lane) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        auto it = lane_busy_.find(lane);
        return it == lane_busy_.end() ? 0 : it->second;
      },
      options_);
  if (next < 0) return queue_.end();
  return std::next(queue_.begin(), next);
}

bool CommScheduler::CanStartLocked() {
  return NextLocked() != queue_.end() || (stopping_ && queue_.empty());
}

void CommScheduler::Loop() {
  while (true) {
    Transfer t;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](CommScheduler* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
            return s->CanStartLocked();
          },
          this));
      auto it = NextLocked();
      if (it == queue_.end()) return;  // stopping, nothing queued
      t = std::move(*it);
      queue_.erase(it);
      in_flight_bytes_ += t.bytes;
      ++in_flight_;
      ++lane_busy_[t.lane];
      max_in_flight_bytes_ = std::max(max_in_flight_bytes_, in_flight_bytes_);
    }
    t.run();
    absl::MutexLock lock(&mu_);
    in_flight_bytes_ -= t.bytes;
    --in_flight_;
    if (--lane_busy_[t.lane] == 0) lane_busy_.erase(t.lane);
  }
}

}  // namespace lmps
