// SimWorld: the deterministic world of the replication simulation
// (tests/sim/replication_sim.h): one seed drives a simulated clock, an event
// queue and a network of named hosts that delays, reorders, drops and
// partitions messages. Nothing here reads the real clock, opens a socket or
// starts a thread, so a seed replays exactly.
//
// Events run in (time, insertion order). A message between hosts arrives
// after a random delay (occasionally a long spike, which reorders it behind
// later messages) unless the hosts are partitioned or the dice drop it.
//
// Thread-safety: none; one thread drives a world.
#ifndef LMPS_TESTS_SIM_SIM_WORLD_H_
#define LMPS_TESTS_SIM_SIM_WORLD_H_

#include <cstdint>
#include <functional>
#include <map>
#include <queue>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "server/scheduler/clock.h"

namespace lmps {
namespace sim {

struct NetOptions {
  absl::Duration min_delay = absl::Microseconds(100);
  absl::Duration max_delay = absl::Milliseconds(2);
  double spike_probability = 0;  // a delay up to max_spike instead
  absl::Duration max_spike = absl::Milliseconds(100);
  double drop_probability = 0;
};

class SimWorld {
 public:
  explicit SimWorld(uint64_t seed);

  absl::Time now() const { return now_; }
  // An lmps::Clock reading the simulated time.
  Clock* clock() { return &clock_; }

  // Randomness, all from the seed.
  double Uniform();                        // [0, 1)
  int64_t UniformInt(int64_t lo, int64_t hi);  // [lo, hi]
  bool Chance(double p) { return Uniform() < p; }
  absl::Duration UniformDuration(absl::Duration lo, absl::Duration hi);

  void At(absl::Time t, std::function<void()> fn);
  void After(absl::Duration d, std::function<void()> fn) {
    At(now_ + d, std::move(fn));
  }
  // Runs events until `done()` holds after an event, the queue is empty or
  // the next event lies past `until`. `after_event` runs after each event.
  // Returns false when it stopped because of `until` or an empty queue.
  bool RunUntil(absl::Time until, const std::function<bool()>& done,
                const std::function<void()>& after_event);

  // The network.
  void set_net(const NetOptions& options) { net_ = options; }
  const NetOptions& net() const { return net_; }
  void Cut(const std::string& a, const std::string& b);
  void Heal(const std::string& a, const std::string& b);
  void HealAll() { cuts_.clear(); }
  bool IsCut(const std::string& a, const std::string& b) const;
  // A message from host `from` to host `to`: `deliver` runs when it
  // arrives, unless the hosts are cut off from each other or it is dropped.
  // Returns false when it will not arrive.
  bool Send(const std::string& from, const std::string& to,
            std::function<void()> deliver);
  // For a synchronous call between hosts (a forwarded operation): false
  // when cut off or dropped.
  bool Reachable(const std::string& from, const std::string& to);

  int64_t events_run() const { return events_run_; }

 private:
  class SimClock final : public Clock {
   public:
    explicit SimClock(const SimWorld* w) : w_(w) {}
    absl::Time Now() override { return w_->now(); }

   private:
    const SimWorld* const w_;
  };
  struct Event {
    absl::Time time;
    uint64_t seq;
    std::function<void()> fn;
  };
  struct Later {
    bool operator()(const Event& a, const Event& b) const {
      return a.time != b.time ? a.time > b.time : a.seq > b.seq;
    }
  };
  absl::Duration Delay();

  std::mt19937_64 rng_;
  absl::Time now_;
  SimClock clock_;
  uint64_t next_seq_ = 0;
  std::priority_queue<Event, std::vector<Event>, Later> queue_;
  NetOptions net_;
  std::set<std::pair<std::string, std::string>> cuts_;
  int64_t events_run_ = 0;
};

}  // namespace sim
}  // namespace lmps

#endif  // LMPS_TESTS_SIM_SIM_WORLD_H_
