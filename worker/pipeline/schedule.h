// Pipeline schedules: the order in which one stage runs the forward (F) and
// backward (B) passes of a step's m micro-batches.
//
//   GPIPE        F0 F1 ... F(m-1) B0 B1 ... B(m-1). Every micro-batch's
//                activations are alive at the end of the forwards: m.
//   ONE_F_ONE_B  PipeDream-Flush (Narayanan et al., 2021): stage s of p runs
//                w = min(p - s - 1, m) warm-up forwards, then alternates
//                F(w + i) B(i) while forwards remain, then the remaining
//                backwards. At most w + 1 <= p - s micro-batches are alive.
// Both have the same bubble: (p - 1) / (m + p - 1) of a stage's time idle
// when every F and B of a stage takes the same time and B = 2 F.
//
// Backwards run in micro-batch order on every stage, forwards too, and a
// stage's F(i) only needs stage s - 1's F(i), its B(i) stage s + 1's B(i):
// with sends that never block (worker/peer) neither schedule deadlocks
// (tested by simulation).
//
// Thread-safety: pure functions.
#ifndef LMPS_WORKER_PIPELINE_SCHEDULE_H_
#define LMPS_WORKER_PIPELINE_SCHEDULE_H_

#include <vector>

#include "proto/lmps.pb.h"

namespace lmps {

struct PipelineOp {
  bool forward = true;
  int micro_batch = 0;
};

// The ops of stage `stage` in [0, stages) for m >= 1 micro-batches.
std::vector<PipelineOp> StageSchedule(PipelineSchedule schedule, int stage,
                                      int stages, int m);

// The largest number of micro-batches whose forward ran and backward did
// not yet, over the ops (the activation slots the stage needs).
int MaxLiveMicroBatches(const std::vector<PipelineOp>& ops);

// The idle fraction of a perfectly balanced pipeline: (p - 1) / (m + p - 1).
double IdealBubbleFraction(int stages, int m);

}  // namespace lmps

#endif  // LMPS_WORKER_PIPELINE_SCHEDULE_H_
