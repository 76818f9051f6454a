#include "tests/sim/sim_world.h"

#include <algorithm>

namespace lmps {
namespace sim {

SimWorld::SimWorld(uint64_t seed)
    : rng_(seed), now_(absl::FromUnixSeconds(1700000000)), clock_(this) {}

double SimWorld::Uniform() {
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
}

int64_t SimWorld::UniformInt(int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng_);
}

absl::Duration SimWorld::UniformDuration(absl::Duration lo, absl::Duration hi) {
  return lo + absl::Nanoseconds(UniformInt(0, absl::ToInt64Nanoseconds(hi - lo)));
}

void SimWorld::At(absl::Time t, std::function<void()> fn) {
  queue_.push(Event{std::max(t, now_), next_seq_++, std::move(fn)});
}

bool SimWorld::RunUntil(absl::Time until, const std::function<bool()>& done,
                        const std::function<void()>& after_event) {
  while (!queue_.empty()) {
    if (queue_.top().time > until) return false;
    Event e = queue_.top();
    queue_.pop();
    now_ = e.time;
    e.fn();
    ++events_run_;
    if (after_event) after_event();
    if (done()) return true;
  }
  return false;
}

void SimWorld::Cut(const std::string& a, const std::string& b) {
  cuts_.insert(std::minmax(a, b));
}

void SimWorld::Heal(const std::string& a, const std::string& b) {
  cuts_.erase(std::minmax(a, b));
}

bool SimWorld::IsCut(const std::string& a, const std::string& b) const {
  return cuts_.count(std::minmax(a, b)) > 0;
}

absl::Duration SimWorld::Delay() {
  if (Chance(net_.spike_probability)) {
    return UniformDuration(net_.max_delay, net_.max_spike);
  }
  return UniformDuration(net_.min_delay, net_.max_delay);
}

bool SimWorld::Send(const std::string& from, const std::string& to,
                    std::function<void()> deliver) {
  if (!Reachable(from, to)) return false;
  After(Delay(), std::move(deliver));
  return true;
}

bool SimWorld::Reachable(const std::string& from, const std::string& to) {
  if (from != to && IsCut(from, to)) return false;
  return !Chance(net_.drop_probability);
}

}  // namespace sim
}  // namespace lmps
