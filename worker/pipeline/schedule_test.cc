#include "worker/pipeline/schedule.h"

#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

// Runs every stage's ops in order with blocking receives (F(s, i) needs
// F(s - 1, i); B(s, i) needs F(s, i) and B(s + 1, i)) and non-blocking
// sends; returns false on a deadlock. Also counts the time steps with unit
// F and B costs (B = 2 F), to check the bubble.
bool Simulate(PipelineSchedule kind, int p, int m, double* bubble) {
  std::vector<std::vector<PipelineOp>> ops(p);
  for (int s = 0; s < p; ++s) ops[s] = StageSchedule(kind, s, p, m);
  std::vector<size_t> pc(p, 0);
  std::vector<std::vector<double>> f_done(p, std::vector<double>(m, -1)),
      b_done(p, std::vector<double>(m, -1));
  std::vector<double> clock(p, 0), busy(p, 0);
  bool progress = true;
  while (progress) {
    progress = false;
    for (int s = 0; s < p; ++s) {
      while (pc[s] < ops[s].size()) {
        const PipelineOp op = ops[s][pc[s]];
        const int i = op.micro_batch;
        double ready = clock[s];
        if (op.forward) {
          if (s > 0) {
            if (f_done[s - 1][i] < 0) break;
            ready = std::max(ready, f_done[s - 1][i]);
          }
          clock[s] = ready + 1;
          busy[s] += 1;
          f_done[s][i] = clock[s];
        } else {
          if (f_done[s][i] < 0) return false;  // backward before forward
          if (s < p - 1) {
            if (b_done[s + 1][i] < 0) break;
            ready = std::max(ready, b_done[s + 1][i]);
          }
          clock[s] = ready + 2;
          busy[s] += 2;
          b_done[s][i] = clock[s];
        }
        ++pc[s];
        progress = true;
      }
    }
  }
  double end = 0;
  for (int s = 0; s < p; ++s) {
    if (pc[s] != ops[s].size()) return false;
    end = std::max(end, clock[s]);
  }
  *bubble = 1.0 - busy[0] / end;
  return true;
}

TEST(ScheduleTest, EveryMicroBatchOnceForwardBeforeBackward) {
  for (PipelineSchedule kind : {GPIPE, ONE_F_ONE_B}) {
    for (int p = 1; p <= 4; ++p) {
      for (int m = 1; m <= 8; ++m) {
        for (int s = 0; s < p; ++s) {
          std::vector<PipelineOp> ops = StageSchedule(kind, s, p, m);
          ASSERT_EQ(ops.size(), 2u * m);
          std::set<int> fwd, bwd;
          int next_f = 0, next_b = 0;
          for (const PipelineOp& op : ops) {
            if (op.forward) {
              EXPECT_EQ(op.micro_batch, next_f++);
              fwd.insert(op.micro_batch);
            } else {
              EXPECT_EQ(op.micro_batch, next_b++);
              EXPECT_TRUE(fwd.count(op.micro_batch));
              bwd.insert(op.micro_batch);
            }
          }
          EXPECT_EQ(fwd.size(), static_cast<size_t>(m));
          EXPECT_EQ(bwd.size(), static_cast<size_t>(m));
        }
      }
    }
  }
}

TEST(ScheduleTest, OneFOneBKeepsAtMostPpMicroBatchesAlive) {
  for (int p = 1; p <= 4; ++p) {
    for (int m = 1; m <= 8; ++m) {
      for (int s = 0; s < p; ++s) {
        const int live = MaxLiveMicroBatches(StageSchedule(ONE_F_ONE_B, s, p, m));
        EXPECT_LE(live, p - s) << "p=" << p << " m=" << m << " s=" << s;
        EXPECT_LE(live, p);
        EXPECT_EQ(live, std::min(m, p - s));
        EXPECT_EQ(MaxLiveMicroBatches(StageSchedule(GPIPE, s, p, m)), m);
      }
    }
  }
}

TEST(ScheduleTest, NoDeadlockAndTheBubbleOfTheFormula) {
  for (PipelineSchedule kind : {GPIPE, ONE_F_ONE_B}) {
    for (int p = 1; p <= 4; ++p) {
      for (int m = 1; m <= 8; ++m) {
        double bubble = 0;
        ASSERT_TRUE(Simulate(kind, p, m, &bubble))
            << "deadlock: " << PipelineSchedule_Name(kind) << " p=" << p
            << " m=" << m;
        EXPECT_NEAR(bubble, IdealBubbleFraction(p, m), 1e-9)
            << PipelineSchedule_Name(kind) << " p=" << p << " m=" << m;
      }
    }
  }
}

}  // namespace
}  // namespace lmps
