#include "server/scheduler/scheduler_core.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/notification.h"
#include "common/job_spec.h"
#include "common/partition.h"
#include "common/status_util.h"

namespace lmps {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// "120s", "0.25s", "12.345s".
std::string Seconds(absl::Duration d) {
  const double s = std::round(absl::ToDoubleSeconds(d) * 1000) / 1000;
  return absl::StrCat(s, "s");
}

std::string Plural(int n, absl::string_view noun) {
  return absl::StrCat(noun, n == 1 ? "" : "s");
}

bool Terminal(JobState s) { return s == FINISHED || s == FAILED; }

}  // namespace

int64_t ChooseStartStep(const std::vector<ShardCheckpoints>& shards,
                        uint64_t partition_version) {
  if (shards.empty()) return 0;
  std::set<int64_t> common;
  bool first = true;
  for (const ShardCheckpoints& shard : shards) {
    std::set<int64_t> steps;
    if (shard.partition_version == partition_version) {
      for (int64_t s : shard.steps) {
        if (s >= 0) steps.insert(s);
      }
    }
    for (int64_t s : shard.relayout_steps) {
      if (s >= 0) steps.insert(s);
    }
    if (first) {
      common = std::move(steps);
      first = false;
    } else {
      std::set<int64_t> both;
      std::set_intersection(common.begin(), common.end(), steps.begin(),
                            steps.end(), std::inserter(both, both.begin()));
      common = std::move(both);
    }
    if (common.empty()) return 0;
  }
  return *common.rbegin();
}

// One slot of the job: a shard or a worker rank, and the node holding it.
struct SchedulerCore::Node {
  // Fixed per slot.
  std::string node_id;
  Role role = ROLE_UNSPECIFIED;
  int shard = -1;
  int rank = -1;  // workers
  WorkerCoords coords;  // ParallelLayout::Coords(rank)
  bool backup_slot = false;  // servers of a replicated job: "backup-<shard>"

  // The node currently holding the slot.
  bool registered = false;
  std::string address;
  std::string hostname;
  ShardCheckpoints checkpoints;
  absl::Time registered_at;
  absl::Time last_heartbeat;  // or registration time
  absl::Time lease_start;     // max(last heartbeat, registration, assembly)
  int64_t step = 0;
  float loss = kNaN;
  float eval_loss = kNaN;
  double tokens_per_second = 0;
  bool alive = true;
  bool done = false;
  std::string error;
  JobState last_told = JOB_STATE_UNSPECIFIED;  // in a HeartbeatResponse
  // Replicated servers: joined a running job as the backup (gets a
  // snapshot).
  bool needs_snapshot = false;
  bool stopped_for_resize = false;  // workers: stopped at a resize boundary
  int64_t incarnation = 0;  // of the registration holding the slot
  absl::Time down_since = absl::InfinitePast();  // InfinitePast: healthy
  std::string last_event;

  // "worker-1 (127.0.0.1:5000)" or "worker-1 (host hostname)".
  std::string Describe() const {
    if (!address.empty()) return absl::StrCat(node_id, " (", address, ")");
    if (!hostname.empty()) return absl::StrCat(node_id, " (host ", hostname, ")");
    return node_id;
  }

  // Empties the slot's progress for a new node.
  void Reset() {
    step = 0;
    loss = kNaN;
    eval_loss = kNaN;
    tokens_per_second = 0;
    alive = true;
    done = false;
    error.clear();
    last_told = JOB_STATE_UNSPECIFIED;
    down_since = absl::InfinitePast();
    needs_snapshot = false;
    stopped_for_resize = false;
  }
};

struct SchedulerCore::Pending {
  std::string node_id;
  absl::Time deadline;
  AssignmentCallback done;
};

// Effects gathered under the lock and carried out after it is released.
struct SchedulerCore::Outbox {
  std::vector<std::string> logs;
  std::vector<std::pair<AssignmentCallback, absl::StatusOr<Assignment>>>
      completions;
};

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

void SchedulerCore::ResetWorkerSlotsLocked() {
  const LayoutConfig& l = spec_.layout();
  expected_workers_ = l.dp() * l.pp() * l.tp();
  // Coordinates depend on pp and tp only, which an elastic resize keeps.
  workers_.clear();
  workers_.resize(expected_workers_);
  for (int i = 0; i < expected_workers_; ++i) {
    workers_[i].node_id = absl::StrCat("worker-", i);
    workers_[i].role = WORKER;
    workers_[i].rank = i;
    workers_[i].coords = layout_->Coords(i);
  }
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

int SchedulerCore::SlotIndexLocked(const Node& n) const {
  return static_cast<int>(&n - servers_.data());
}

SchedulerCore::Node& SchedulerCore::PartnerLocked(const Node& n) {
  const int i = SlotIndexLocked(n);
  return servers_[i < num_shards_ ? i + num_shards_ : i - num_shards_];
}

bool SchedulerCore::IsPrimaryLocked(const Node& n) const {
  return !replicated_ || primary_[n.shard] == SlotIndexLocked(n);
}

void SchedulerCore::PromoteLocked(Node& to, const std::string& why,
                                  Outbox* out) {
  const int k = to.shard;
  primary_[k] = SlotIndexLocked(to);
  ++epoch_[k];
  orphaned_since_[k] = absl::InfiniteFuture();
  const std::string line =
      absl::StrCat(to.Describe(), " becomes the primary of shard ", k,
                   " in epoch ", epoch_[k], " (", why, ")");
  out->logs.push_back(line);
  AddEventLocked(&to, absl::StrCat("promoted to primary of shard ", k),
                 absl::StrCat("epoch ", epoch_[k], ": ", why));
}

void SchedulerCore::ReplicationHeartbeatLocked(Node* n,
                                               const HeartbeatRequest& request,
                                               absl::Time now,
                                               HeartbeatResponse* r,
                                               Outbox* out) {
  const int k = n->shard;
  if (!request.replication_event().empty()) {
    out->logs.push_back(
        absl::StrCat(n->Describe(), ": ", request.replication_event()));
    AddEventLocked(n, request.replication_event(), "");
  }
  Node& partner = PartnerLocked(*n);
  if (!IsPrimaryLocked(*n)) {
    // A backup counts as a complete copy once it holds the current epoch's
    // state: not awaiting a snapshot, and not left behind by a change of
    // epoch it did not take part in (a detach).
    n->needs_snapshot =
        request.awaiting_snapshot() || request.epoch() != epoch_[k];
    if (orphaned_since_[k] != absl::InfiniteFuture() && !n->needs_snapshot &&
        !request.serving_primary()) {
      // Its primary died while its report lagged: it holds the shard.
      PromoteLocked(*n,
                    absl::StrCat("its primary ", partner.Describe(),
                                 " is dead and it holds a complete copy"),
                    out);
      r->set_promote(true);
      r->set_epoch(epoch_[k]);
      return;
    }
    if (request.serving_primary()) {
      // It still serves although the scheduler moved the shard (its lease
      // had expired): it stops and exits, so its slot is open at once.
      r->set_fenced(true);
      n->alive = false;
      n->down_since = now;
      AddEventLocked(n, absl::StrCat("serves shard ", k, " in epoch ",
                                     request.epoch(), " though ",
                                     partner.Describe(), " is its primary in "
                                     "epoch ",
                                     epoch_[k]),
                     "told it is fenced off (it exits); marked dead");
    }
  } else if (!request.serving_primary()) {
    r->set_promote(true);  // it has not heard of its promotion yet
  } else if (request.epoch() < epoch_[k]) {
    // It missed the answer that let it serve alone (answers get lost): say
    // it again; it adopts the epoch.
    r->set_detach_backup(true);
  } else if (request.backup_lost()) {
    // The primary's backup failed an operation: it serves alone in a new
    // epoch, and the backup is stale until it gets a snapshot.
    ++epoch_[k];
    partner.needs_snapshot = true;
    r->set_detach_backup(true);
    const std::string action = absl::StrCat(
        "it serves shard ", k, " without ", partner.Describe(), " in epoch ",
        epoch_[k], " until a new backup holds a snapshot");
    out->logs.push_back(absl::StrCat(
        n->Describe(), " lost its backup; ", action));
    AddEventLocked(n, "lost its backup", action);
  } else if (partner.registered && partner.alive) {
    r->set_backup_address(partner.address);
  }
  r->set_epoch(epoch_[k]);
}

SchedulerCore::Node* SchedulerCore::FindLocked(absl::string_view node_id) {
  for (std::vector<Node>* slots : {&servers_, &workers_}) {
    for (Node& n : *slots) {
      if (n.node_id == node_id) return n.registered ? &n : nullptr;
    }
  }
  return nullptr;
}

bool SchedulerCore::AllRegisteredLocked(const std::vector<Node>& slots) const {
  for (const Node& n : slots) {
    if (!n.registered) return false;
  }
  return true;
}

std::string SchedulerCore::MissingLocked() const {
  int servers = 0, workers = 0;
  std::vector<std::string> registered;
  for (const std::vector<Node>* slots : {&servers_, &workers_}) {
    for (const Node& n : *slots) {
      if (!n.registered) continue;
      (n.role == SERVER ? servers : workers)++;
      const std::string& where = !n.address.empty() ? n.address : n.hostname;
      registered.push_back(
          where.empty() ? n.node_id : absl::StrCat(n.node_id, " at ", where));
    }
  }
  // The free slots by name, when few (a lost node's, typically).
  std::vector<std::string> free;
  for (const Node& n : servers_) {
    if (!n.registered) free.push_back(absl::StrCat("shard ", n.shard));
  }
  for (const Node& n : workers_) {
    if (!n.registered) {
      free.push_back(absl::StrCat("worker rank ", n.rank, " (dp ", n.coords.dp,
                                  ", pp ", n.coords.pp, ", tp ", n.coords.tp,
                                  ")"));
    }
  }
  return absl::StrCat(
      "missing ", expected_workers_ - workers, " of ", expected_workers_, " ",
      Plural(expected_workers_, "worker"), ", ", expected_servers_ - servers,
      " of ", expected_servers_, " ", Plural(expected_servers_, "server"),
      free.empty() || free.size() > 8
          ? ""
          : absl::StrCat(": ", absl::StrJoin(free, ", ")),
      " (registered: ",
      registered.empty() ? "none" : absl::StrJoin(registered, ", "), ")");
}

std::string SchedulerCore::DescribeDeadLocked() const {
  std::vector<std::string> dead;
  for (const std::vector<Node>* slots : {&servers_, &workers_}) {
    for (const Node& n : *slots) {
      if (n.registered && !n.alive) dead.push_back(n.Describe());
    }
  }
  if (dead.empty()) return "";
  return absl::StrCat("waiting for a replacement of ", absl::StrJoin(dead, ", "),
                      ": missed the heartbeat lease of ",
                      Seconds(options_.lease));
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
  if (state_ == ASSEMBLING) {
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
  if (state_ == RUNNING) ElasticLocked(now, out);
  if (state_ == RUNNING) {
    for (std::vector<Node>* slots : {&servers_, &workers_}) {
      for (Node& n : *slots) {
        if (n.registered && n.alive && now - n.lease_start > options_.lease) {
          int lost_shard = -1;
          n.alive = false;
          n.down_since = now;
          const std::string event = absl::StrCat(
              "missed its heartbeat lease of ", Seconds(options_.lease),
              " (last heartbeat ", Seconds(now - n.last_heartbeat), " ago)");
          std::string action =
              "marked dead; its slot is open for a replacement";
          if (n.role == WORKER && layout_->pp() * layout_->tp() > 1 &&
              regroup_why_.empty()) {
            regroup_why_ = absl::StrCat(n.Describe(), " ", event);
            absl::StrAppend(&action, "; its pipeline replica regroups");
          }
          if (replicated_ && n.role == SERVER) {
            Node& partner = PartnerLocked(n);
            bool partner_up = partner.registered && partner.alive;
            if (IsPrimaryLocked(n) && partner_up && partner.needs_snapshot) {
              // Its last report may lag behind a snapshot it received:
              // promoted if its next heartbeat shows a complete copy.
              orphaned_since_[n.shard] = now;
              absl::StrAppend(&action, "; its backup ", partner.Describe(),
                              " has shown no complete copy of shard ",
                              n.shard, " yet: it takes over if it shows one "
                              "within a lease, else the shard lost both "
                              "copies");
            } else if (IsPrimaryLocked(n) && !partner_up) {
              absl::StrAppend(&action, "; its backup ", partner.Describe(),
                              " is down, so shard ", n.shard,
                              " lost both copies");
              lost_shard = n.shard;
            } else if (IsPrimaryLocked(n)) {
              PromoteLocked(partner,
                            absl::StrCat(n.Describe(), "'s lease expired"),
                            out);
              absl::StrAppend(&action, "; its backup ", partner.Describe(),
                              " takes over shard ", n.shard, " in epoch ",
                              epoch_[n.shard],
                              " (told in its next heartbeat): no step is "
                              "lost");
            } else if (partner_up) {
              absl::StrAppend(&action, "; the primary of shard ", n.shard,
                              " serves alone until a new backup registers");
            }
          }
          out->logs.push_back(
              absl::StrCat("node ", n.Describe(), " ", event, "; ", action));
          AddEventLocked(&n, event, action);
          if (lost_shard >= 0) {
            const std::string message = absl::StrCat(
                "shard ", lost_shard, " lost both copies (its primary ",
                n.Describe(), " died while its backup held no complete "
                "copy); rolling back: every node stops, and the "
                "restarted job resumes from the latest checkpoint every "
                "shard holds");
            FailLocked(message,
                       absl::FailedPreconditionError(
                           absl::StrCat("the job FAILED: ", message)),
                       out, /*rollback=*/true);
            return;
          }
        }
      }
    }
  }
  if (state_ == RUNNING && replicated_) {
    for (int k = 0; k < num_shards_; ++k) {
      if (orphaned_since_[k] == absl::InfiniteFuture()) continue;
      const Node& dead = servers_[primary_[k]];
      const Node& backup = PartnerLocked(dead);
      if (backup.registered && backup.alive &&
          now - orphaned_since_[k] <= options_.lease) {
        continue;
      }
      orphaned_since_[k] = absl::InfiniteFuture();
      const std::string message = absl::StrCat(
          "shard ", k, " lost both copies (its primary ", dead.Describe(),
          " died and its backup ", backup.Describe(),
          " showed no complete copy within a lease); rolling back: every "
          "node stops, and the restarted job resumes from the latest "
          "checkpoint every shard holds");
      FailLocked(message,
                 absl::FailedPreconditionError(
                     absl::StrCat("the job FAILED: ", message)),
                 out, /*rollback=*/true);
      return;
    }
  }
}

void SchedulerCore::UpdateStartStepLocked(Outbox* out) {
  if (!AllRegisteredLocked(servers_)) return;
  std::vector<ShardCheckpoints> shards;
  for (const Node& n : servers_) shards.push_back(n.checkpoints);
  const int64_t step = ChooseStartStep(shards, partition_.version());
  if (!start_step_known_ || step != start_step_) {
    // Shards that load `step` from another layout's files (resharding), and
    // whether any shard holds checkpoints of another partition.
    std::vector<int> reshard;
    bool other_partition = false;
    for (size_t i = 0; i < shards.size(); ++i) {
      const ShardCheckpoints& c = shards[i];
      const bool own = c.partition_version == partition_.version() &&
                       std::count(c.steps.begin(), c.steps.end(), step) > 0;
      if (step > 0 && !own) reshard.push_back(static_cast<int>(i));
      other_partition |= !c.steps.empty() &&
                         c.partition_version != partition_.version();
    }
    std::string why;
    if (step > 0 && reshard.empty()) {
      why = absl::StrCat("latest checkpoint every shard holds, partition "
                         "version ",
                         partition_.version());
    } else if (step > 0) {
      why = absl::StrCat(
          "latest checkpoint every shard can load; shards [",
          absl::StrJoin(reshard, ","),
          "] load it from the complete set of its shard files, rebuilding "
          "their chunks if another layout wrote it (partition version ",
          partition_.version(), " now)");
    } else if (other_partition) {
      why = absl::StrCat(
          "servers hold checkpoints of another partition (model, num_shards "
          "or max_chunk_bytes changed; this job's is ",
          partition_.version(),
          ") but no step has every old shard file reachable from every "
          "server: resuming under another layout needs every old shard file "
          "of the step reachable from every new shard (one --checkpoint_dir "
          "on a shared volume, or the files copied into each shard's "
          "--checkpoint_dir); starting from scratch");
    } else {
      why = absl::StrCat(
          "no checkpoint step common to every shard with partition version ",
          partition_.version());
    }
    out->logs.push_back(absl::StrCat("start_step = ", step, " (", why, ")"));
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
  a.set_elastic(options_.elastic.max_dp > 0 ||
                layout_->pp() * layout_->tp() > 1);
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

absl::StatusOr<RegisterResponse> SchedulerCore::Register(
    const RegisterRequest& request) {
  Outbox out;
  absl::StatusOr<RegisterResponse> response = [&]() -> absl::StatusOr<
                                                        RegisterResponse> {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    AdvanceLocked(now, &out);
    if (request.role() != SERVER && request.role() != WORKER) {
      const std::string name = Role_Name(request.role());
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot register a node with role ", name.empty() ? "?" : name,
          " (", static_cast<int>(request.role()),
          "); valid roles: SERVER, WORKER"));
    }
    if (shutdown_) {
      return absl::UnavailableError("the scheduler is shutting down");
    }
    if (Terminal(state_)) {
      absl::Status ended = absl::FailedPreconditionError(absl::StrCat(
          "cannot register: the job is already ", JobState_Name(state_),
          failure_.empty() ? "" : ": ", failure_));
      return state_ == FINISHED ? WithReason(ended, JOB_FINISHED) : ended;
    }
    const bool server = request.role() == SERVER;
    if (!server && resize_phase_ != ResizePhase::kNone) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the job is being resized (", resize_why_,
          "); register again once it re-assembles"));
    }
    if (server && request.address().empty()) {
      return absl::InvalidArgumentError(
          "a server must register with the address (host:port) it serves on");
    }
    if (!server && request.address().empty() && layout_->pp() * layout_->tp() > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "with pp=", layout_->pp(), " tp=", layout_->tp(),
          " a worker must register with the address (host:port) of its "
          "WorkerPeer service"));
    }
    std::vector<Node>& slots = server ? servers_ : workers_;
    const int n_slots = static_cast<int>(slots.size());
    const int requested = request.requested_rank();
    // Servers ask for a shard id, workers (optionally) for a worker rank.
    const int n_ids = server ? num_shards_ : n_slots;
    const bool requested_valid = requested >= 0 && requested < n_ids;
    // The slots a valid request may take, preferred first: a server's
    // shard has a primary and (replicated) a backup slot.
    std::vector<Node*> wanted;
    if (requested_valid) {
      const bool backup_first = replicated_ && server && request.backup();
      wanted.push_back(&slots[requested + (backup_first ? num_shards_ : 0)]);
      if (replicated_ && server) {
        wanted.push_back(&slots[requested + (backup_first ? 0 : num_shards_)]);
      }
    }
    Node* slot = nullptr;
    std::string how;
    // 0. A node of the running job re-registering with a restarted
    //    scheduler takes back exactly its slot.
    if (request.rejoin()) {
      if (!requested_valid) {
        return absl::InvalidArgumentError(absl::StrCat(
            "a rejoining ", server ? "server" : "worker",
            " must name its ", server ? "shard" : "rank", " in [0, ", n_ids,
            "), got ", requested));
      }
      Node& n = *wanted[0];
      if (n.registered && n.alive && n.address != request.address()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "cannot rejoin as ", server ? "shard " : "worker rank ", requested,
            ": held by the live node ", n.Describe()));
      }
      slot = &n;
      how = absl::StrCat("rejoined the running job at step ", request.step(),
                         " (the scheduler restarted; its state is rebuilt "
                         "from the re-registering nodes)");
    }
    // 1. A server coming back on the same address takes its slot again.
    if (server && slot == nullptr) {
      for (Node& n : slots) {
        // Not a live node that asked for another shard: two shards that
        // advertise the same address are different nodes, not a restart.
        const bool other_shard =
            n.alive && requested >= 0 && n.shard != requested;
        if (n.registered && n.address == request.address() && !other_shard) {
          slot = &n;
          how = n.alive ? "re-registered (same address)"
                        : "re-registered (same address) after its lease "
                          "expired";
          break;
        }
      }
    }
    // 2. A free slot: the requested shard, else the lowest free one.
    if (slot == nullptr) {
      for (Node* n : wanted) {
        if (slot == nullptr && !n->registered) slot = n;
      }
      if (slot == nullptr) {
        for (Node& n : slots) {
          if (!n.registered) {
            slot = &n;
            break;
          }
        }
      }
      if (slot != nullptr) {
        how = "registered";
        if (server && requested >= 0 && slot->shard != requested) {
          absl::StrAppend(&how, " (requested shard ", requested,
                          requested_valid ? " is taken)" : " is out of range)");
        }
      }
    }
    // 3. Every slot taken: replace a dead node.
    if (slot == nullptr) {
      Node* dead = nullptr;
      for (Node* n : wanted) {
        if (dead == nullptr && !n->alive) dead = n;
      }
      for (Node& n : slots) {
        if (dead == nullptr && !n.alive && !request.address().empty() &&
            n.address == request.address()) {
          dead = &n;
        }
      }
      // A server of a running replicated job that asked for a shard takes
      // no other shard's slot: that shard's state is not on it.
      const bool only_wanted =
          server && replicated_ && requested_valid && state_ == RUNNING;
      for (Node& n : slots) {
        if (dead == nullptr && !n.alive && !only_wanted) dead = &n;
      }
      if (dead != nullptr) {
        slot = dead;
        how = absl::StrCat("replaces ", dead->Describe(),
                           ", whose lease had expired");
      }
    }
    if (slot == nullptr) {
      std::vector<std::string> holders;
      for (const Node& n : slots) holders.push_back(n.Describe());
      const LayoutConfig& l = spec_.layout();
      std::string elastic;
      if (!server && options_.elastic.max_dp > 0 && state_ == RUNNING) {
        const std::string key =
            !request.instance_id().empty()
                ? request.instance_id()
                : absl::StrCat(request.hostname(), "/", request.address());
        surplus_[key] = now;
        elastic = absl::StrCat(
            "; elastic: dp grows (up to ", options_.elastic.max_dp,
            ") at the next step boundary once ", l.pp() * l.tp(),
            " surplus worker(s) ask; keep registering");
      }
      absl::Status full = absl::ResourceExhaustedError(absl::StrCat(
          "too many ", server ? "servers" : "workers", ": the job expects ",
          n_slots, " ",
          server ? absl::StrCat("(layout.num_shards=", l.num_shards(), ")")
                 : absl::StrCat("(dp*pp*tp = ", l.dp(), "*", l.pp(), "*",
                                l.tp(), ")"),
          " and every slot is held by a live node: ",
          absl::StrJoin(holders, ", "), elastic));
      return elastic.empty() ? full : WithReason(full, ELASTIC_SURPLUS);
    }
    reassembling_ids_.erase(slot->node_id);

    slot->registered = true;
    slot->incarnation = ++last_incarnation_;
    slot->Reset();
    slot->address = request.address();
    slot->hostname = request.hostname();
    slot->checkpoints.steps.assign(request.checkpoint_steps().begin(),
                                   request.checkpoint_steps().end());
    slot->checkpoints.partition_version =
        request.checkpoint_partition_version();
    slot->checkpoints.relayout_steps.assign(
        request.relayout_checkpoint_steps().begin(),
        request.relayout_checkpoint_steps().end());
    slot->registered_at = now;
    slot->last_heartbeat = now;
    slot->lease_start = now;
    if (request.rejoin()) slot->step = request.step();
    if (request.rejoin() && server && replicated_) {
      // A restarted scheduler learns each shard's roles from its nodes: the
      // primary of the newest epoch.
      const int k = slot->shard;
      if (request.serving_primary() && request.epoch() >= epoch_[k]) {
        primary_[k] = SlotIndexLocked(*slot);
      }
      epoch_[k] = std::max(epoch_[k], request.epoch());
    }

    std::string ranks =
        server ? absl::StrCat("shard ", slot->shard)
               : absl::StrCat("rank ", slot->rank, " (dp ", slot->coords.dp,
                              ", pp ", slot->coords.pp, ", tp ",
                              slot->coords.tp, ")");
    if (server) {
      absl::StrAppend(&ranks, ", checkpoints [",
                      absl::StrJoin(slot->checkpoints.steps, ","),
                      "] partition version ",
                      slot->checkpoints.partition_version);
      if (!slot->checkpoints.relayout_steps.empty()) {
        absl::StrAppend(&ranks, ", every shard's file of steps [",
                        absl::StrJoin(slot->checkpoints.relayout_steps, ","),
                        "]");
      }
    }
    out.logs.push_back(absl::StrCat(slot->Describe(), " ", how, ": ", ranks));
    AddEventLocked(slot, absl::StrCat(how, ": ", ranks),
                   request.rejoin()       ? "keeps its assignment"
                   : state_ == ASSEMBLING ? "waiting for the job to assemble"
                                          : "given the slot's assignment");

    Node* partner = replicated_ && server ? &PartnerLocked(*slot) : nullptr;
    if (server && state_ == RUNNING && !request.rejoin() &&
        partner != nullptr && partner->registered && partner->alive &&
        !partner->needs_snapshot) {
      // Replicated: the shard's other node serves it; this one becomes its
      // backup and gets a snapshot of its state. If this slot was the
      // primary (its old node died before its lease expired), the other
      // node is promoted in a new epoch.
      if (IsPrimaryLocked(*slot)) {
        PromoteLocked(*partner,
                      absl::StrCat(slot->Describe(), " restarted"), &out);
      }
      slot->needs_snapshot = true;
      const std::string line = absl::StrCat(
          slot->Describe(), " becomes the backup of shard ", slot->shard,
          " (primary ", partner->Describe(), ")");
      out.logs.push_back(line);
      AddEventLocked(slot, absl::StrCat("becomes the backup of shard ",
                                        slot->shard),
                     absl::StrCat("the primary ", partner->Describe(),
                                  " sends it a snapshot and replicates to it"));
    } else if (server && state_ == RUNNING && !request.rejoin()) {
      // A new server process in a running job (e.g. Kubernetes restarted a
      // lost shard's pod): that shard's state after its checkpoint is gone,
      // so the other shards and the workers must roll back too. The job
      // fails; every node exits, and when they are restarted (by Kubernetes,
      // or lmps_local --restart_job) the new job resumes everywhere from the
      // latest checkpoint every shard holds.
      const std::string message = absl::StrCat(
          "shard ", slot->shard, " restarted (", slot->Describe(), " ", how,
          ") and lost its state after its last checkpoint; rolling back: "
          "every node stops, and the restarted job resumes from the latest "
          "checkpoint every shard holds");
      FailLocked(message,
                 absl::FailedPreconditionError(
                     absl::StrCat("the job FAILED: ", message)),
                 &out, /*rollback=*/true);
    }
    if (state_ == ASSEMBLING) {
      if (server) UpdateStartStepLocked(&out);
      if (AllRegisteredLocked(servers_) && AllRegisteredLocked(workers_)) {
        AssembleLocked(now, &out);
      }
    }
    RegisterResponse r;
    r.set_node_id(slot->node_id);
    r.set_lease_ms(absl::ToInt64Milliseconds(options_.lease));
    r.set_incarnation(slot->incarnation);
    r.set_backup_slot(slot->backup_slot);
    return r;
  }();
  Flush(&out);
  return response;
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

absl::StatusOr<HeartbeatResponse> SchedulerCore::Heartbeat(
    const HeartbeatRequest& request) {
  Outbox out;
  absl::StatusOr<HeartbeatResponse> response =
      [&]() -> absl::StatusOr<HeartbeatResponse> {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    AdvanceLocked(now, &out);
    Node* n = FindLocked(request.node_id());
    if (n == nullptr && reassembling_ids_.count(request.node_id()) > 0) {
      HeartbeatResponse r;
      r.set_state(state_);
      r.set_reassemble(true);
      return r;
    }
    if (n == nullptr) {
      return absl::NotFoundError(absl::StrCat(
          "unknown node id '", request.node_id(), "'; Register first"));
    }
    if (request.incarnation() != 0 && request.incarnation() != n->incarnation) {
      // An older process of this slot, replaced while it was cut off or
      // frozen: it must stop; nothing of the slot changes.
      HeartbeatResponse r;
      r.set_state(state_);
      r.set_fenced(true);
      out.logs.push_back(absl::StrCat(
          "a heartbeat of ", request.node_id(), " from registration ",
          request.incarnation(), ", replaced by ", n->Describe(),
          " (registration ", n->incarnation, "): told it is fenced off"));
      return r;
    }
    if (request.stopped_for_resize() && !n->stopped_for_resize) {
      n->stopped_for_resize = true;
      AddEventLocked(n, "stopped at the resize boundary",
                     "registers again for the resized job");
    }
    n->last_heartbeat = now;
    n->lease_start = now;
    if (!n->alive) {
      n->alive = true;
      n->down_since = absl::InfinitePast();
      out.logs.push_back(absl::StrCat(
          n->Describe(), " heartbeats again after its lease expired; alive"));
      AddEventLocked(n, "heartbeats again after its lease expired",
                     "marked alive");
    }
    HeartbeatResponse r;
    if (replicated_ && n->role == SERVER) {
      ReplicationHeartbeatLocked(n, request, now, &r, &out);
    }
    if (n->role == WORKER && resize_phase_ != ResizePhase::kNone &&
        resize_plan_.ahead == 0) {
      r.set_peers_lost(true);
    }
    n->step = request.step();
    n->loss = request.loss();
    n->eval_loss = request.eval_loss();
    n->tokens_per_second = request.tokens_per_second();
    if (request.done() && !n->done) {
      n->done = true;
      out.logs.push_back(
          absl::StrCat(n->Describe(), " is done at step ", request.step()));
    }
    if (!request.error().empty()) {
      const bool first = n->error.empty();
      n->error = request.error();
      if (first) {
        n->down_since = now;
        AddEventLocked(n, absl::StrCat("reported an error: ", request.error()),
                       Terminal(state_) ? "none (the job had already ended)"
                                        : "the job is marked FAILED");
      }
      if (first && !Terminal(state_)) {
        const std::string message = absl::StrCat(
            "node ", n->Describe(), " reported an error: ", request.error());
        FailLocked(message,
                   absl::FailedPreconditionError(
                       absl::StrCat("the job FAILED: ", message)),
                   &out);
      }
    }
    if (state_ == RUNNING) {
      bool all_done = true;
      for (const Node& w : workers_) all_done = all_done && w.done;
      if (all_done) {
        SetStateLocked(FINISHED, "every worker reported done", &out);
      }
    }
    r.set_state(state_);
    if (state_ == FAILED) r.set_message(failure_);
    n->last_told = state_;
    return r;
  }();
  Flush(&out);
  return response;
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
  // A dead worker (or, regrouping, a lost one) holds the others back at
  // the shards' version: stop there. Otherwise two steps ahead, so that no
  // worker has pulled the boundary yet.
  const bool held_back = dead > 0 || regroup;
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
      ": every worker stopped at step ", resize_plan_.first_step,
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
