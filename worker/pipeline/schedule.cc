#include "worker/pipeline/schedule.h"

#include <algorithm>

namespace lmps {

std::vector<PipelineOp> StageSchedule(PipelineSchedule schedule, int stage,
                                      int stages, int m) {
  std::vector<PipelineOp> ops;
  ops.reserve(2 * m);
  if (schedule == GPIPE) {
    for (int i = 0; i < m; ++i) ops.push_back({true, i});
    for (int i = 0; i < m; ++i) ops.push_back({false, i});
    return ops;
  }
  const int warmup = std::min(stages - stage - 1, m);
  int next_f = 0, next_b = 0;
  for (; next_f < warmup; ++next_f) ops.push_back({true, next_f});
  while (next_f < m) {
    ops.push_back({true, next_f++});
    ops.push_back({false, next_b++});
  }
  while (next_b < m) ops.push_back({false, next_b++});
  return ops;
}

int MaxLiveMicroBatches(const std::vector<PipelineOp>& ops) {
  int live = 0, max_live = 0;
  for (const PipelineOp& op : ops) {
    live += op.forward ? 1 : -1;
    max_live = std::max(max_live, live);
  }
  return max_live;
}

double IdealBubbleFraction(int stages, int m) {
  return static_cast<double>(stages - 1) / (m + stages - 1);
}

}  // namespace lmps
