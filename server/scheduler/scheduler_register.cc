// SchedulerCore::Register: a node joins the job (the rules are in
// scheduler_core.h, "Registration"). RegisterLocked runs the steps in order:
// validation (CheckRegisterLocked), the candidate slots (SlotRequestLocked),
// slot choice (ChooseSlotLocked: rejoin, same address, a free slot, a dead
// node's slot), the answer when every slot is held (NoSlotLocked, which counts
// elastic surplus workers), then taking the slot (TakeSlotLocked), its log
// line and event, a server joining a running job (backup or rollback), and
// the assembly once every slot is registered.
#include "server/scheduler/scheduler_core.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model/job_spec.h"
#include "common/rpc/status_util.h"
#include "server/scheduler/scheduler_core_internal.h"

namespace lmps {

using scheduler_internal::Terminal;

// What a Register request may take: the slots of its role and, preferred
// first, the slots its requested_rank names (a server's shard has a primary
// and, replicated, a backup slot). Points into servers_ or workers_: valid
// while mu_ is held.
struct SchedulerCore::SlotRequest {
  bool server = false;
  std::vector<Node>* slots = nullptr;
  int n_slots = 0;
  int requested = -1;  // RegisterRequest.requested_rank
  // Servers ask for a shard id, workers (optionally) for a worker rank.
  int n_ids = 0;
  bool requested_valid = false;  // requested in [0, n_ids)
  std::vector<Node*> wanted;
  std::string hostname;  // RegisterRequest.hostname
};

absl::StatusOr<RegisterResponse> SchedulerCore::Register(
    const RegisterRequest& request) {
  Outbox out;
  absl::StatusOr<RegisterResponse> response;
  {
    absl::MutexLock lock(&mu_);
    response = RegisterLocked(request, &out);
  }
  Flush(&out);
  return response;
}

absl::StatusOr<RegisterResponse> SchedulerCore::RegisterLocked(
    const RegisterRequest& request, Outbox* out) {
  const absl::Time now = clock_->Now();
  AdvanceLocked(now, out);
  LMPS_RETURN_IF_ERROR(CheckRegisterLocked(request));
  const SlotRequest want = SlotRequestLocked(request);
  std::string how;
  LMPS_ASSIGN_OR_RETURN(Node* const slot,
                        ChooseSlotLocked(request, want, &how));
  if (slot == nullptr) return NoSlotLocked(request, want, now);

  TakeSlotLocked(slot, request, now);
  LogRegistrationLocked(slot, how, request, out);
  if (want.server && state_ == RUNNING && !request.rejoin()) {
    ServerJoinsRunningJobLocked(slot, how, out);
  }
  if (state_ == ASSEMBLING) {
    if (want.server) UpdateStartStepLocked(out);
    if (AllRegisteredLocked(servers_) && AllRegisteredLocked(workers_)) {
      AssembleLocked(now, out);
    }
  }
  RegisterResponse r;
  r.set_node_id(slot->node_id);
  r.set_lease_ms(absl::ToInt64Milliseconds(options_.lease));
  r.set_incarnation(slot->incarnation);
  r.set_backup_slot(slot->backup_slot);
  return r;
}

absl::Status SchedulerCore::CheckRegisterLocked(
    const RegisterRequest& request) const {
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
  if (!server && request.address().empty() &&
      layout_->pp() * layout_->tp() > 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "with pp=", layout_->pp(), " tp=", layout_->tp(),
        " a worker must register with the address (host:port) of its "
        "WorkerPeer service"));
  }
  return absl::OkStatus();
}

SchedulerCore::SlotRequest SchedulerCore::SlotRequestLocked(
    const RegisterRequest& request) {
  SlotRequest want;
  want.server = request.role() == SERVER;
  want.slots = want.server ? &servers_ : &workers_;
  want.n_slots = static_cast<int>(want.slots->size());
  want.requested = request.requested_rank();
  want.n_ids = want.server ? num_shards_ : want.n_slots;
  want.requested_valid = want.requested >= 0 && want.requested < want.n_ids;
  want.hostname = request.hostname();
  if (want.requested_valid) {
    std::vector<Node>& slots = *want.slots;
    const bool backup_first = replicated_ && want.server && request.backup();
    want.wanted.push_back(
        &slots[want.requested + (backup_first ? num_shards_ : 0)]);
    if (replicated_ && want.server) {
      want.wanted.push_back(
          &slots[want.requested + (backup_first ? 0 : num_shards_)]);
    }
  }
  return want;
}

absl::StatusOr<SchedulerCore::Node*> SchedulerCore::ChooseSlotLocked(
    const RegisterRequest& request, const SlotRequest& want,
    std::string* how) {
  if (request.rejoin()) return RejoinSlotLocked(request, want, how);
  Node* slot = nullptr;
  if (want.server) slot = SameAddressSlotLocked(request, want, how);
  if (slot == nullptr) slot = FreeSlotLocked(want, how);
  if (slot == nullptr) slot = DeadSlotLocked(request, want, how);
  return slot;
}

absl::StatusOr<SchedulerCore::Node*> SchedulerCore::RejoinSlotLocked(
    const RegisterRequest& request, const SlotRequest& want,
    std::string* how) {
  // A node of the running job re-registering with a restarted scheduler
  // takes back exactly its slot.
  const bool server = want.server;
  if (!want.requested_valid) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a rejoining ", server ? "server" : "worker", " must name its ",
        server ? "shard" : "rank", " in [0, ", want.n_ids, "), got ",
        want.requested));
  }
  Node& n = *want.wanted[0];
  if (n.registered && n.alive && n.address != request.address()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot rejoin as ", server ? "shard " : "worker rank ",
        want.requested, ": held by the live node ", n.Describe()));
  }
  *how = absl::StrCat("rejoined the running job at step ", request.step(),
                      " (the scheduler restarted; its state is rebuilt "
                      "from the re-registering nodes)");
  return &n;
}

SchedulerCore::Node* SchedulerCore::SameAddressSlotLocked(
    const RegisterRequest& request, const SlotRequest& want,
    std::string* how) const {
  // A server coming back on the same address takes its slot again.
  for (Node& n : *want.slots) {
    // Not a live node that asked for another shard: two shards that
    // advertise the same address are different nodes, not a restart.
    const bool other_shard =
        n.alive && want.requested >= 0 && n.shard != want.requested;
    if (n.registered && n.address == request.address() && !other_shard) {
      *how = n.alive ? "re-registered (same address)"
                     : "re-registered (same address) after its lease "
                       "expired";
      return &n;
    }
  }
  return nullptr;
}

SchedulerCore::Node* SchedulerCore::FreeSlotLocked(const SlotRequest& want,
                                                   std::string* how) const {
  // The requested shard (or rank), else the lowest free one.
  Node* slot = nullptr;
  for (Node* n : want.wanted) {
    if (slot == nullptr && !n->registered) slot = n;
  }
  if (slot == nullptr && !want.server) slot = HostGroupSlotLocked(want);
  if (slot == nullptr) {
    for (Node& n : *want.slots) {
      if (!n.registered) {
        slot = &n;
        break;
      }
    }
  }
  if (slot != nullptr) {
    *how = "registered";
    if (want.server && want.requested >= 0 &&
        slot->shard != want.requested) {
      absl::StrAppend(how, " (requested shard ", want.requested,
                      want.requested_valid ? " is taken)"
                                           : " is out of range)");
    }
  }
  return slot;
}

SchedulerCore::Node* SchedulerCore::HostGroupSlotLocked(
    const SlotRequest& want) const {
  // Hierarchical aggregation: groups of train.workers_per_host consecutive
  // worker slots (pp = tp = 1: slot index = dp rank) are hosts. A free slot
  // in a group that holds a worker of the same hostname, else one in an
  // empty group, else none (the caller takes the lowest free slot).
  const size_t w = WorkersPerHost(spec_);
  if (w <= 1 || want.hostname.empty()) return nullptr;
  std::vector<Node>& slots = *want.slots;
  Node* in_empty_group = nullptr;
  for (size_t g = 0; g + w <= slots.size(); g += w) {
    bool same_host = false, used = false;
    Node* free = nullptr;
    for (size_t i = g; i < g + w; ++i) {
      if (slots[i].registered) {
        used = true;
        same_host = same_host || slots[i].hostname == want.hostname;
      } else if (free == nullptr) {
        free = &slots[i];
      }
    }
    if (free == nullptr) continue;
    if (same_host) return free;
    if (!used && in_empty_group == nullptr) in_empty_group = free;
  }
  return in_empty_group;
}

SchedulerCore::Node* SchedulerCore::DeadSlotLocked(
    const RegisterRequest& request, const SlotRequest& want,
    std::string* how) const {
  // Every slot taken: replace a dead node; the requested slots first, then
  // one with the same address, then the lowest.
  Node* dead = nullptr;
  for (Node* n : want.wanted) {
    if (dead == nullptr && !n->alive) dead = n;
  }
  for (Node& n : *want.slots) {
    if (dead == nullptr && !n.alive && !request.address().empty() &&
        n.address == request.address()) {
      dead = &n;
    }
  }
  // A server of a running replicated job that asked for a shard takes
  // no other shard's slot: that shard's state is not on it.
  const bool only_wanted =
      want.server && replicated_ && want.requested_valid && state_ == RUNNING;
  for (Node& n : *want.slots) {
    if (dead == nullptr && !n.alive && !only_wanted) dead = &n;
  }
  if (dead != nullptr) {
    *how = absl::StrCat("replaces ", dead->Describe(),
                        ", whose lease had expired");
  }
  return dead;
}

absl::Status SchedulerCore::NoSlotLocked(const RegisterRequest& request,
                                         const SlotRequest& want,
                                         absl::Time now) {
  const bool server = want.server;
  std::vector<std::string> holders;
  for (const Node& n : *want.slots) holders.push_back(n.Describe());
  const LayoutConfig& l = spec_.layout();
  std::string elastic;
  if (!server && options_.elastic.max_dp > 0 && state_ == RUNNING) {
    // Elastic surplus: counted by instance for ElasticLocked.
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
      want.n_slots, " ",
      server ? absl::StrCat("(layout.num_shards=", l.num_shards(), ")")
             : absl::StrCat("(dp*pp*tp = ", l.dp(), "*", l.pp(), "*", l.tp(),
                            ")"),
      " and every slot is held by a live node: ", absl::StrJoin(holders, ", "),
      elastic));
  return elastic.empty() ? full : WithReason(full, ELASTIC_SURPLUS);
}

void SchedulerCore::TakeSlotLocked(Node* slot, const RegisterRequest& request,
                                   absl::Time now) {
  reassembling_ids_.erase(slot->node_id);
  slot->registered = true;
  slot->incarnation = ++last_incarnation_;
  slot->Reset();
  slot->address = request.address();
  slot->hostname = request.hostname();
  slot->checkpoints.steps.assign(request.checkpoint_steps().begin(),
                                 request.checkpoint_steps().end());
  slot->checkpoints.partition_version = request.checkpoint_partition_version();
  slot->checkpoints.relayout_steps.assign(
      request.relayout_checkpoint_steps().begin(),
      request.relayout_checkpoint_steps().end());
  slot->registered_at = now;
  slot->last_heartbeat = now;
  slot->lease_start = now;
  if (request.rejoin()) slot->step = request.step();
  if (request.rejoin() && slot->role == SERVER && replicated_) {
    // A restarted scheduler learns each shard's roles from its nodes: the
    // primary of the newest epoch.
    const int k = slot->shard;
    if (request.serving_primary() && request.epoch() >= epoch_[k]) {
      primary_[k] = SlotIndexLocked(*slot);
    }
    epoch_[k] = std::max(epoch_[k], request.epoch());
  }
}

void SchedulerCore::LogRegistrationLocked(Node* slot, const std::string& how,
                                          const RegisterRequest& request,
                                          Outbox* out) {
  const bool server = slot->role == SERVER;
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
  out->logs.push_back(absl::StrCat(slot->Describe(), " ", how, ": ", ranks));
  AddEventLocked(slot, absl::StrCat(how, ": ", ranks),
                 request.rejoin()       ? "keeps its assignment"
                 : state_ == ASSEMBLING ? "waiting for the job to assemble"
                                        : "given the slot's assignment");
}

void SchedulerCore::ServerJoinsRunningJobLocked(Node* slot,
                                                const std::string& how,
                                                Outbox* out) {
  Node* partner = replicated_ ? &PartnerLocked(*slot) : nullptr;
  if (partner != nullptr && partner->registered && partner->alive &&
      !partner->needs_snapshot) {
    // Replicated: the shard's other node serves it; this one becomes its
    // backup and gets a snapshot of its state. If this slot was the
    // primary (its old node died before its lease expired), the other
    // node is promoted in a new epoch.
    if (IsPrimaryLocked(*slot)) {
      PromoteLocked(*partner, absl::StrCat(slot->Describe(), " restarted"),
                    out);
    }
    slot->needs_snapshot = true;
    const std::string line = absl::StrCat(
        slot->Describe(), " becomes the backup of shard ", slot->shard,
        " (primary ", partner->Describe(), ")");
    out->logs.push_back(line);
    AddEventLocked(slot,
                   absl::StrCat("becomes the backup of shard ", slot->shard),
                   absl::StrCat("the primary ", partner->Describe(),
                                " sends it a snapshot and replicates to it"));
    return;
  }
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
             out, /*rollback=*/true);
}

}  // namespace lmps
