// SchedulerCore: creation, job state and events, assembly, the start step,
// assignments (GetAssignment), Status and the timeouts' entry point
// (AdvanceLocked). Registration, liveness and elastic resizes are in
// scheduler_register.cc, scheduler_liveness.cc and scheduler_elastic.cc.
#include "server/scheduler/scheduler_core.h"

#include <algorithm>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "common/rpc/status_util.h"
#include "server/scheduler/scheduler_core_internal.h"
#include "server/scheduler/start_step.h"

namespace lmps {

using scheduler_internal::Plural;
using scheduler_internal::Seconds;
using scheduler_internal::Terminal;

absl::StatusOr<std::unique_ptr<SchedulerCore>> SchedulerCore::Create(
    SchedulerOptions options, Clock* clock) {
  if (clock == nullptr) {
    return absl::InvalidArgumentError("SchedulerCore needs a clock");
  }
  if (options.assemble_timeout <= absl::ZeroDuration() ||
      options.lease <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "assemble timeout and lease must be positive (got ",
        Seconds(options.assemble_timeout), " and ", Seconds(options.lease),
        ")"));
  }
  ApplyJobSpecDefaults(&options.spec);
  if (absl::Status s = ValidateJobSpec(options.spec); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid job spec: ", s.message()));
  }
  LMPS_ASSIGN_OR_RETURN(
      PartitionMap partition,
      ComputePartition(options.spec.model(), options.spec.layout().num_shards(),
                       options.spec.max_chunk_bytes()));
  LMPS_ASSIGN_OR_RETURN(
      ParallelLayout layout,
      ParallelLayout::Create(options.spec.model(), options.spec.layout()));
  return std::unique_ptr<SchedulerCore>(new SchedulerCore(
      std::move(options), clock, std::move(partition), std::move(layout)));
}

SchedulerCore::SchedulerCore(SchedulerOptions options, Clock* clock,
                             PartitionMap partition, ParallelLayout layout)
    : options_(std::move(options)),
      clock_(clock),
      partition_(std::move(partition)),
      layout_(std::make_unique<const ParallelLayout>(std::move(layout))),
      num_shards_(options_.spec.layout().num_shards()),
      replicated_(options_.spec.layout().shard_backups() > 0),
      expected_servers_(options_.spec.layout().num_shards() *
                        (options_.spec.layout().shard_backups() > 0 ? 2 : 1)),
      start_time_(clock_->Now()) {
  absl::MutexLock lock(&mu_);
  spec_ = options_.spec;
  assemble_start_ = start_time_;
  servers_.resize(expected_servers_);
  for (int i = 0; i < expected_servers_; ++i) {
    Node& n = servers_[i];
    n.role = SERVER;
    n.shard = i % num_shards_;
    n.backup_slot = i >= num_shards_;
    n.node_id = absl::StrCat(n.backup_slot ? "backup-" : "server-", n.shard);
  }
  primary_.resize(num_shards_);
  for (int k = 0; k < num_shards_; ++k) primary_[k] = k;
  epoch_.assign(num_shards_, 1);
  orphaned_since_.assign(num_shards_, absl::InfiniteFuture());
  ResetWorkerSlotsLocked();
}

SchedulerCore::~SchedulerCore() { Shutdown(); }

void SchedulerCore::Flush(Outbox* out) {
  if (options_.log) {
    for (const std::string& line : out->logs) options_.log(line);
  }
  for (auto& [done, result] : out->completions) done(std::move(result));
  out->logs.clear();
  out->completions.clear();
}

void SchedulerCore::SetStateLocked(JobState state, const std::string& message,
                                   Outbox* out) {
  if (state == state_) return;
  const std::string event = absl::StrCat(
      "job state ", JobState_Name(state_), " -> ", JobState_Name(state),
      message.empty() ? "" : ": ", message);
  out->logs.push_back(event);
  AddEventLocked(nullptr, event,
                 state == FAILED     ? "heartbeats tell every node to stop"
                 : state == FINISHED ? "servers write their last checkpoint and exit"
                                     : "");
  state_ = state;
  if (state == FAILED) failure_ = message;
}

void SchedulerCore::AddEventLocked(Node* node, const std::string& event,
                                   const std::string& action) {
  NodeEvent e;
  e.set_unix_ms(absl::ToUnixMillis(clock_->Now()));
  if (node != nullptr) {
    e.set_node_id(node->node_id);
    node->last_event = action.empty() ? event : absl::StrCat(event, " -> ", action);
  }
  e.set_event(event);
  e.set_action(action);
  events_.push_back(std::move(e));
  while (events_.size() > kMaxEvents) events_.pop_front();
}

void SchedulerCore::FailLocked(const std::string& message,
                               const absl::Status& error, Outbox* out,
                               bool rollback) {
  rollback_ = rollback;
  SetStateLocked(FAILED, message, out);
  for (Pending& p : pending_) {
    out->completions.emplace_back(std::move(p.done), error);
  }
  pending_.clear();
}

void SchedulerCore::AdvanceLocked(absl::Time now, Outbox* out) {
  // Each step that fails the job leaves it FAILED, which ends the chain.
  if (state_ == ASSEMBLING) AssemblyTimeoutsLocked(now, out);
  if (state_ == RUNNING) ElasticLocked(now, out);
  if (state_ == RUNNING) ExpireLeasesLocked(now, out);
  // A lease that expired just now may make a regroup due: plan it in this
  // same call, before the caller (e.g. the dead worker's replacement
  // registering) can take the freed slot in place in the running job while
  // the dead worker's peers are about to be stopped for the regroup.
  if (state_ == RUNNING && !regroup_why_.empty() &&
      resize_phase_ == ResizePhase::kNone) {
    ElasticLocked(now, out);
  }
  if (state_ == RUNNING && replicated_) CheckOrphanedShardsLocked(now, out);
}

void SchedulerCore::AssemblyTimeoutsLocked(absl::Time now, Outbox* out) {
  if (now - assemble_start_ >= options_.assemble_timeout) {
    assembly_timed_out_ = true;
    const std::string message =
        absl::StrCat("job did not assemble within ",
                     Seconds(options_.assemble_timeout), ": ",
                     MissingLocked());
    FailLocked(message, absl::DeadlineExceededError(message), out);
    return;
  }
  // Callers whose own deadline passed.
  auto expired = std::stable_partition(
      pending_.begin(), pending_.end(),
      [now](const Pending& p) { return p.deadline > now; });
  if (expired != pending_.end()) {
    const std::string message = absl::StrCat(
        "job did not assemble before the caller's deadline (",
        Seconds(now - assemble_start_),
        " after the scheduler started; it waits up to ",
        Seconds(options_.assemble_timeout), "): ", MissingLocked());
    for (auto it = expired; it != pending_.end(); ++it) {
      out->completions.emplace_back(std::move(it->done),
                                    absl::DeadlineExceededError(message));
    }
    pending_.erase(expired, pending_.end());
  }
}

void SchedulerCore::UpdateStartStepLocked(Outbox* out) {
  if (!AllRegisteredLocked(servers_)) return;
  std::vector<ShardCheckpoints> shards;
  for (const Node& n : servers_) shards.push_back(n.checkpoints);
  const int64_t step = ChooseStartStep(shards, partition_.version());
  if (!start_step_known_ || step != start_step_) {
    out->logs.push_back(absl::StrCat(
        "start_step = ", step, " (",
        ExplainStartStep(shards, partition_.version(), step), ")"));
  }
  start_step_known_ = true;
  start_step_ = step;
}

void SchedulerCore::AssembleLocked(absl::Time now, Outbox* out) {
  assembled_at_ = now;
  for (std::vector<Node>* slots : {&servers_, &workers_}) {
    for (Node& n : *slots) n.lease_start = now;
  }
  out->logs.push_back(absl::StrCat(
      "job assembled after ", Seconds(now - assemble_start_), ": ",
      expected_servers_, " ", Plural(expected_servers_, "server"), ", ",
      expected_workers_, " ", Plural(expected_workers_, "worker"),
      ", start_step ", start_step_));
  SetStateLocked(RUNNING, "", out);
  for (Pending& p : pending_) {
    absl::StatusOr<Assignment> result;
    if (Node* n = FindLocked(p.node_id)) {
      ResolveLocked(*n, &result);
    } else {
      result = absl::NotFoundError(
          absl::StrCat("node ", p.node_id, " is no longer registered"));
    }
    out->completions.emplace_back(std::move(p.done), std::move(result));
  }
  pending_.clear();
}

Assignment SchedulerCore::AssignmentLocked(const Node& n) const {
  Assignment a;
  a.set_node_id(n.node_id);
  a.set_role(n.role);
  a.set_shard(n.role == SERVER ? n.shard : -1);
  if (n.role == SERVER && replicated_) {
    a.set_backup(!IsPrimaryLocked(n));
    a.set_needs_snapshot(n.needs_snapshot);
    a.set_epoch(epoch_[n.shard]);
  }
  a.set_dp_rank(n.role == WORKER ? n.coords.dp : -1);
  a.set_pp_rank(n.role == WORKER ? n.coords.pp : -1);
  a.set_tp_rank(n.role == WORKER ? n.coords.tp : -1);
  *a.mutable_spec() = spec_;
  a.set_elastic(options_.elastic.max_dp > 0 || WorkersNeedPeers(spec_));
  *a.mutable_partition() = partition_;
  for (int k = 0; k < num_shards_; ++k) {
    const Node& primary = servers_[primary_[k]];
    a.add_shard_addresses(primary.address);
    if (replicated_) {
      const Node& b = servers_[primary_[k] < num_shards_ ? primary_[k] + num_shards_
                                                         : primary_[k] - num_shards_];
      a.add_backup_addresses(b.registered && b.alive ? b.address : "");
    }
  }
  a.set_start_step(start_step_);
  if (n.role == WORKER) {
    const StageRange& stage = layout_->stage(n.coords.pp);
    a.set_layer_begin(stage.layer_begin);
    a.set_layer_end(stage.layer_end);
    for (const Node& w : workers_) {
      PeerInfo* p = a.add_workers();
      p->set_node_id(w.node_id);
      p->set_address(w.address);
      p->set_dp_rank(w.coords.dp);
      p->set_pp_rank(w.coords.pp);
      p->set_tp_rank(w.coords.tp);
    }
  }
  return a;
}

bool SchedulerCore::ResolveLocked(const Node& node,
                                  absl::StatusOr<Assignment>* result) {
  if (shutdown_) {
    *result = absl::UnavailableError("the scheduler is shutting down");
    return true;
  }
  switch (state_) {
    case RUNNING:
    case FINISHED:
      *result = AssignmentLocked(node);
      return true;
    case FAILED:
      *result = assembly_timed_out_
                    ? absl::DeadlineExceededError(failure_)
                    : absl::FailedPreconditionError(
                          absl::StrCat("the job FAILED: ", failure_));
      return true;
    default:
      return false;
  }
}

void SchedulerCore::GetAssignmentAsync(const std::string& node_id,
                                       absl::Time deadline,
                                       AssignmentCallback done) {
  Outbox out;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    AdvanceLocked(now, &out);
    const Node* node = FindLocked(node_id);
    absl::StatusOr<Assignment> result;
    if (node == nullptr) {
      out.completions.emplace_back(
          std::move(done),
          absl::NotFoundError(absl::StrCat("unknown node id '", node_id,
                                           "'; Register first")));
    } else if (ResolveLocked(*node, &result)) {
      out.completions.emplace_back(std::move(done), std::move(result));
    } else {
      pending_.push_back(Pending{node_id, deadline, std::move(done)});
      // The deadline may already have passed.
      AdvanceLocked(now, &out);
    }
  }
  Flush(&out);
}

absl::StatusOr<Assignment> SchedulerCore::GetAssignment(
    const std::string& node_id, absl::Time deadline) {
  struct Result {
    absl::Mutex mu;
    bool set ABSL_GUARDED_BY(mu) = false;
    absl::StatusOr<Assignment> value ABSL_GUARDED_BY(mu);
  };
  auto result = std::make_shared<Result>();
  GetAssignmentAsync(node_id, deadline,
                     [result](absl::StatusOr<Assignment> value) {
                       absl::MutexLock lock(&result->mu);
                       result->value = std::move(value);
                       result->set = true;
                     });
  while (true) {
    {
      absl::MutexLock lock(&result->mu);
      result->mu.AwaitWithTimeout(absl::Condition(&result->set),
                                  absl::Milliseconds(10));
      if (result->set) return std::move(result->value);
    }
    Tick();
  }
}

JobStatus SchedulerCore::Status() {
  Outbox out;
  JobStatus status;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    AdvanceLocked(now, &out);
    status.set_state(state_);
    status.set_rollback(state_ == FAILED && rollback_);
    *status.mutable_spec() = spec_;
    status.set_start_step(start_step_);
    status.set_expected_servers(expected_servers_);
    status.set_expected_workers(expected_workers_);
    *status.mutable_partition() = partition_;
    for (const std::vector<Node>* slots : {&servers_, &workers_}) {
      for (const Node& n : *slots) {
        if (!n.registered) continue;
        NodeStatus* s = status.add_nodes();
        s->set_node_id(n.node_id);
        s->set_role(n.role);
        s->set_address(n.address);
        s->set_shard(n.role == SERVER ? n.shard : -1);
        if (n.role == SERVER) {
          s->set_backup(!IsPrimaryLocked(n));
          s->set_serving_primary(IsPrimaryLocked(n));
          if (replicated_) {
            s->set_epoch(epoch_[n.shard]);
            s->set_needs_snapshot(!IsPrimaryLocked(n) && n.needs_snapshot);
          }
        }
        s->set_dp_rank(n.role == WORKER ? n.coords.dp : -1);
        s->set_pp_rank(n.role == WORKER ? n.coords.pp : -1);
        s->set_tp_rank(n.role == WORKER ? n.coords.tp : -1);
        s->set_last_heartbeat_unix_ms(absl::ToUnixMillis(n.last_heartbeat));
        s->set_heartbeat_age_ms(
            absl::ToInt64Milliseconds(now - n.last_heartbeat));
        s->set_step(n.step);
        s->set_loss(n.loss);
        s->set_eval_loss(n.eval_loss);
        s->set_tokens_per_second(n.tokens_per_second);
        s->set_push_wire_bytes(n.push_wire_bytes);
        s->set_pull_wire_bytes(n.pull_wire_bytes);
        s->set_lr(n.lr);
        s->set_alive(n.alive);
        s->set_done(n.done);
        s->set_error(n.error);
        if (n.down_since != absl::InfinitePast()) {
          s->set_down_since_unix_ms(absl::ToUnixMillis(n.down_since));
        }
        s->set_last_event(n.last_event);
      }
    }
    for (const NodeEvent& e : events_) *status.add_events() = e;
    status.set_message(StateMessageLocked());
  }
  Flush(&out);
  return status;
}

void SchedulerCore::Tick() {
  Outbox out;
  {
    absl::MutexLock lock(&mu_);
    AdvanceLocked(clock_->Now(), &out);
  }
  Flush(&out);
}

void SchedulerCore::Shutdown() {
  Outbox out;
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
    for (Pending& p : pending_) {
      out.completions.emplace_back(
          std::move(p.done),
          absl::UnavailableError("the scheduler is shutting down"));
    }
    pending_.clear();
  }
  Flush(&out);
}

JobState SchedulerCore::CurrentState() {
  Outbox out;
  JobState state;
  {
    absl::MutexLock lock(&mu_);
    AdvanceLocked(clock_->Now(), &out);
    state = state_;
  }
  Flush(&out);
  return state;
}

std::string SchedulerCore::StateMessage() {
  Outbox out;
  std::string message;
  {
    absl::MutexLock lock(&mu_);
    AdvanceLocked(clock_->Now(), &out);
    message = StateMessageLocked();
  }
  Flush(&out);
  return message;
}

std::string SchedulerCore::StateMessageLocked() const {
  switch (state_) {
    case FAILED:
      return failure_;
    case ASSEMBLING:
      return absl::StrCat("assembling: ", MissingLocked());
    case RUNNING:
      return DescribeDeadLocked();
    default:
      return "";
  }
}

bool SchedulerCore::AllServersSawFinalState() {
  absl::MutexLock lock(&mu_);
  if (!Terminal(state_)) return false;
  for (const Node& n : servers_) {
    if (n.registered && n.alive && n.last_told != state_) return false;
  }
  return true;
}

}  // namespace lmps
