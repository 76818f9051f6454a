#include "common/model/learning_rate.h"

#include <algorithm>
#include <cmath>

namespace lmps {

double LearningRate(const OptimizerConfig& c, int64_t step,
                    int64_t total_steps) {
  const double lr = c.lr();
  const double min_lr = c.min_lr();
  const int64_t warmup = std::max<int64_t>(0, c.warmup_steps());
  if (step < warmup) {
    return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  }
  const double span =
      static_cast<double>(std::max<int64_t>(1, total_steps - warmup));
  const double p =
      std::clamp(static_cast<double>(step - warmup) / span, 0.0, 1.0);
  return min_lr + 0.5 * (1.0 + std::cos(M_PI * p)) * (lr - min_lr);
}

}  // namespace lmps
