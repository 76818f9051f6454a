#include "server/replication.h"

#include <atomic>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "gtest/gtest.h"
#include "server/tensor_codec.h"

namespace lmps {
namespace {

// A tiny model (1 layer, width 8, vocabulary 16) in chunks of <= 64
// elements, AdamW with gradient clipping, SYNC with dp = 2 and 2 shards.
JobSpec Spec() {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(1);
  m->set_n_head(2);
  m->set_n_embd(8);
  m->set_block_size(4);
  m->set_vocab_size(16);
  spec.mutable_layout()->set_dp(2);
  spec.mutable_layout()->set_num_shards(2);
  spec.mutable_layout()->set_shard_backups(1);
  spec.mutable_train()->set_batch_size(4);
  spec.mutable_train()->set_steps(10);
  spec.mutable_train()->set_checkpoint_interval(1000);
  spec.mutable_optimizer()->set_grad_clip(0.05f);
  spec.set_max_chunk_bytes(256);
  spec.set_max_message_bytes(1024);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

std::unique_ptr<ParameterShard> MakeShard(const JobSpec& spec) {
  ShardOptions o;
  o.shard = 1;
  o.spec = spec;
  o.map = *ComputePartition(spec.model(), spec.layout().num_shards(),
                            spec.max_chunk_bytes());
  o.wait_timeout = absl::Seconds(5);
  auto shard = ParameterShard::Create(std::move(o));
  EXPECT_TRUE(shard.ok()) << shard.status();
  return shard.ok() ? std::move(*shard) : nullptr;
}

// Rank `rank`'s push of `step`: every chunk of the shard, one message each.
std::vector<PushRequest> Stream(const ParameterShard& shard, int rank,
                                int64_t step) {
  std::vector<PushRequest> stream;
  for (const ChunkDesc& c : ChunksOfShard(shard.partition(), shard.shard())) {
    const int64_t n = c.end() - c.begin();
    std::vector<float> g(n);
    for (int64_t i = 0; i < n; ++i) {
      g[i] = 0.01f * static_cast<float>((c.begin() + i + 3 * rank + step) % 7) -
             0.02f * static_cast<float>(rank);
    }
    PushRequest& m = stream.emplace_back();
    m.set_worker_id("w");
    m.set_dp_rank(rank);
    m.set_step(step);
    m.set_partition_version(shard.partition().version());
    ChunkSlice* s = m.add_slices();
    s->set_tensor(c.tensor());
    s->set_chunk(c.index());
    s->set_dtype(F32);
    EncodePayload(F32, g.data(), n, s->mutable_data());
  }
  return stream;
}

std::string Bytes(const ParameterShard& shard) {
  std::string out = std::to_string(shard.version()) + ":";
  for (const ChunkData& chunk : shard.Snapshot().chunks) {
    out.append(reinterpret_cast<const char*>(chunk.params.data()),
               4 * chunk.params.size());
    for (const auto& s : chunk.state) {
      out.append(reinterpret_cast<const char*>(s.data()), 4 * s.size());
    }
  }
  return out;
}

// A link to an in-process backup that can be cut.
class LocalLink final : public BackupLink {
 public:
  explicit LocalLink(ReplicatedShard* backup) : backup_(backup) {}
  absl::StatusOr<ReplicateResponse> Replicate(
      const std::vector<ReplicateRequest>& stream) override {
    ++calls;
    if (down) return absl::UnavailableError("connection refused");
    return backup_->Replicate(stream);
  }
  std::string address() const override { return "backup:1"; }
  std::atomic<bool> down{false};
  std::atomic<int> calls{0};

 private:
  ReplicatedShard* const backup_;
};

// One node: its shard and its replication.
struct Node {
  std::unique_ptr<ParameterShard> shard;
  std::unique_ptr<ReplicatedShard> rep;
};

std::unique_ptr<Node> MakeNode(const JobSpec& spec, bool backup,
                               bool awaiting_snapshot = false) {
  auto n = std::make_unique<Node>();
  n->shard = MakeShard(spec);
  ReplicationOptions o;
  o.node_id = backup ? "backup-1" : "server-1";
  o.backup = backup;
  o.awaiting_snapshot = awaiting_snapshot;
  o.primary_address = "primary:1";
  o.epoch = 1;
  o.max_message_bytes = 100;  // many snapshot messages
  auto rep = ReplicatedShard::Create(n->shard.get(), std::move(o));
  EXPECT_TRUE(rep.ok()) << rep.status();
  n->rep = std::move(*rep);
  return n;
}

// Hands `rep` a heartbeat answer; returns FollowHeartbeat's status.
absl::Status Answer(ReplicatedShard* rep, const HeartbeatResponse& r,
                    BackupLink* attach = nullptr) {
  return rep->FollowHeartbeat(r, [attach](const std::string&) {
    return std::shared_ptr<BackupLink>(attach, [](BackupLink*) {});
  });
}

// The scheduler promotes a backup in `epoch`.
void Promote(ReplicatedShard* rep, int64_t epoch) {
  HeartbeatResponse r;
  r.set_promote(true);
  r.set_epoch(epoch);
  ASSERT_TRUE(Answer(rep, r).ok());
}

// One SYNC step through `rep`: both ranks push, GradNorm, Apply.
void Step(ReplicatedShard* rep, int64_t step) {
  for (int r = 0; r < 2; ++r) {
    auto p = rep->Push(Stream(*rep->shard(), r, step));
    ASSERT_TRUE(p.ok()) << p.status();
  }
  auto gss = rep->shard()->GradNorm(step, absl::Now() + absl::Seconds(1));
  ASSERT_TRUE(gss.ok()) << gss.status();
  auto v = rep->Apply(step, 2 * *gss);  // as if the other shard had as much
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, step + 1);
}

// The reference: the same steps on one shard without replication.
std::string Reference(int steps) {
  auto shard = MakeShard(Spec());
  for (int64_t t = 0; t < steps; ++t) {
    for (int r = 0; r < 2; ++r) EXPECT_TRUE(shard->Push(Stream(*shard, r, t)).ok());
    double gss = *shard->GradNorm(t, absl::Now() + absl::Seconds(1));
    EXPECT_TRUE(shard->Apply(t, 2 * gss).ok());
  }
  return Bytes(*shard);
}

TEST(ReplicationTest, BackupStaysBitIdentical) {
  const JobSpec spec = Spec();
  auto backup = MakeNode(spec, /*backup=*/true);
  auto primary = MakeNode(spec, /*backup=*/false);
  auto link = std::make_shared<LocalLink>(backup->rep.get());
  primary->rep->AttachBackup(link, /*needs_snapshot=*/false);
  for (int64_t t = 0; t < 3; ++t) Step(primary->rep.get(), t);
  EXPECT_EQ(Bytes(*backup->shard), Bytes(*primary->shard));
  EXPECT_EQ(Bytes(*primary->shard), Reference(3));
  EXPECT_EQ(link->calls, 3 * 3);  // 2 pushes and 1 apply per step
  EXPECT_EQ(primary->rep->forwarded_ops(), 9);
  EXPECT_GT(primary->rep->forwarded_bytes(), 0);
}

TEST(ReplicationTest, BackupRefusesWorkersWhileThePrimaryAnswers) {
  auto backup = MakeNode(Spec(), /*backup=*/true);
  auto p = backup->rep->Push(Stream(*backup->shard, 0, 0));
  ASSERT_EQ(p.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(p.status().message().find("serves until the scheduler promotes"),
            std::string::npos)
      << p.status();
  EXPECT_EQ(backup->rep->role(), ReplicatedShard::Role::kBackup);
  EXPECT_EQ(backup->shard->version(), 0);
}

// The primary dies in the middle of step 1 (rank 0 pushed, rank 1 not):
// the scheduler promotes the backup in epoch 2, the workers redo their
// calls on it; rank 0's retry is a duplicate and the result equals an
// uninterrupted run.
TEST(ReplicationTest, FailoverMidStepLosesNothing) {
  const JobSpec spec = Spec();
  auto backup = MakeNode(spec, /*backup=*/true);
  auto primary = MakeNode(spec, /*backup=*/false);
  auto link = std::make_shared<LocalLink>(backup->rep.get());
  primary->rep->AttachBackup(link, false);
  Step(primary->rep.get(), 0);
  ASSERT_TRUE(primary->rep->Push(Stream(*primary->shard, 0, 1)).ok());
  // The primary is gone; until promoted the backup refuses the workers.
  EXPECT_EQ(backup->rep->Push(Stream(*backup->shard, 0, 1)).status().code(),
            absl::StatusCode::kUnavailable);
  Promote(backup->rep.get(), 2);
  EXPECT_EQ(backup->rep->epoch(), 2);
  auto retry = backup->rep->Push(Stream(*backup->shard, 0, 1));
  ASSERT_TRUE(retry.ok()) << retry.status();
  EXPECT_EQ(retry->chunks_accepted(), 0);
  EXPECT_GT(retry->chunks_duplicate(), 0);
  EXPECT_EQ(backup->rep->role(), ReplicatedShard::Role::kPrimary);
  ASSERT_TRUE(backup->rep->Push(Stream(*backup->shard, 1, 1)).ok());
  double gss = *backup->shard->GradNorm(1, absl::Now() + absl::Seconds(1));
  ASSERT_TRUE(backup->rep->Apply(1, 2 * gss).ok());
  Step(backup->rep.get(), 2);
  EXPECT_EQ(Bytes(*backup->shard), Reference(3));
  const std::vector<std::string> events = backup->rep->TakeEvents();
  ASSERT_FALSE(events.empty());
  EXPECT_NE(events.back().find("took over as the primary at version 1 in "
                               "epoch 2"),
            std::string::npos)
      << events.back();
}

// After the takeover the old primary (if it is alive after all) is fenced
// off by its next forward and refuses every call.
TEST(ReplicationTest, OldPrimaryIsFencedOff) {
  const JobSpec spec = Spec();
  auto backup = MakeNode(spec, /*backup=*/true);
  auto primary = MakeNode(spec, /*backup=*/false);
  primary->rep->AttachBackup(std::make_shared<LocalLink>(backup->rep.get()),
                             false);
  Step(primary->rep.get(), 0);
  Promote(backup->rep.get(), 2);
  auto p = primary->rep->Push(Stream(*primary->shard, 0, 1));
  ASSERT_EQ(p.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(p.status().message().find("moved away"), std::string::npos)
      << p.status();
  EXPECT_EQ(primary->rep->role(), ReplicatedShard::Role::kFenced);
  // Nothing was applied locally: the push did not reach the shard.
  EXPECT_EQ(primary->shard->replica_clocks()[0], 1);
  EXPECT_EQ(primary->rep->CheckServing().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(primary->rep->Apply(0, 1.0).status().code(),
            absl::StatusCode::kUnavailable);
}

// The backup becomes unreachable: the primary acknowledges nothing (the
// step's calls fail UNAVAILABLE and change nothing locally) until the
// scheduler's answer lets it serve alone in a new epoch.
TEST(ReplicationTest, UnreachableBackupIsDetachedOnlyWithTheSchedulersLeave) {
  const JobSpec spec = Spec();
  auto backup = MakeNode(spec, /*backup=*/true);
  auto primary = MakeNode(spec, /*backup=*/false);
  auto link = std::make_shared<LocalLink>(backup->rep.get());
  primary->rep->AttachBackup(link, false);
  Step(primary->rep.get(), 0);
  link->down = true;
  auto p = primary->rep->Push(Stream(*primary->shard, 0, 1));
  ASSERT_EQ(p.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(primary->shard->replica_clocks()[0], 1);  // not run locally
  EXPECT_TRUE(primary->rep->backup_lost());
  // Nothing more is forwarded or acknowledged meanwhile.
  EXPECT_EQ(primary->rep->Push(Stream(*primary->shard, 1, 1)).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(link->calls, 3 + 1);
  HeartbeatRequest hb;
  primary->rep->FillHeartbeat(&hb);
  EXPECT_TRUE(hb.backup_lost());
  EXPECT_TRUE(hb.serving_primary());
  EXPECT_EQ(hb.epoch(), 1);
  EXPECT_NE(hb.replication_event().find("failed: unreachable"),
            std::string::npos)
      << hb.replication_event();
  // A stale answer (same epoch) changes nothing.
  HeartbeatResponse stale;
  stale.set_detach_backup(true);
  stale.set_epoch(1);
  ASSERT_TRUE(Answer(primary->rep.get(), stale).ok());
  EXPECT_TRUE(primary->rep->backup_lost());
  HeartbeatResponse leave;
  leave.set_detach_backup(true);
  leave.set_epoch(2);
  ASSERT_TRUE(Answer(primary->rep.get(), leave).ok());
  EXPECT_FALSE(primary->rep->backup_lost());
  EXPECT_EQ(primary->rep->epoch(), 2);
  EXPECT_EQ(primary->rep->backup_address(), "");
  Step(primary->rep.get(), 1);
  Step(primary->rep.get(), 2);
  EXPECT_EQ(link->calls, 3 + 1);
  EXPECT_EQ(Bytes(*primary->shard), Reference(3));
  // The stale backup (still at epoch 1) refuses the primary's epoch-2
  // operations until it gets a snapshot; the primary then detaches it.
  link->down = false;
  std::vector<ReplicateRequest> op(1);
  op[0].set_shard(1);
  op[0].set_epoch(2);
  op[0].mutable_stop_at()->set_step(100);
  EXPECT_EQ(backup->rep->Replicate(op).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// The job finished: the primary shuts down before its backup exits or
// after. Either way a late call is refused UNAVAILABLE before it is
// forwarded, so it neither reaches an exited backup (counted as lost) nor
// diverges from one that still answers.
TEST(ReplicationTest, ShutdownRefusesLateCallsWithoutForwarding) {
  const JobSpec spec = Spec();
  auto backup = MakeNode(spec, /*backup=*/true);
  auto primary = MakeNode(spec, /*backup=*/false);
  auto link = std::make_shared<LocalLink>(backup->rep.get());
  primary->rep->AttachBackup(link, false);
  Step(primary->rep.get(), 0);
  const int calls = link->calls;
  primary->rep->Shutdown();
  link->down = true;  // the backup exited too
  auto p = primary->rep->Push(Stream(*primary->shard, 0, 1));
  EXPECT_EQ(p.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(p.status().message().find("shutting down"), std::string::npos)
      << p.status();
  EXPECT_EQ(primary->rep->Apply(0, 1.0).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(primary->rep->StopAt(5).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(primary->rep->CheckServing().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(link->calls, calls);
  EXPECT_FALSE(primary->rep->backup_lost());
  HeartbeatRequest hb;
  primary->rep->FillHeartbeat(&hb);
  EXPECT_EQ(hb.replication_event().find("failed"), std::string::npos)
      << hb.replication_event();
  primary->rep->Shutdown();  // idempotent
}

// The epoch is checked on both sides: an operation of an older epoch
// fences its sender (ABORTED), the answer carries the backup's epoch.
TEST(ReplicationTest, EpochsFenceTheOlderSide) {
  const JobSpec spec = Spec();
  auto backup = MakeNode(spec, /*backup=*/true);
  std::vector<ReplicateRequest> op(1);
  op[0].set_shard(1);
  op[0].set_epoch(1);
  op[0].mutable_stop_at()->set_step(100);
  auto ok = backup->rep->Replicate(op);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->epoch(), 1);
  op[0].set_epoch(0);
  EXPECT_EQ(backup->rep->Replicate(op).status().code(),
            absl::StatusCode::kAborted);
  // Promotion needs a newer epoch than the node holds.
  Promote(backup->rep.get(), 1);
  EXPECT_EQ(backup->rep->role(), ReplicatedShard::Role::kBackup);
  Promote(backup->rep.get(), 3);
  EXPECT_EQ(backup->rep->role(), ReplicatedShard::Role::kPrimary);
  op[0].set_epoch(3);
  EXPECT_EQ(backup->rep->Replicate(op).status().code(),
            absl::StatusCode::kAborted);  // a primary takes no operations
  // The scheduler says another node serves: fenced, and the daemon exits.
  HeartbeatResponse fenced;
  fenced.set_fenced(true);
  fenced.set_epoch(4);
  EXPECT_EQ(Answer(backup->rep.get(), fenced).code(),
            absl::StatusCode::kAborted);
  EXPECT_EQ(backup->rep->role(), ReplicatedShard::Role::kFenced);
  EXPECT_EQ(backup->rep->CheckServing().code(),
            absl::StatusCode::kUnavailable);
}

// The split brain the epochs rule out: primary P and backup B are cut off
// from each other; the scheduler (P's lease expired) promotes B in epoch 2
// while P still runs and some workers reach only P. P acknowledges nothing
// (it cannot forward, and asking for leave to serve alone reaches no
// scheduler), and once the link is back its next forward is refused with
// ABORTED and it is fenced. Every acknowledged step is on B.
TEST(ReplicationTest, PartitionedPrimaryCannotServeBesideThePromotedBackup) {
  const JobSpec spec = Spec();
  auto backup = MakeNode(spec, /*backup=*/true);
  auto primary = MakeNode(spec, /*backup=*/false);
  auto link = std::make_shared<LocalLink>(backup->rep.get());
  primary->rep->AttachBackup(link, false);
  Step(primary->rep.get(), 0);
  link->down = true;  // the partition
  Promote(backup->rep.get(), 2);
  Step(backup->rep.get(), 1);
  EXPECT_EQ(primary->rep->Push(Stream(*primary->shard, 0, 1)).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(primary->rep->Apply(0, 1.0).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(primary->shard->version(), 1);
  link->down = false;  // healed; a fresh link (backup_lost is per link)
  auto primary2 = MakeNode(spec, /*backup=*/false);
  Step(primary2->rep.get(), 0);
  primary2->rep->AttachBackup(std::make_shared<LocalLink>(backup->rep.get()),
                              false);
  EXPECT_EQ(primary2->rep->Push(Stream(*primary2->shard, 0, 1)).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(primary2->rep->role(), ReplicatedShard::Role::kFenced);
  EXPECT_EQ(Bytes(*backup->shard), Reference(2));
}

// A new backup joining a running job gets a snapshot at the next apply,
// then takes every operation; it can take over bit-identically.
TEST(ReplicationTest, NewBackupGetsASnapshotAndCanTakeOver) {
  const JobSpec spec = Spec();
  auto primary = MakeNode(spec, /*backup=*/false);
  Step(primary->rep.get(), 0);
  Step(primary->rep.get(), 1);
  auto backup = MakeNode(spec, /*backup=*/true, /*awaiting_snapshot=*/true);
  // Operations before the snapshot are refused.
  std::vector<ReplicateRequest> op(1);
  op[0].set_shard(1);
  op[0].set_epoch(1);
  op[0].mutable_apply()->set_step(0);
  EXPECT_EQ(backup->rep->Replicate(op).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(backup->rep->CheckServing().code(), absl::StatusCode::kUnavailable);
  // Nor can it be promoted.
  Promote(backup->rep.get(), 2);
  EXPECT_EQ(backup->rep->role(), ReplicatedShard::Role::kBackup);

  auto link = std::make_shared<LocalLink>(backup->rep.get());
  primary->rep->AttachBackup(link, /*needs_snapshot=*/true);
  EXPECT_EQ(primary->rep->backup_address(), "backup:1");
  Step(primary->rep.get(), 2);  // the snapshot follows this apply
  EXPECT_EQ(Bytes(*backup->shard), Bytes(*primary->shard));
  EXPECT_EQ(link->calls, 1);  // one snapshot stream (of many messages)
  Step(primary->rep.get(), 3);
  EXPECT_EQ(link->calls, 1 + 3);  // then every operation
  EXPECT_EQ(Bytes(*backup->shard), Bytes(*primary->shard));
  // The primary dies before step 4; the backup is promoted and carries on.
  Promote(backup->rep.get(), 2);
  Step(backup->rep.get(), 4);
  EXPECT_EQ(Bytes(*backup->shard), Reference(5));
}

TEST(ReplicationTest, BadSnapshotsAndStreamsAreRejected) {
  const JobSpec spec = Spec();
  auto backup = MakeNode(spec, /*backup=*/true, /*awaiting_snapshot=*/true);
  EXPECT_EQ(backup->rep->Replicate({}).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<ReplicateRequest> snap(1);
  snap[0].set_shard(1);
  snap[0].set_epoch(1);
  snap[0].mutable_snapshot()->set_tensor("nope");
  EXPECT_EQ(backup->rep->Replicate(snap).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A snapshot covering too little.
  const ChunkDesc c = ChunksOfShard(backup->shard->partition(), 1)[0];
  snap[0].mutable_snapshot()->set_tensor(c.tensor());
  snap[0].mutable_snapshot()->set_chunk(c.index());
  snap[0].mutable_snapshot()->set_params(std::string(8, '\0'));
  snap[0].mutable_snapshot()->add_state(std::string(8, '\0'));
  snap[0].mutable_snapshot()->add_state(std::string(8, '\0'));
  auto r = backup->rep->Replicate(snap);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("covers 2 elements"), std::string::npos)
      << r.status();
  // An offset near 2^63 (offset + n overflows) is refused, not written.
  snap[0].mutable_snapshot()->set_offset(std::numeric_limits<int64_t>::max());
  snap[0].mutable_snapshot()->set_params(std::string(4, '\0'));
  snap[0].mutable_snapshot()->set_state(0, std::string(4, '\0'));
  snap[0].mutable_snapshot()->set_state(1, std::string(4, '\0'));
  r = backup->rep->Replicate(snap);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("does not fit"), std::string::npos)
      << r.status();
  // Overlapping messages do not add up to a complete snapshot.
  const int64_t size = c.end() - c.begin();
  std::vector<ReplicateRequest> twice(2, snap[0]);
  for (ReplicateRequest& m : twice) {
    m.mutable_snapshot()->set_offset(0);
    m.mutable_snapshot()->set_params(std::string(4 * size, '\0'));
    m.mutable_snapshot()->set_state(0, std::string(4 * size, '\0'));
    m.mutable_snapshot()->set_state(1, std::string(4 * size, '\0'));
  }
  r = backup->rep->Replicate(twice);
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("overlap"), std::string::npos)
      << r.status();
  snap[0].set_shard(0);
  EXPECT_EQ(backup->rep->Replicate(snap).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ReplicationTest, AsyncAndStalenessAreRejected) {
  JobSpec spec = Spec();
  spec.mutable_layout()->set_shard_backups(0);
  spec.mutable_train()->set_mode(ASYNC);
  auto shard = MakeShard(spec);
  auto rep = ReplicatedShard::Create(shard.get(), {});
  ASSERT_EQ(rep.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(rep.status().message().find("SYNC"), std::string::npos);
  spec.mutable_layout()->set_shard_backups(1);
  EXPECT_FALSE(ValidateJobSpec(spec).ok());
}

}  // namespace
}  // namespace lmps
