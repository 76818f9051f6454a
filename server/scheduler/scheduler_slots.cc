// SchedulerCore: the node table. servers_ holds one slot per shard (and,
// replicated, one backup slot per shard), workers_ one per worker rank; a
// slot keeps its node id and ranks whoever holds it. Lookups, the
// descriptions of missing and dead nodes, and a replicated shard's two slots.
#include "server/scheduler/scheduler_core.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/scheduler/scheduler_core_internal.h"

namespace lmps {

using scheduler_internal::Plural;
using scheduler_internal::Seconds;

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

}  // namespace lmps
