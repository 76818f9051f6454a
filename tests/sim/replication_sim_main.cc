// Runs the replication simulation (tests/sim/replication_sim.h) over many
// seeds and reports the first seed that breaks an invariant, with the one
// command that replays it.
//
//   replication_sim_test [--seeds=N] [--first_seed=S] [--seed=S --verbose]
//                        [--mutation=none|lying_link|self_promotion]
//                        [--expect_violation]
//
// Exit status 0 when every seed held every invariant (with
// --expect_violation: when some seed broke one, which shows a deliberately
// broken environment is caught).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include "absl/synchronization/mutex.h"
#include "tests/sim/replication_sim.h"

namespace {

bool Flag(const char* arg, const char* name, std::string* value) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0) return false;
  if (arg[n] == '=') {
    *value = arg + n + 1;
    return true;
  }
  if (arg[n] == '\0') {
    *value = "true";
    return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  using lmps::sim::Mutation;
  // The simulated processes share one address space: a primary's forward
  // runs its backup's locks inside its own, and after a promotion the other
  // way round. Separate processes in reality, so not a lock-order cycle.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  uint64_t first = 1, seeds = 2000;
  bool verbose = false, expect_violation = false;
  Mutation mutation = Mutation::kNone;
  std::string mutation_name = "none";
  for (int i = 1; i < argc; ++i) {
    std::string v;
    if (Flag(argv[i], "--seeds", &v)) {
      seeds = std::strtoull(v.c_str(), nullptr, 10);
    } else if (Flag(argv[i], "--first_seed", &v)) {
      first = std::strtoull(v.c_str(), nullptr, 10);
    } else if (Flag(argv[i], "--seed", &v)) {
      first = std::strtoull(v.c_str(), nullptr, 10);
      seeds = 1;
    } else if (Flag(argv[i], "--verbose", &v)) {
      verbose = v != "false";
    } else if (Flag(argv[i], "--expect_violation", &v)) {
      expect_violation = v != "false";
    } else if (Flag(argv[i], "--mutation", &v)) {
      mutation_name = v;
      if (v == "none") {
        mutation = Mutation::kNone;
      } else if (v == "lying_link") {
        mutation = Mutation::kLyingLink;
      } else if (v == "self_promotion") {
        mutation = Mutation::kSelfPromotion;
      } else {
        std::fprintf(stderr, "unknown --mutation=%s (none, lying_link, "
                             "self_promotion)\n", v.c_str());
        return 2;
      }
    } else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  const std::map<int, std::string> reference = lmps::sim::RunReference();
  if (reference.empty()) return 1;
  // The fixed split-brain schedules first.
  for (auto scenario : {lmps::sim::Scenario::kSplitBrainPrimaryHearsScheduler,
                        lmps::sim::Scenario::kSplitBrainPrimaryIsolated}) {
    if (expect_violation) break;
    lmps::sim::SimOptions o;
    o.seed = first;
    o.scenario = scenario;
    o.mutation = mutation;
    o.verbose = verbose;
    const lmps::sim::SimResult r = lmps::sim::RunSeed(o, reference);
    std::printf("split-brain schedule (%s): %s, %s\n",
                scenario == lmps::sim::Scenario::kSplitBrainPrimaryIsolated
                    ? "the primary cut off from everyone"
                    : "the primary hears only the scheduler",
                r.ok ? "every invariant held" : r.violation.c_str(),
                r.outcome.c_str());
    if (!r.ok) return 1;
  }
  std::map<std::string, int> outcomes;
  int64_t events = 0;
  double sim_seconds = 0;
  uint64_t failed = 0, ran = 0;
  for (uint64_t seed = first; seed < first + seeds; ++seed) {
    lmps::sim::SimOptions o;
    o.seed = seed;
    o.mutation = mutation;
    o.verbose = verbose;
    const lmps::sim::SimResult r = lmps::sim::RunSeed(o, reference);
    ++ran;
    ++outcomes[r.outcome];
    events += r.events;
    sim_seconds += r.sim_seconds;
    if (r.ok) continue;
    ++failed;
    if (failed == 1) {
      std::printf("seed %llu broke an invariant: %s\n  faults:",
                  static_cast<unsigned long long>(seed), r.violation.c_str());
      for (const std::string& f : r.faults) std::printf(" [%s]", f.c_str());
      std::printf("\n  reproduce: bazel run //tests/sim:replication_sim_test "
                  "-- --seed=%llu --mutation=%s --verbose\n",
                  static_cast<unsigned long long>(seed), mutation_name.c_str());
    }
    if (failed > 1) {
      std::printf("seed %llu also broke one: %s\n",
                  static_cast<unsigned long long>(seed),
                  r.violation.substr(0, r.violation.find('\n')).c_str());
    }
    if (expect_violation) break;
  }
  const double wall = std::chrono::duration<double>(
                          std::chrono::steady_clock::now() - start)
                          .count();
  std::printf("%llu seeds (mutation %s): %llu broke an invariant;",
              static_cast<unsigned long long>(ran), mutation_name.c_str(),
              static_cast<unsigned long long>(failed));
  for (const auto& [outcome, n] : outcomes) {
    std::printf(" %s %d,", outcome.c_str(), n);
  }
  std::printf(" %lld events, %.0f s simulated, %.1f s wall\n",
              static_cast<long long>(events), sim_seconds, wall);
  if (expect_violation) return failed > 0 ? 0 : 1;
  return failed == 0 ? 0 : 1;
}
