// ParameterShard in BOUNDED_STALENESS and ASYNC (shard_test.cc has SYNC).
#include "server/shard_test_util.h"

namespace lmps {
namespace shard_test {
namespace {

// ---------------------------------------------------------------------------
// Consistency modes.
// ---------------------------------------------------------------------------


// Ranks pushing ahead within the bound and arriving in any order: every
// step is still the rank-ordered average of every replica, applied in step
// order, so the parameters equal SYNC's for the same gradients, bit for bit.
TEST(ShardTest, BoundedStalenessAggregatesEveryStepExactlyAsSync) {
  for (int s : {0, 2}) {
    SCOPED_TRACE(s);
    JobSpec sync_spec = Spec(2, 2, ADAMW);
    sync_spec.mutable_optimizer()->set_grad_clip(0.05f);  // clipping active
    auto sync = MakeShard(Options(sync_spec, 1));
    auto ssp = MakeShard(
        Options(WithMode(sync_spec, BOUNDED_STALENESS, s), 1));
    ASSERT_NE(ssp, nullptr);
    for (int64_t t = 0; t < 3; ++t) {
      ASSERT_TRUE(sync->Push(Stream(*sync, 0, t)).ok());
      ASSERT_TRUE(sync->Push(Stream(*sync, 1, t)).ok());
      SyncStep(sync.get(), t);
    }
    // Rank 1 runs s steps ahead of rank 0.
    for (int64_t t = 0; t < 3; ++t) {
      for (int64_t u = t; u <= std::min<int64_t>(t + s, 2); ++u) {
        ASSERT_TRUE(ssp->Push(Stream(*ssp, 1, u)).ok()) << u;
      }
      ASSERT_TRUE(ssp->Push(Stream(*ssp, 0, t)).ok());
      SyncStep(ssp.get(), t);
    }
    EXPECT_EQ(Bytes(ssp->Snapshot()), Bytes(sync->Snapshot()));
    EXPECT_EQ(ssp->max_staleness_seen(), s);
    EXPECT_EQ(sync->max_staleness_seen(), 0);
    EXPECT_EQ(ssp->replica_clocks(), (std::vector<int64_t>{3, 3}));
    EXPECT_EQ(ssp->step_clock(), 3);
  }
}

// The SSP read rule: a pull for step t waits until version >= t - s, i.e.
// until the slowest replica completed t - s steps; one that would exceed the
// bound blocks, and times out naming the slow replica.
TEST(ShardTest, BoundedStalenessPullWaitsForTheSlowestReplica) {
  std::vector<std::string> log;
  ShardOptions o = Options(WithMode(Spec(2, 1, SGD), BOUNDED_STALENESS, 2), 0);
  o.log = [&](const std::string& line) { log.push_back(line); };
  // This run ends after step 2 of a 4-step job (so step 3 is a step of the
  // job, refused only by the staleness bound).
  o.spec.mutable_train()->set_steps(4);
  o.spec.mutable_train()->set_stop_after_step(3);
  auto shard = MakeShard(o);
  ASSERT_NE(shard, nullptr);
  const uint64_t pv = shard->partition().version();

  // Rank 0 (fast) may push steps 0..2 at version 0, not step 3.
  for (int64_t t = 0; t < 3; ++t) {
    ASSERT_TRUE(shard->Push(Stream(*shard, 0, t)).ok()) << t;
  }
  ExpectRejected(shard.get(), Stream(*shard, 0, 3),
                 absl::StatusCode::kFailedPrecondition,
                 "more than the staleness bound 2 ahead");
  EXPECT_EQ(shard->replica_clocks(), (std::vector<int64_t>{3, 0}));
  EXPECT_EQ(shard->max_staleness_seen(), 2);

  // Steps up to s are served at version 0 without waiting.
  PullRequest pull = PullFor(2);
  pull.set_partition_version(pv);
  auto ok = shard->Pull(pull, Soon());
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)[0].version(), 0);

  // Step 3 needs version 1: rank 1 has not completed step 0.
  auto late = shard->Pull(PullFor(3), absl::Now() + absl::Milliseconds(50));
  ASSERT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(late.status().message().find(
                "shard 0 step 3: version 1 (step 3 - staleness bound 2) not "
                "reached after"),
            std::string::npos)
      << late.status();
  EXPECT_NE(late.status().message().find(
                "dp rank 1 has completed 0 of the 1 steps needed"),
            std::string::npos)
      << late.status();
  EXPECT_EQ(late.status().message().find("dp rank 0"), std::string::npos)
      << late.status();

  // A blocked pull is released once the slow replica's step is applied.
  absl::Notification released;
  absl::StatusOr<std::vector<PullResponse>> blocked;
  std::thread puller([&] {
    blocked = shard->Pull(PullFor(3), absl::InfiniteFuture());
    released.Notify();
  });
  EXPECT_FALSE(released.WaitForNotificationWithTimeout(absl::Milliseconds(50)));
  ASSERT_TRUE(shard->Push(Stream(*shard, 1, 0)).ok());
  // Rank 1's push alone does not release it: the step is not applied yet.
  EXPECT_FALSE(released.WaitForNotificationWithTimeout(absl::Milliseconds(20)));
  auto waiting = shard->Pull(PullFor(3), absl::Now() + absl::Milliseconds(20));
  EXPECT_NE(waiting.status().message().find("waiting for the apply of step 0"),
            std::string::npos)
      << waiting.status();
  SyncStep(shard.get(), 0);
  puller.join();
  ASSERT_TRUE(blocked.ok()) << blocked.status();
  EXPECT_EQ((*blocked)[0].version(), 1);

  // The slow replica catches up; a late GradNorm of an applied step within
  // the window is answered, a late Apply is a no-op.
  ASSERT_TRUE(shard->Push(Stream(*shard, 1, 1)).ok());
  ASSERT_TRUE(shard->Push(Stream(*shard, 1, 2)).ok());
  const double ss1 = *shard->GradNorm(1, Soon());
  SyncStep(shard.get(), 1);
  SyncStep(shard.get(), 2);
  EXPECT_EQ(*shard->GradNorm(1, Soon()), ss1);
  EXPECT_EQ(*shard->Apply(1, ss1), 3);
  EXPECT_EQ(shard->replica_clocks(), (std::vector<int64_t>{3, 3}));
  EXPECT_EQ(shard->max_staleness_seen(), 2);
  ASSERT_FALSE(log.empty());
  EXPECT_NE(log.back().find("replica clocks [3, 3], max staleness seen 2"),
            std::string::npos)
      << log.back();
}

// ASYNC: each complete push is one optimizer update, right away; pulls do
// not wait; GradNorm and Apply are refused.
// SGD momentum 0.9, lr 0.1, no clipping: after rank 0's push of step 0,
//   b = g0, p = p0 - 0.1 g0; after rank 1's: b = 0.9 g0 + g1, p -= 0.1 b.
TEST(ShardTest, AsyncAppliesEachPushAsItArrives) {
  auto shard = MakeShard(Options(WithMode(Spec(2, 1, SGD), ASYNC), 0));
  ASSERT_NE(shard, nullptr);
  const ShardCheckpoint p0 = shard->Snapshot();
  ASSERT_TRUE(shard->Push(Stream(*shard, 0, 0)).ok());
  EXPECT_EQ(shard->version(), 1);
  const ShardCheckpoint p1 = shard->Snapshot();
  ASSERT_TRUE(shard->Push(Stream(*shard, 1, 0)).ok());
  EXPECT_EQ(shard->version(), 2);
  const ShardCheckpoint p2 = shard->Snapshot();
  for (size_t c = 0; c < p0.chunks.size(); ++c) {
    const ChunkDesc& d = p0.chunks[c].desc;
    for (size_t i = 0; i < p0.chunks[c].params.size(); ++i) {
      const float g0 = Grad(0, 0, d, i), g1 = Grad(1, 0, d, i);
      EXPECT_NEAR(p1.chunks[c].params[i], p0.chunks[c].params[i] - 0.1f * g0,
                  1e-7);
      const float b = 0.9f * g0 + g1;
      EXPECT_FLOAT_EQ(p2.chunks[c].state[0][i], b);
      EXPECT_NEAR(p2.chunks[c].params[i], p1.chunks[c].params[i] - 0.1f * b,
                  1e-7);
    }
  }

  // Rank 0 runs ahead freely; its clock and lead are tracked.
  for (int64_t t = 1; t < 6; ++t) {
    ASSERT_TRUE(shard->Push(Stream(*shard, 0, t)).ok()) << t;
  }
  EXPECT_EQ(shard->version(), 7);
  EXPECT_EQ(shard->replica_clocks(), (std::vector<int64_t>{6, 1}));
  EXPECT_EQ(shard->max_staleness_seen(), 4);  // step 5 with rank 1 at 1
  EXPECT_EQ(shard->step_clock(), 1);

  // Pulls return the latest parameters; the final pull may wait for a
  // version, and says what the version counts when it times out.
  auto now = shard->Pull(PullFor(0), Soon());
  ASSERT_TRUE(now.ok()) << now.status();
  EXPECT_EQ((*now)[0].version(), 7);
  auto later = shard->Pull(PullFor(9), absl::Now() + absl::Milliseconds(30));
  EXPECT_EQ(later.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(later.status().message().find("counts applied pushes"),
            std::string::npos)
      << later.status();

  // A replay of an applied step is acknowledged as duplicate (a
  // replacement's retry) and changes nothing; interleaved steps are refused.
  auto replay = shard->Push(Stream(*shard, 0, 3));
  ASSERT_TRUE(replay.ok()) << replay.status();
  EXPECT_EQ(replay->chunks_accepted(), 0);
  EXPECT_GT(replay->chunks_duplicate(), 0);
  EXPECT_EQ(shard->version(), 7);
  auto partial = Stream(*shard, 1, 1);
  partial.resize(1);
  partial[0].mutable_slices()->DeleteSubrange(2, 1);  // whole chunks only
  auto accepted = shard->Push(partial);
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  EXPECT_EQ(shard->version(), 7);  // incomplete: not applied
  ExpectRejected(shard.get(), Stream(*shard, 1, 2),
                 absl::StatusCode::kFailedPrecondition,
                 "dp rank 1's push of step 1 is incomplete on shard 0");
  auto rest = shard->Push(Stream(*shard, 1, 1));
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_EQ(rest->chunks_duplicate(), 1);
  EXPECT_EQ(shard->version(), 8);

  auto gn = shard->GradNorm(1, Soon());
  EXPECT_EQ(gn.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(gn.status().message().find("not used in train.mode ASYNC"),
            std::string::npos)
      << gn.status();
  EXPECT_EQ(shard->Apply(1, 1.0).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// A push of a step outside the job's steps is refused in every mode and
// changes nothing (shard_fuzzer: an ASYNC push of step INT64_MAX overflowed
// the replica clock).
TEST(ShardTest, PushOfAStepOutsideTheJobIsRefused) {
  for (ConsistencyMode mode : {SYNC, BOUNDED_STALENESS, ASYNC}) {
    SCOPED_TRACE(ConsistencyMode_Name(mode));
    const JobSpec spec = WithMode(Spec(2, 1, SGD), mode);
    auto shard = MakeShard(Options(spec, 0));
    ASSERT_NE(shard, nullptr);
    const int64_t steps = spec.train().steps();
    for (int64_t step : {int64_t{-1}, steps, std::numeric_limits<int64_t>::max()}) {
      ExpectRejected(shard.get(), Stream(*shard, 0, step),
                     absl::StatusCode::kInvalidArgument,
                     absl::StrCat("push step ", step,
                                  " is outside the job's steps [0, ", steps,
                                  ")"));
    }
    EXPECT_EQ(shard->replica_clocks(), (std::vector<int64_t>{0, 0}));
  }
}

// ASYNC clipping: each shard clips its part to grad_clip * sqrt(n_k / n).
TEST(ShardTest, AsyncClipsEachShardsShareOfTheThreshold) {
  JobSpec spec = WithMode(Spec(1, 2, SGD), ASYNC);
  spec.mutable_optimizer()->set_grad_clip(0.05f);
  int64_t model = 0;
  for (const TensorSpec& t : GptTensorSpecs(spec.model())) {
    model += t.num_elements();
  }
  for (int k : {0, 1}) {
    auto shard = MakeShard(Options(spec, k));
    const ShardCheckpoint before = shard->Snapshot();
    double ss = 0;
    for (const ChunkData& c : before.chunks) {
      for (size_t i = 0; i < c.params.size(); ++i) {
        ss += std::pow(static_cast<double>(Grad(0, 0, c.desc, i)), 2);
      }
    }
    const double share = 0.05 * std::sqrt(static_cast<double>(
                                    shard->num_elements()) / model);
    const float scale = static_cast<float>(share / (std::sqrt(ss) + 1e-6));
    ASSERT_LT(scale, 1.0f) << "the test needs clipping to be active";
    ASSERT_TRUE(shard->Push(Stream(*shard, 0, 0)).ok());
    EXPECT_DOUBLE_EQ(shard->last_grad_norm(), std::sqrt(ss));
    const ShardCheckpoint after = shard->Snapshot();
    for (size_t c = 0; c < after.chunks.size(); ++c) {
      for (size_t i = 0; i < after.chunks[c].params.size(); ++i) {
        const float g = Grad(0, 0, after.chunks[c].desc, i) * scale;
        EXPECT_NEAR(after.chunks[c].params[i],
                    before.chunks[c].params[i] - 0.1f * g, 1e-8);
      }
    }
  }
}

// ASYNC checkpoints are labelled with the slowest replica's clock and
// written when it reaches a checkpoint step; a resumed shard starts there.
TEST(ShardTest, AsyncCheckpointsFollowTheSlowestReplica) {
  const std::string dir = TestDir("async_ckpt");
  JobSpec spec = WithMode(Spec(2, 1, ADAMW), ASYNC);
  spec.mutable_train()->set_checkpoint_interval(2);
  ShardOptions o = Options(spec, 0);
  o.checkpoint_dir = dir;
  auto a = MakeShard(o);
  for (int64_t t = 0; t < 3; ++t) ASSERT_TRUE(a->Push(Stream(*a, 0, t)).ok());
  ASSERT_TRUE(a->Push(Stream(*a, 1, 0)).ok());
  EXPECT_TRUE(ListCompleteCheckpointSteps(dir, 0)->empty());
  ASSERT_TRUE(a->Push(Stream(*a, 1, 1)).ok());  // slowest clock reaches 2
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 0), std::vector<int64_t>{2});
  EXPECT_EQ(a->version(), 5);
  EXPECT_EQ(a->step_clock(), 2);

  o.start_step = 2;
  auto b = MakeShard(o);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->version(), 2);
  EXPECT_EQ(b->replica_clocks(), (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(Bytes(b->Snapshot()), Bytes(a->Snapshot()));
}


}  // namespace
}  // namespace shard_test
}  // namespace lmps
