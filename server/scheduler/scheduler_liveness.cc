// SchedulerCore: liveness. Heartbeats (lease renewal, progress, errors,
// fencing of an older incarnation, the replication part of a server's
// answer), expired leases and the failover decisions they lead to in a
// replicated job: promote the backup, wait a lease for its complete copy, or
// fail the job for a rollback when a shard lost both copies.
#include "server/scheduler/scheduler_core.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model/job_spec.h"
#include "server/scheduler/scheduler_core_internal.h"

namespace lmps {

using scheduler_internal::Seconds;
using scheduler_internal::Terminal;

absl::StatusOr<HeartbeatResponse> SchedulerCore::Heartbeat(
    const HeartbeatRequest& request) {
  Outbox out;
  absl::StatusOr<HeartbeatResponse> response;
  {
    absl::MutexLock lock(&mu_);
    response = HeartbeatLocked(request, &out);
  }
  Flush(&out);
  return response;
}

absl::StatusOr<HeartbeatResponse> SchedulerCore::HeartbeatLocked(
    const HeartbeatRequest& request, Outbox* out) {
  const absl::Time now = clock_->Now();
  AdvanceLocked(now, out);
  Node* n = FindLocked(request.node_id());
  if (n == nullptr && reassembling_ids_.count(request.node_id()) > 0) {
    out->logs.push_back(absl::StrCat(
        "a heartbeat of ", request.node_id(), " (step ", request.step(),
        ") from the job before its re-assembly: told to register again"));
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
    out->logs.push_back(absl::StrCat(
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
    out->logs.push_back(absl::StrCat(
        n->Describe(), " heartbeats again after its lease expired; alive"));
    AddEventLocked(n, "heartbeats again after its lease expired",
                   "marked alive");
  }
  HeartbeatResponse r;
  if (replicated_ && n->role == SERVER && !request.starting()) {
    ReplicationHeartbeatLocked(n, request, now, &r, out);
  }
  if (n->role == WORKER && resize_phase_ != ResizePhase::kNone &&
      resize_plan_.ahead == 0) {
    r.set_peers_lost(true);
  }
  RecordProgressLocked(n, request, now, out);
  if (state_ == RUNNING) {
    bool all_done = true;
    for (const Node& w : workers_) all_done = all_done && w.done;
    if (all_done) {
      SetStateLocked(FINISHED, "every worker reported done", out);
    }
  }
  r.set_state(state_);
  if (state_ == FAILED) r.set_message(failure_);
  n->last_told = state_;
  return r;
}

void SchedulerCore::RecordProgressLocked(Node* n,
                                         const HeartbeatRequest& request,
                                         absl::Time now, Outbox* out) {
  n->step = request.step();
  n->loss = request.loss();
  n->eval_loss = request.eval_loss();
  n->tokens_per_second = request.tokens_per_second();
  n->push_wire_bytes = request.push_wire_bytes();
  n->pull_wire_bytes = request.pull_wire_bytes();
  n->lr = request.lr();
  if (request.done() && !n->done) {
    n->done = true;
    out->logs.push_back(
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
                 out);
    }
  }
}

void SchedulerCore::ExpireLeasesLocked(absl::Time now, Outbox* out) {
  for (std::vector<Node>* slots : {&servers_, &workers_}) {
    for (Node& n : *slots) {
      if (n.registered && n.alive && now - n.lease_start > options_.lease) {
        if (ExpireLeaseLocked(n, now, out)) return;
      }
    }
  }
}

bool SchedulerCore::ExpireLeaseLocked(Node& n, absl::Time now, Outbox* out) {
  int lost_shard = -1;
  n.alive = false;
  n.down_since = now;
  const std::string event = absl::StrCat(
      "missed its heartbeat lease of ", Seconds(options_.lease),
      " (last heartbeat ", Seconds(now - n.last_heartbeat), " ago)");
  std::string action = "marked dead; its slot is open for a replacement";
  if (n.role == WORKER && WorkersNeedPeers(spec_) && regroup_why_.empty()) {
    regroup_why_ = absl::StrCat(n.Describe(), " ", event);
    absl::StrAppend(&action, layout_->pp() * layout_->tp() > 1
                                 ? "; its pipeline replica regroups"
                                 : "; the job regroups (its ring peers need it)");
  }
  if (replicated_ && n.role == SERVER) {
    lost_shard = FailoverLocked(n, now, &action, out);
  }
  out->logs.push_back(
      absl::StrCat("node ", n.Describe(), " ", event, "; ", action));
  AddEventLocked(&n, event, action);
  if (lost_shard < 0) return false;
  const std::string message = absl::StrCat(
      "shard ", lost_shard, " lost both copies (its primary ", n.Describe(),
      " died while its backup held no complete copy); rolling back: every "
      "node stops, and the restarted job resumes from the latest checkpoint "
      "every shard holds");
  FailLocked(message,
             absl::FailedPreconditionError(
                 absl::StrCat("the job FAILED: ", message)),
             out, /*rollback=*/true);
  return true;
}

int SchedulerCore::FailoverLocked(Node& n, absl::Time now,
                                  std::string* action, Outbox* out) {
  Node& partner = PartnerLocked(n);
  const bool partner_up = partner.registered && partner.alive;
  if (IsPrimaryLocked(n) && partner_up && partner.needs_snapshot) {
    // Its last report may lag behind a snapshot it received: promoted if
    // its next heartbeat shows a complete copy.
    orphaned_since_[n.shard] = now;
    absl::StrAppend(action, "; its backup ", partner.Describe(),
                    " has shown no complete copy of shard ", n.shard,
                    " yet: it takes over if it shows one within a lease, "
                    "else the shard lost both copies");
  } else if (IsPrimaryLocked(n) && !partner_up) {
    absl::StrAppend(action, "; its backup ", partner.Describe(),
                    " is down, so shard ", n.shard, " lost both copies");
    return n.shard;
  } else if (IsPrimaryLocked(n)) {
    PromoteLocked(partner, absl::StrCat(n.Describe(), "'s lease expired"),
                  out);
    absl::StrAppend(action, "; its backup ", partner.Describe(),
                    " takes over shard ", n.shard, " in epoch ",
                    epoch_[n.shard],
                    " (told in its next heartbeat): no step is lost");
  } else if (partner_up) {
    absl::StrAppend(action, "; the primary of shard ", n.shard,
                    " serves alone until a new backup registers");
  }
  return -1;
}

void SchedulerCore::CheckOrphanedShardsLocked(absl::Time now, Outbox* out) {
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

}  // namespace lmps
