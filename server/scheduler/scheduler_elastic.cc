// SchedulerCore: elastic data parallelism and pipeline regroups (the rules
// are in scheduler_core.h, "Elastic data parallelism" and "Regroup"). While
// the job runs, ElasticLocked decides on a new dp (surplus workers, workers
// dead past the grace) or a regroup and PlanResizeLocked makes the
// ResizePlan the controller takes (TakeResizePlan, then ResizeStopped or
// ResizeFailed); once every live worker stopped at the boundary,
// ReassembleLocked starts a new assembly with the resized spec.
#include "server/scheduler/scheduler_core.h"

#include <algorithm>
#include <iterator>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/model/job_spec.h"
#include "server/scheduler/scheduler_core_internal.h"

namespace lmps {

using scheduler_internal::Seconds;

void SchedulerCore::ElasticLocked(absl::Time now, Outbox* out) {
  const ElasticOptions& e = options_.elastic;
  const bool elastic = e.max_dp > 0;
  if ((!elastic && regroup_why_.empty()) || state_ != RUNNING) return;
  if (resize_phase_ == ResizePhase::kStopping) {
    for (const Node& w : workers_) {
      if (w.registered && w.alive && !w.stopped_for_resize) return;
    }
    ReassembleLocked(now, out);
    return;
  }
  if (resize_phase_ != ResizePhase::kNone || now < resize_retry_after_) return;
  for (auto it = surplus_.begin(); it != surplus_.end();) {
    it = now - it->second > absl::Seconds(5) ? surplus_.erase(it) : std::next(it);
  }
  const LayoutConfig& l = spec_.layout();
  const int group = l.pp() * l.tp();
  int live = 0, dead = 0;
  for (const Node& w : workers_) {
    if (w.done) return;  // the job is ending
    if (w.registered && w.alive) {
      ++live;
    } else if (w.registered && now - w.down_since > e.grace) {
      ++dead;
    }
  }
  int target = l.dp();
  std::string why;
  if (elastic && dead > 0) {
    target = live / group;
    why = absl::StrCat(dead, " worker(s) dead for over ", Seconds(e.grace),
                       " with no replacement");
  } else if (elastic && static_cast<int>(surplus_.size()) >= group &&
             l.dp() < e.max_dp) {
    target = std::min(e.max_dp,
                      l.dp() + static_cast<int>(surplus_.size()) / group);
    why = absl::StrCat(surplus_.size(), " more worker(s) asking to join");
  }
  bool regroup = false;
  if (target == l.dp() || target < std::max(1, e.min_dp) ||
      target > e.max_dp) {
    // No resize. A lost pipeline worker still needs a regroup: at once
    // without elasticity, else once a replacement holds every slot.
    const bool all_alive = live == static_cast<int>(workers_.size());
    if (regroup_why_.empty() || (elastic && !all_alive)) return;
    target = l.dp();
    regroup = true;
  }
  // A dead worker (or, regrouping, a lost one) holds the others back at
  // the shards' version.
  PlanResizeLocked(target, why, regroup, /*held_back=*/dead > 0 || regroup,
                   now, out);
}

void SchedulerCore::PlanResizeLocked(int target, const std::string& why,
                                     bool regroup, bool held_back,
                                     absl::Time now, Outbox* out) {
  const ElasticOptions& e = options_.elastic;
  const LayoutConfig& l = spec_.layout();
  JobSpec next = spec_;
  next.mutable_layout()->set_dp(target);
  if (e.rescale_batch) {
    next.mutable_train()->set_batch_size(spec_.train().batch_size() / l.dp() *
                                         target);
  }
  if (absl::Status valid = ValidateJobSpec(next); !valid.ok()) {
    const std::string event = absl::StrCat(
        "elastic: cannot resize dp ", l.dp(), " -> ", target, " (", why,
        "): ", valid.message());
    out->logs.push_back(event);
    AddEventLocked(nullptr, event, "the job goes on; tried again in 30s");
    resize_retry_after_ = now + absl::Seconds(30);
    return;
  }
  int64_t max_step = 0;
  resize_plan_ = ResizePlan();
  for (int k = 0; k < num_shards_; ++k) {
    const Node& p = servers_[primary_[k]];
    resize_plan_.shard_addresses.push_back(p.address);
    max_step = std::max(max_step, p.step);
  }
  resize_plan_.from_dp = l.dp();
  resize_plan_.to_dp = target;
  // Held back: stop at the shards' version. Otherwise two steps ahead, so
  // that no worker has pulled the boundary yet.
  resize_plan_.first_step =
      std::max<int64_t>(1, held_back ? max_step : max_step + 2);
  resize_plan_.ahead = held_back ? 0 : 2;
  resize_spec_ = std::move(next);
  resize_why_ =
      regroup ? absl::StrCat("regroup (dp ", l.dp(), "): ", regroup_why_)
              : absl::StrCat("elastic resize dp ", l.dp(), " -> ", target,
                             ": ", why);
  resize_phase_ = ResizePhase::kPlanned;
  const std::string event =
      regroup ? resize_why_
              : absl::StrCat(resize_why_, "; global batch ",
                             spec_.train().batch_size(), " -> ",
                             resize_spec_.train().batch_size());
  out->logs.push_back(absl::StrCat(event, "; stopping every shard at a step "
                                          "boundary >= ",
                                   resize_plan_.first_step));
  AddEventLocked(nullptr, event,
                 absl::StrCat("the shards stop at a step boundary >= ",
                              resize_plan_.first_step,
                              " and checkpoint it; the job re-assembles"));
}

void SchedulerCore::ReassembleLocked(absl::Time now, Outbox* out) {
  const int from = spec_.layout().dp();
  // A worker that never stopped (its lease expired while it was alive:
  // frozen, or cut off from the scheduler) is told to register again
  // when it heartbeats, instead of rejoining the new assembly in place
  // with a step of the old one.
  int not_stopped = 0;
  for (const Node& w : workers_) {
    if (w.registered && !w.stopped_for_resize) {
      reassembling_ids_.insert(w.node_id);
      ++not_stopped;
    }
  }
  spec_ = resize_spec_;
  ResetWorkerSlotsLocked();
  for (Node& n : servers_) {
    if (n.registered) reassembling_ids_.insert(n.node_id);
    n.registered = false;
    n.Reset();
    n.checkpoints = ShardCheckpoints();
  }
  for (int k = 0; k < num_shards_; ++k) primary_[k] = k;
  epoch_.assign(num_shards_, 1);
  orphaned_since_.assign(num_shards_, absl::InfiniteFuture());
  resize_phase_ = ResizePhase::kNone;
  surplus_.clear();
  regroup_why_.clear();
  start_step_known_ = false;
  assemble_start_ = now;
  const std::string message = absl::StrCat(
      absl::StartsWith(resize_why_, "regroup") ? "regroup" : "elastic resize",
      ": every live worker stopped at step ", resize_plan_.first_step,
      not_stopped > 0
          ? absl::StrCat(" (", not_stopped,
                         " whose lease expired did not)")
          : "",
      "; re-assembling with dp ", spec_.layout().dp(), " (was ", from,
      ") from that step's checkpoint");
  SetStateLocked(ASSEMBLING, message, out);
}

std::optional<ResizePlan> SchedulerCore::TakeResizePlan() {
  absl::MutexLock lock(&mu_);
  if (resize_phase_ != ResizePhase::kPlanned) return std::nullopt;
  resize_phase_ = ResizePhase::kTaken;
  return resize_plan_;
}

void SchedulerCore::ResizeStopped(int64_t step) {
  Outbox out;
  {
    absl::MutexLock lock(&mu_);
    if (resize_phase_ != ResizePhase::kTaken) return;
    resize_phase_ = ResizePhase::kStopping;
    resize_plan_.first_step = step;
    const std::string event =
        absl::StrCat(resize_why_, ": every shard stops at step ", step);
    out.logs.push_back(event);
    AddEventLocked(nullptr, event,
                   "workers stop there and register again; the job "
                   "re-assembles once all stopped");
    AdvanceLocked(clock_->Now(), &out);
  }
  Flush(&out);
}

void SchedulerCore::ResizeFailed(const std::string& why) {
  Outbox out;
  {
    absl::MutexLock lock(&mu_);
    if (resize_phase_ != ResizePhase::kTaken) return;
    resize_phase_ = ResizePhase::kNone;
    resize_retry_after_ = clock_->Now() + absl::Seconds(10);
    const std::string event =
        absl::StrCat(resize_why_, " failed: ", why);
    out.logs.push_back(event);
    AddEventLocked(nullptr, event, "the job goes on; tried again in 10s");
  }
  Flush(&out);
}

}  // namespace lmps
