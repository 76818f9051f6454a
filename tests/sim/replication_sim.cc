#include "tests/sim/replication_sim.h"

#include <algorithm>
#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "tests/sim/sim_job.h"

namespace lmps {
namespace sim {

// A tiny model (1 layer, width 8, vocabulary 16) in chunks of <= 64
// elements, AdamW with clipping, SYNC, dp 2, 2 replicated shards.
JobSpec Spec() {
  JobSpec spec;
  spec.set_name("sim");
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(1);
  m->set_n_head(2);
  m->set_n_embd(8);
  m->set_block_size(4);
  m->set_vocab_size(16);
  spec.mutable_layout()->set_dp(kDp);
  spec.mutable_layout()->set_num_shards(kShards);
  spec.mutable_layout()->set_shard_backups(1);
  spec.mutable_train()->set_batch_size(4);
  spec.mutable_train()->set_steps(kSteps);
  spec.mutable_optimizer()->set_grad_clip(0.05f);
  spec.set_max_chunk_bytes(256);
  spec.set_max_message_bytes(1024);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

std::string HostOf(const std::string& address) {
  return address.substr(0, address.find('#'));
}

// Version, parameters and optimizer state of a shard, as bytes.
std::string StateBytes(const ParameterShard& shard) {
  std::string out = absl::StrCat(shard.version(), ":");
  for (const ChunkData& chunk : shard.Snapshot().chunks) {
    out.append(reinterpret_cast<const char*>(chunk.params.data()),
               4 * chunk.params.size());
    for (const auto& s : chunk.state) {
      out.append(reinterpret_cast<const char*>(s.data()), 4 * s.size());
    }
  }
  return out;
}


const char* PhaseName(Phase p) {
  switch (p) {
    case Phase::kPull: return "Pull";
    case Phase::kPush: return "Push";
    case Phase::kGradNorm: return "GradNorm";
    case Phase::kApply: return "Apply";
    case Phase::kDone: return "done";
  }
  return "?";
}

// ------------------------------------------------------------ the schedule

void Job::ScheduleFaults() {
  const absl::Time start = world_.now() + absl::Milliseconds(20);
  const absl::Duration window =
      world_.UniformDuration(absl::Milliseconds(50), absl::Milliseconds(600));
  heal_at_ = start + window + absl::Milliseconds(600);
  std::vector<std::string> servers, hosts = {kScheduler};
  for (int k = 0; k < kShards; ++k) {
    servers.push_back(absl::StrCat("server-", k));
    servers.push_back(absl::StrCat("backup-", k));
  }
  for (const std::string& s : servers) hosts.push_back(s);
  for (int r = 0; r < kDp; ++r) hosts.push_back(absl::StrCat("w", r));
  auto pick = [this](const std::vector<std::string>& v) {
    return v[world_.UniformInt(0, static_cast<int64_t>(v.size()) - 1)];
  };
  NetOptions net;
  net.drop_probability = world_.Chance(0.5) ? world_.Uniform() * 0.05 : 0;
  net.spike_probability = world_.Uniform() * 0.1;
  world_.At(start, [this, net] { world_.set_net(net); });
  faults_.push_back(absl::StrCat("drops ", net.drop_probability, ", spikes ",
                                 net.spike_probability));
  const int n = static_cast<int>(world_.UniformInt(1, 4));
  for (int i = 0; i < n; ++i) {
    const absl::Time at = start + world_.UniformDuration(absl::ZeroDuration(),
                                                         window);
    const std::string when = absl::FormatDuration(at - start);
    const double kind = world_.Uniform();
    if (kind < 0.4) {
      const std::string host = pick(servers);
      const absl::Duration restart =
          world_.UniformDuration(absl::Milliseconds(5), absl::Milliseconds(400));
      faults_.push_back(absl::StrCat("+", when, " kill ", host, ", restart ",
                                     absl::FormatDuration(restart), " later"));
      world_.At(at, [this, host, restart] {
        std::shared_ptr<ServerProc> p = Proc(current_[host]);
        if (p != nullptr) Exit(p, "SIGKILL (fault)", restart);
      });
    } else if (kind < 0.75) {
      const std::string a = pick(hosts);
      std::string b = pick(hosts);
      if (a == b) b = kScheduler == a ? servers[0] : kScheduler;
      const absl::Duration d =
          world_.UniformDuration(absl::Milliseconds(20), absl::Milliseconds(600));
      faults_.push_back(absl::StrCat("+", when, " partition ", a, " | ", b,
                                     " for ", absl::FormatDuration(d)));
      world_.At(at, [this, a, b] { world_.Cut(a, b); });
      world_.At(at + d, [this, a, b] { world_.Heal(a, b); });
    } else {
      const std::string host = pick(servers);
      const absl::Duration d =
          world_.UniformDuration(absl::Milliseconds(50), absl::Milliseconds(500));
      faults_.push_back(absl::StrCat("+", when, " stall ", host, " for ",
                                     absl::FormatDuration(d)));
      world_.At(at, [this, host, d] {
        stalled_until_[host] = std::max(stalled_until_[host], world_.now() + d);
      });
    }
  }
  world_.At(heal_at_, [this] {
    world_.HealAll();
    world_.set_net(NetOptions());
    Log("every fault healed");
  });
}

// -------------------------------------------------------------- invariants

void Job::CheckInvariants() {
  for (const auto& [address, p] : procs_) {
    if (!p->alive || p->rep == nullptr ||
        p->rep->role() != ReplicatedShard::Role::kPrimary) {
      continue;
    }
    const auto key = std::make_pair(p->shard, p->rep->epoch());
    auto [it, inserted] = primary_of_epoch_.emplace(key, address);
    if (!inserted && it->second != address) {
      Violation(absl::StrCat("two primaries of shard ", p->shard,
                             " in epoch ", key.second, ": ", it->second,
                             " and ", address));
    }
  }
  if (!failure_checked_ && core_->CurrentState() == FAILED) {
    failure_checked_ = true;
    CheckFailure();
  }
}

// The job failed: no live node the scheduler hears may hold a complete copy
// of a shard (it must have been promoted instead).
void Job::CheckFailure() {
  const JobStatus status = core_->Status();
  Log(absl::StrCat("the job FAILED: ", status.message()));
  std::map<std::string, NodeStatus> nodes;
  for (const NodeStatus& n : status.nodes()) nodes[n.node_id()] = n;
  for (int k = 0; k < kShards; ++k) {
    // Only the shard the failure is about.
    const std::string m = status.message();
    if (m.find(absl::StrCat("shard ", k, " lost")) == std::string::npos &&
        m.find(absl::StrCat("shard ", k, " restarted")) == std::string::npos) {
      continue;
    }
    bool has_primary = false;
    for (const auto& [address, p] : procs_) {
      if (p->alive && p->shard == k && p->rep != nullptr &&
          p->rep->role() == ReplicatedShard::Role::kPrimary) {
        has_primary = true;
      }
    }
    if (has_primary) continue;
    for (const auto& [address, p] : procs_) {
      if (!p->alive || p->shard != k || p->rep == nullptr) continue;
      auto n = nodes.find(p->node_id);
      const bool heard = n != nodes.end() && n->second.alive() &&
                         n->second.address() == address &&
                         !world_.IsCut(p->host, kScheduler) &&
                         !Stalled(p->host);
      const bool complete =
          p->rep->role() == ReplicatedShard::Role::kBackup &&
          !p->rep->awaiting_snapshot() && n != nodes.end() &&
          p->rep->epoch() == n->second.epoch() &&
          p->shard_state->version() >= acked_version_[k];
      if (heard && complete) {
        Violation(absl::StrCat("the job failed (", status.message(), ") while ",
                               address, " held a complete copy of shard ", k,
                               " (epoch ", p->rep->epoch(), ", version ",
                               p->shard_state->version(), ")"));
      }
    }
  }
}

std::string Job::Describe() {
  std::vector<std::string> parts;
  for (const auto& w : workers_) {
    parts.push_back(absl::StrCat(w->node_id, " step ", w->step, " ",
                                 PhaseName(w->phase),
                                 w->gave_up.empty() ? "" : " (gave up)"));
  }
  for (const auto& [address, p] : procs_) {
    if (!p->alive || p->rep == nullptr) continue;
    parts.push_back(absl::StrCat(
        address, " ",
        p->rep->role() == ReplicatedShard::Role::kPrimary ? "primary"
        : p->rep->role() == ReplicatedShard::Role::kBackup ? "backup"
                                                           : "fenced",
        " e", p->rep->epoch(), " v", p->shard_state->version(),
        p->rep->awaiting_snapshot() ? " awaiting" : "",
        p->rep->backup_lost() ? " backup-lost" : ""));
  }
  return absl::StrJoin(parts, "; ");
}

SimResult Job::Run() {
  spec_ = Spec();
  map_ = *ComputePartition(spec_.model(), kShards, spec_.max_chunk_bytes());
  SchedulerOptions so;
  so.spec = spec_;
  so.lease = kLease;
  so.assemble_timeout = absl::Seconds(30);
  so.log = [this](absl::string_view line) {
    Log(absl::StrCat("scheduler: ", line));
  };
  absl::StatusOr<std::unique_ptr<SchedulerCore>> core =
      SchedulerCore::Create(so, world_.clock());
  SimResult result;
  if (!core.ok()) {
    result.ok = false;
    result.violation = core.status().ToString();
    return result;
  }
  core_ = std::move(*core);
  auto tick = std::make_shared<std::function<void()>>();
  *tick = [this, tick] {
    core_->Tick();
    world_.After(kTick, *tick);
  };
  world_.After(kTick, *tick);
  for (int k = 0; k < kShards; ++k) {
    StartServer(absl::StrCat("server-", k), false, k);
    StartServer(absl::StrCat("backup-", k), true, k);
  }
  for (int r = 0; r < kDp; ++r) StartWorker(r);
  heal_at_ = world_.now();
  if (options_.faults && options_.scenario == Scenario::kRandom) {
    ScheduleFaults();
  } else if (options_.faults) {
    // Shard 0's primary cut off from its backup and from worker 1 (which
    // reaches only the backup) for 800 ms, from step ~3 on; isolated: from
    // the scheduler and worker 0 too.
    std::vector<std::string> cut = {"backup-0", "w1"};
    if (options_.scenario == Scenario::kSplitBrainPrimaryIsolated) {
      cut.push_back(kScheduler);
      cut.push_back("w0");
    }
    const absl::Time at = world_.now() + absl::Milliseconds(30);
    heal_at_ = at + absl::Milliseconds(800);
    for (const std::string& h : cut) {
      faults_.push_back(absl::StrCat("partition server-0 | ", h, " for 800ms"));
      world_.At(at, [this, h] { world_.Cut("server-0", h); });
    }
    world_.At(heal_at_, [this] { world_.HealAll(); });
  }
  // After the heal: every host runs a process again (the launcher's
  // restarts), and the job must end within kLiveness.
  world_.At(heal_at_ + absl::Milliseconds(1), [this] {
    stalled_until_.clear();
    for (auto& [host, address] : current_) {
      std::shared_ptr<ServerProc> p = Proc(address);
      if (p != nullptr && !p->alive && !Terminal()) {
        const bool backup = p->backup_flag;
        const int shard = p->shard;
        world_.After(absl::Milliseconds(1), [this, host = host, backup, shard] {
          std::shared_ptr<ServerProc> q = Proc(current_[host]);
          if (q != nullptr && !q->alive && !Terminal()) {
            StartServer(host, backup, shard);
          }
        });
      }
    }
  });
  auto ended = [this] {
    if (!violation_.empty()) return true;
    const JobState s = core_->CurrentState();
    return s == FINISHED || (s == FAILED && failure_checked_);
  };
  world_.RunUntil(heal_at_ + kLiveness, ended, [this] { CheckInvariants(); });
  const JobState state = core_->CurrentState();
  if (violation_.empty() && state != FINISHED && state != FAILED) {
    Violation(absl::StrCat("liveness: the job is still ",
                           JobState_Name(state), " ",
                           absl::FormatDuration(kLiveness),
                           " after every fault healed: ", Describe()));
  }
  for (const auto& w : workers_) {
    if (violation_.empty() && !w->gave_up.empty() && state != FAILED) {
      Violation(absl::StrCat("liveness: ", w->node_id, " gave up: ",
                             w->gave_up));
    }
  }
  if (violation_.empty() && state == FINISHED) {
    // Per shard the most advanced live copy (an old primary cut off from
    // the scheduler may still think it is one; the job may end before a
    // backup whose primary died at the end is promoted).
    std::map<int, int64_t> best;
    for (const auto& [address, p] : procs_) {
      if (!p->alive || p->rep == nullptr || p->rep->awaiting_snapshot() ||
          p->rep->role() == ReplicatedShard::Role::kFenced) {
        continue;
      }
      const int64_t v = p->shard_state->version();
      if (final_states_.count(p->shard) == 0 || v > best[p->shard]) {
        best[p->shard] = v;
        final_states_[p->shard] = StateBytes(*p->shard_state);
      }
    }
    for (int k = 0; k < kShards; ++k) {
      if (final_states_.count(k) == 0) {
        Violation(absl::StrCat("the job finished without a copy of shard ", k));
      } else if (!reference_.empty() &&
                 final_states_[k] != reference_.at(k)) {
        Violation(absl::StrCat("shard ", k, "'s final state differs from the "
                               "fault-free run's"));
      }
    }
  }
  result.ok = violation_.empty();
  result.violation = violation_;
  if (!result.ok) {
    result.violation += absl::StrCat("\n    state: ", Describe(),
                                     "\n    last events:\n      ",
                                     absl::StrJoin(log_, "\n      "));
  }
  result.outcome = state == FINISHED ? "finished"
                   : state == FAILED ? "rolled back"
                                     : JobState_Name(state);
  result.faults = faults_;
  result.events = world_.events_run();
  result.sim_seconds =
      absl::ToDoubleSeconds(world_.now() - absl::FromUnixSeconds(1700000000));
  return result;
}


SimResult RunSeed(const SimOptions& options,
                  const std::map<int, std::string>& reference) {
  Job job(options, reference);
  return job.Run();
}
std::map<int, std::string> RunReference() {
  SimOptions o;
  o.seed = 0;
  o.faults = false;
  static const std::map<int, std::string> kNone;
  Job job(o, kNone);
  SimResult r = job.Run();
  if (!r.ok) {
    std::fprintf(stderr, "the fault-free reference run failed: %s\n",
                 r.violation.c_str());
    return {};
  }
  return job.FinalStates();
}

}  // namespace sim
}  // namespace lmps
