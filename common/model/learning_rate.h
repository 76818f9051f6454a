// The learning-rate schedule: linear warm-up, then cosine decay to min_lr.
// The shards apply it (server/optimizer.h); workers record it in their step
// log.
//
// Learning rate for the update with 0-based index `step` (the update that
// turns version `step` into version `step + 1`), W = warmup_steps,
// S = total_steps:
//   step < W:  lr * (step + 1) / W                  (lr/W, 2 lr/W, ..., lr)
//   else:      p  = clamp((step - W) / max(1, S - W), 0, 1)
//              min_lr + 0.5 * (1 + cos(pi * p)) * (lr - min_lr)
// so the first update after warm-up uses lr and the cosine reaches min_lr at
// step S (the last update, S - 1, is just above min_lr).
//
// Thread-safety: a pure function.
#ifndef LMPS_COMMON_MODEL_LEARNING_RATE_H_
#define LMPS_COMMON_MODEL_LEARNING_RATE_H_

#include <cstdint>

#include "proto/lmps.pb.h"

namespace lmps {

double LearningRate(const OptimizerConfig& config, int64_t step,
                    int64_t total_steps);

}  // namespace lmps

#endif  // LMPS_COMMON_MODEL_LEARNING_RATE_H_
