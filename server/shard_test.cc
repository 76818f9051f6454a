// ParameterShard: creation, push/apply/pull, checkpoints, init, TensorInfo,
// concurrency (the consistency modes: shard_modes_test.cc; pipeline and
// tensor-parallel parts: shard_parts_test.cc).
#include "server/shard_test_util.h"

#include <algorithm>
#include <cstring>
#include <functional>

#include "server/optimizer.h"

namespace lmps {
namespace shard_test {
namespace {

TEST(ShardTest, CreateInitialisesDeterministically) {
  const JobSpec spec = Spec(1, 2, ADAMW);
  auto shard = MakeShard(Options(spec, 1));
  ASSERT_NE(shard, nullptr);
  EXPECT_EQ(shard->version(), 0);
  const ShardCheckpoint snap = shard->Snapshot();
  ASSERT_GT(snap.chunks.size(), 0u);
  for (const ChunkData& c : snap.chunks) {
    EXPECT_EQ(c.desc.shard(), 1);
    for (const TensorSpec& t : GptTensorSpecs(spec.model())) {
      if (t.name != c.desc.tensor()) continue;
      std::vector<float> want(c.desc.end() - c.desc.begin());
      InitTensorRange(t, spec.train().seed(), c.desc.begin(), c.desc.end(),
                      want.data());
      EXPECT_EQ(c.params, want) << t.name;
    }
    ASSERT_EQ(c.state.size(), 2u);
    EXPECT_EQ(c.state[0], std::vector<float>(c.params.size(), 0.0f));
  }
}

TEST(ShardTest, CreateRejectsBadOptions) {
  ShardOptions o = Options(Spec(1, 2, ADAMW), 2);
  EXPECT_EQ(ParameterShard::Create(o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o = Options(Spec(1, 2, ADAMW), 0);
  o.map.set_version(o.map.version() + 1);
  EXPECT_EQ(ParameterShard::Create(o).status().code(),
            absl::StatusCode::kFailedPrecondition);
  o = Options(Spec(1, 2, ADAMW), 0);
  o.start_step = 5;  // no checkpoint directory
  EXPECT_EQ(ParameterShard::Create(o).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

// dp = 2, SGD(lr 0.1, momentum 0.9), no decay or clipping, two steps.
// Hand-computed for one element: rank gradients g0 = 0.03, g1 = 0.01 - 0.02
//   averaged g = (0.03 + -0.01) / 2 = 0.01; b = 0.01; p1 = p0 - 0.001.
// In general p1 = p0 - 0.1 * (g0 + g1) / 2 and, at step 1,
//   b = 0.9 * b + g';  p2 = p1 - 0.1 * b.
TEST(ShardTest, PushApplyPullMatchesHandComputedSgd) {
  const JobSpec spec = Spec(2, 2, SGD);
  auto shard = MakeShard(Options(spec, 0));
  ASSERT_NE(shard, nullptr);
  const ShardCheckpoint before = shard->Snapshot();

  // Rank 1 first: arrival order must not matter.
  auto r1 = shard->Push(Stream(*shard, 1, 0));
  ASSERT_TRUE(r1.ok()) << r1.status();
  EXPECT_EQ(r1->chunks_accepted(), static_cast<int>(before.chunks.size()));
  EXPECT_EQ(r1->chunks_duplicate(), 0);
  ASSERT_TRUE(shard->Push(Stream(*shard, 0, 0)).ok());

  // Expected averaged gradient and its sum of squares.
  double want_ss = 0;
  std::vector<std::vector<float>> avg;
  for (const ChunkData& c : before.chunks) {
    std::vector<float> a(c.params.size());
    for (size_t i = 0; i < a.size(); ++i) {
      a[i] = (Grad(0, 0, c.desc, i) + Grad(1, 0, c.desc, i)) / 2.0f;
      want_ss += static_cast<double>(a[i]) * a[i];
    }
    avg.push_back(a);
  }
  auto ss = shard->GradNorm(0, Soon());
  ASSERT_TRUE(ss.ok()) << ss.status();
  EXPECT_DOUBLE_EQ(*ss, want_ss);

  auto v = shard->Apply(0, 4.0 * want_ss);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, 1);
  EXPECT_EQ(shard->version(), 1);

  const ShardCheckpoint after = shard->Snapshot();
  for (size_t c = 0; c < after.chunks.size(); ++c) {
    for (size_t i = 0; i < avg[c].size(); ++i) {
      const float p0 = before.chunks[c].params[i];
      EXPECT_FLOAT_EQ(after.chunks[c].state[0][i], avg[c][i]);
      EXPECT_NEAR(after.chunks[c].params[i], p0 - 0.1f * avg[c][i], 1e-8);
    }
  }
  // The worked example: first element of the first chunk has begin 0 for
  // wte (if shard 0 holds it) -- check the formula on any element.
  EXPECT_NEAR(after.chunks[0].params[0],
              before.chunks[0].params[0] - 0.1 * avg[0][0], 1e-7);

  // Pull returns the new values with the version.
  PullRequest pull;
  pull.set_step(1);
  pull.set_partition_version(shard->partition().version());
  auto msgs = shard->Pull(pull, Soon());
  ASSERT_TRUE(msgs.ok()) << msgs.status();
  for (const PullResponse& m : *msgs) EXPECT_EQ(m.version(), 1);
  auto values = Values(*msgs, spec.max_message_bytes());
  for (const ChunkData& c : after.chunks) {
    EXPECT_EQ((values[{c.desc.tensor(), c.desc.index()}]), c.params);
  }

  // Step 1: momentum.
  ASSERT_TRUE(shard->Push(Stream(*shard, 0, 1)).ok());
  ASSERT_TRUE(shard->Push(Stream(*shard, 1, 1)).ok());
  ASSERT_TRUE(shard->GradNorm(1, Soon()).ok());
  ASSERT_EQ(*shard->Apply(1, 0.0), 2);
  const ShardCheckpoint two = shard->Snapshot();
  for (size_t c = 0; c < two.chunks.size(); ++c) {
    const ChunkDesc& d = two.chunks[c].desc;
    for (size_t i = 0; i < avg[c].size(); ++i) {
      const float g = (Grad(0, 1, d, i) + Grad(1, 1, d, i)) / 2.0f;
      const float b = 0.9f * avg[c][i] + g;
      EXPECT_FLOAT_EQ(two.chunks[c].state[0][i], b);
      EXPECT_NEAR(two.chunks[c].params[i], after.chunks[c].params[i] - 0.1f * b,
                  1e-8);
    }
  }

  // A pull with the optimizer state (a ring all-reduce worker resuming):
  // every element's momentum beside its parameter, messages still within
  // max_message_bytes counting both.
  pull.set_step(2);
  pull.set_with_optimizer_state(true);
  msgs = shard->Pull(pull, Soon());
  ASSERT_TRUE(msgs.ok()) << msgs.status();
  int64_t elements = 0;
  for (const PullResponse& m : *msgs) {
    int64_t bytes = 0;
    for (const ChunkSlice& slice : m.slices()) {
      ASSERT_EQ(slice.state_size(), 1);
      ASSERT_EQ(slice.state(0).size(), slice.data().size());
      bytes += slice.data().size() + slice.state(0).size();
      const int64_t n = slice.data().size() / 4;
      std::vector<float> momentum(n);
      std::memcpy(momentum.data(), slice.state(0).data(), n * 4);
      for (const ChunkData& c : two.chunks) {
        if (c.desc.tensor() != slice.tensor() ||
            c.desc.index() != slice.chunk()) {
          continue;
        }
        for (int64_t i = 0; i < n; ++i) {
          EXPECT_EQ(momentum[i], c.state[0][slice.offset() + i]);
        }
      }
      elements += n;
    }
    EXPECT_LE(bytes, spec.max_message_bytes());
  }
  EXPECT_EQ(elements, shard->num_elements());
}

TEST(ShardTest, ResultIndependentOfArrivalOrder) {
  const JobSpec spec = Spec(3, 1, ADAMW);
  auto a = MakeShard(Options(spec, 0));
  auto b = MakeShard(Options(spec, 0));
  for (int r : {0, 1, 2}) ASSERT_TRUE(a->Push(Stream(*a, r, 0)).ok());
  for (int r : {2, 0, 1}) ASSERT_TRUE(b->Push(Stream(*b, r, 0)).ok());
  const double ssa = *a->GradNorm(0, Soon());
  const double ssb = *b->GradNorm(0, Soon());
  EXPECT_EQ(ssa, ssb);
  ASSERT_TRUE(a->Apply(0, ssa).ok());
  ASSERT_TRUE(b->Apply(0, ssb).ok());
  EXPECT_EQ(Bytes(a->Snapshot()), Bytes(b->Snapshot()));
}

// The gradient norm and the optimizer step run in blocks of
// kNormBlockElements on the shard's threads: chunks of several blocks, AdamW
// with decay and clipping, three steps; the same bits with 1 and 3 threads.
TEST(ShardTest, ThreadsDoNotChangeTheResult) {
  JobSpec spec = Spec(2, 1, ADAMW);
  spec.mutable_model()->set_n_embd(128);
  spec.mutable_model()->set_vocab_size(1100);  // wte: 140800 elements
  spec.set_max_chunk_bytes(1 << 20);
  spec.set_max_message_bytes(4 << 20);
  spec.mutable_optimizer()->set_weight_decay(0.1f);
  spec.mutable_optimizer()->set_grad_clip(0.5f);
  ShardOptions o = Options(spec, 0);
  o.threads = 0;
  EXPECT_EQ(ParameterShard::Create(o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.threads = 1;
  auto one = MakeShard(o);
  o.threads = 3;
  auto three = MakeShard(o);
  ASSERT_NE(one, nullptr);
  ASSERT_NE(three, nullptr);
  int64_t largest = 0;
  for (const auto& c : one->Snapshot().chunks) {
    largest = std::max<int64_t>(largest, c.params.size());
  }
  ASSERT_GT(largest, 2 * kNormBlockElements);
  for (int64_t step = 0; step < 3; ++step) {
    for (ParameterShard* s : {one.get(), three.get()}) {
      for (int r : {0, 1}) ASSERT_TRUE(s->Push(Stream(*s, r, step)).ok());
    }
    const double a = *one->GradNorm(step, Soon());
    const double b = *three->GradNorm(step, Soon());
    EXPECT_EQ(a, b) << step;
    ASSERT_TRUE(one->Apply(step, a).ok());
    ASSERT_TRUE(three->Apply(step, b).ok());
  }
  EXPECT_EQ(Bytes(one->Snapshot()), Bytes(three->Snapshot()));
}

TEST(ShardTest, DuplicatesAreCountedOnce) {
  const JobSpec spec = Spec(2, 1, SGD);
  auto a = MakeShard(Options(spec, 0));
  auto b = MakeShard(Options(spec, 0));
  const int n = static_cast<int>(a->Snapshot().chunks.size());
  ASSERT_TRUE(a->Push(Stream(*a, 0, 0)).ok());
  auto dup = a->Push(Stream(*a, 0, 0));  // a retried RPC
  ASSERT_TRUE(dup.ok()) << dup.status();
  EXPECT_EQ(dup->chunks_accepted(), 0);
  EXPECT_EQ(dup->chunks_duplicate(), n);
  EXPECT_EQ(a->duplicate_chunks(), n);
  ASSERT_TRUE(a->Push(Stream(*a, 1, 0)).ok());
  ASSERT_TRUE(b->Push(Stream(*b, 0, 0)).ok());
  ASSERT_TRUE(b->Push(Stream(*b, 1, 0)).ok());
  EXPECT_EQ(*a->GradNorm(0, Soon()), *b->GradNorm(0, Soon()));
  ASSERT_TRUE(a->Apply(0, 1.0).ok());
  ASSERT_TRUE(b->Apply(0, 1.0).ok());
  EXPECT_EQ(Bytes(a->Snapshot()), Bytes(b->Snapshot()));
}


TEST(ShardTest, BadPushesAreRejectedAndChangeNothing) {
  const JobSpec spec = Spec(1, 2, ADAMW);
  auto shard = MakeShard(Options(spec, 0));
  const std::vector<PushRequest> good = Stream(*shard, 0, 0);
  using Code = absl::StatusCode;

  // Wrong size: one float short, and a byte count that is not a multiple.
  auto s = good;
  s[0].mutable_slices(0)->mutable_data()->resize(s[0].slices(0).data().size() -
                                                 4);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "whole chunks");
  s = good;
  s[0].mutable_slices(0)->mutable_data()->push_back('x');
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "not a multiple");
  s = good;
  s[0].mutable_slices(0)->set_offset(1000000);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "outside the chunk");
  // A chunk covered twice within the stream.
  s = good;
  *s.back().add_slices() = good[0].slices(0);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "exactly once");
  // Unknown tensor; chunk of another shard.
  s = good;
  s[0].mutable_slices(0)->set_tensor("h.7.mlp.c_fc.weight");
  ExpectRejected(shard.get(), s, Code::kInvalidArgument,
                 "unknown tensor 'h.7.mlp.c_fc.weight'");
  const auto other = ChunksOfShard(shard->partition(), 1);
  s = good;
  s[0].mutable_slices(0)->set_tensor(other[0].tensor());
  s[0].mutable_slices(0)->set_chunk(other[0].index());
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "held by shard 1");
  // Bad dtype.
  s = good;
  s[0].mutable_slices(0)->set_dtype(static_cast<DType>(7));
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "valid: F32, BF16");
  // Wrong partition version, in any message of the stream.
  s = good;
  for (auto& m : s) m.set_partition_version(m.partition_version() + 1);
  ExpectRejected(shard.get(), s, Code::kFailedPrecondition,
                 "partition_version");
  s = good;
  s.back().set_step(5);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "stream started");
  // dp rank out of range.
  s = good;
  for (auto& m : s) m.set_dp_rank(1);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "out of range");
  // Future step.
  ExpectRejected(shard.get(), Stream(*shard, 0, 3), Code::kFailedPrecondition,
                 "far in the future");
  // NaN and Inf, in the last message.
  for (float bad : {std::numeric_limits<float>::quiet_NaN(),
                    std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    s = good;
    std::string* data = s.back().mutable_slices(0)->mutable_data();
    std::memcpy(data->data(), &bad, 4);
    ExpectRejected(shard.get(), s, Code::kInvalidArgument, "non-finite");
  }
  s = Stream(*shard, 0, 0, BF16);
  uint16_t nan16 = 0x7fc0;
  std::memcpy(s[0].mutable_slices(0)->mutable_data()->data(), &nan16, 2);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "non-finite");
  EXPECT_EQ(shard->rejected_nonfinite_pushes(), 4);
  ExpectRejected(shard.get(), {}, Code::kInvalidArgument, "empty");

  // Nothing was received: GradNorm still waits for rank 0.
  auto gn = shard->GradNorm(0, Soon());
  EXPECT_EQ(gn.status().code(), Code::kDeadlineExceeded);
  // And the good stream still works in full.
  auto r = shard->Push(good);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->chunks_duplicate(), 0);
  EXPECT_TRUE(shard->GradNorm(0, Soon()).ok());
  ASSERT_TRUE(shard->Apply(0, 1.0).ok());
  // A retry of an applied step whose gradient had completely arrived (a
  // replacement redoing its predecessor's step): acknowledged as duplicate,
  // nothing changes.
  auto again = shard->Push(good);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->chunks_accepted(), 0);
  EXPECT_GT(again->chunks_duplicate(), 0);
  EXPECT_EQ(shard->version(), 1);
  auto info = shard->TensorInfo("");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->rejected_nonfinite_pushes(), 4);
}

TEST(ShardTest, TimeoutNamesMissingRank) {
  const JobSpec spec = Spec(3, 2, ADAMW);
  auto shard = MakeShard(Options(spec, 1));
  ASSERT_TRUE(shard->Push(Stream(*shard, 0, 0)).ok());
  // Rank 2 pushes only its first message.
  auto partial = Stream(*shard, 2, 0);
  partial.resize(1);
  partial[0].mutable_slices()->DeleteSubrange(2, 1);  // whole chunks only
  ASSERT_TRUE(shard->Push(partial).ok());
  auto gn = shard->GradNorm(0, absl::Now() + absl::Milliseconds(50));
  ASSERT_EQ(gn.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(gn.status().message().find(
                "shard 1 step 0: no gradients from dp ranks [1, 2] after"),
            std::string::npos)
      << gn.status();
  EXPECT_NE(gn.status().message().find("dp rank 2 pushed 1 of"),
            std::string::npos)
      << gn.status();
  // Apply without complete gradients is refused.
  EXPECT_EQ(shard->Apply(0, 1.0).status().code(),
            absl::StatusCode::kFailedPrecondition);

  // The options' wait_timeout bounds the caller's deadline.
  ShardOptions o = Options(Spec(2, 1, ADAMW), 0);
  o.wait_timeout = absl::Milliseconds(30);
  auto quick = MakeShard(o);
  const absl::Time start = absl::Now();
  auto r = quick->GradNorm(0, absl::InfiniteFuture());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(r.status().message().find("after 30ms"), std::string::npos)
      << r.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));

  PullRequest pull;
  pull.set_step(1);
  auto p = quick->Pull(pull, absl::InfiniteFuture());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_NE(p.status().message().find("shard 0 step 1"), std::string::npos)
      << p.status();
}

TEST(ShardTest, Bf16PayloadsArePushedAndPulled) {
  const JobSpec spec = Spec(1, 1, SGD);
  auto a = MakeShard(Options(spec, 0));
  auto b = MakeShard(Options(spec, 0));
  // Gradients rounded to bf16 first so both encodings carry equal values.
  auto f32 = Stream(*a, 0, 0, F32);
  for (auto& m : f32) {
    for (auto& s : *m.mutable_slices()) {
      std::vector<float> v(s.data().size() / 4);
      DecodePayload(F32, s.data(), v.data());
      for (float& x : v) x = Bf16BitsToFloat(FloatToBf16Bits(x));
      s.clear_data();
      EncodePayload(F32, v.data(), v.size(), s.mutable_data());
    }
  }
  ASSERT_TRUE(a->Push(f32).ok());
  auto r = b->Push(Stream(*b, 0, 0, BF16));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*a->GradNorm(0, Soon()), *b->GradNorm(0, Soon()));
  ASSERT_TRUE(a->Apply(0, 1.0).ok());
  ASSERT_TRUE(b->Apply(0, 1.0).ok());
  EXPECT_EQ(Bytes(a->Snapshot()), Bytes(b->Snapshot()));

  PullRequest pull;
  pull.set_step(1);
  pull.set_dtype(BF16);
  auto msgs = b->Pull(pull, Soon());
  ASSERT_TRUE(msgs.ok());
  auto values = Values(*msgs, spec.max_message_bytes());
  for (const ChunkData& c : b->Snapshot().chunks) {
    const auto& got = values[{c.desc.tensor(), c.desc.index()}];
    ASSERT_EQ(got.size(), c.params.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i], Bf16BitsToFloat(FloatToBf16Bits(c.params[i])));
    }
  }
}

// A pull the shard cannot serve is refused with the reason, and the shard
// serves the next good one (bf16 pulls included: half the bytes).
TEST(ShardTest, BadPullsAreRefusedWithTheReason) {
  const JobSpec spec = Spec(1, 1, SGD);
  auto shard = MakeShard(Options(spec, 0));
  struct Case {
    std::function<void(PullRequest*)> mutate;
    absl::StatusCode code;
    const char* needle;
  };
  const std::vector<Case> cases = {
      {[](PullRequest* r) { r->set_dtype(INT8); }, absl::StatusCode::kInvalidArgument,
       "pull dtype 3 is not valid; valid: F32, BF16"},
      {[](PullRequest* r) { r->set_dtype(static_cast<DType>(42)); },
       absl::StatusCode::kInvalidArgument, "pull dtype 42 is not valid"},
      {[](PullRequest* r) { r->set_step(-1); }, absl::StatusCode::kInvalidArgument,
       "pull step must be >= 0, got -1"},
      {[](PullRequest* r) { r->add_tensors("h.9.attn.c_attn.weight"); },
       absl::StatusCode::kNotFound, "unknown tensor 'h.9.attn.c_attn.weight'"},
      {[&](PullRequest* r) {
         r->set_partition_version(shard->partition().version() + 1);
       },
       absl::StatusCode::kFailedPrecondition, "partition_version"},
      {[](PullRequest* r) {
         r->set_owned_only(true);
         r->set_pp_rank(1);
       },
       absl::StatusCode::kInvalidArgument, "pull pp_rank 1 tp_rank 0 is out of range"},
      {[](PullRequest* r) { r->set_with_optimizer_state(true); },
       absl::StatusCode::kInvalidArgument,
       "a pull with_optimizer_state must ask for dtype F32"},
      {[](PullRequest* r) {
         r->set_streams(2);
         r->set_stream(2);
       },
       absl::StatusCode::kInvalidArgument, "pull stream 2 of 2 is out of range"},
      {[](PullRequest* r) { r->set_streams(65); },
       absl::StatusCode::kInvalidArgument, "pull stream 0 of 65 is out of range"},
  };
  for (const Case& c : cases) {
    PullRequest bad;
    bad.set_dtype(BF16);
    c.mutate(&bad);
    auto r = shard->Pull(bad, Soon());
    EXPECT_EQ(r.status().code(), c.code) << c.needle << ": " << r.status();
    EXPECT_NE(r.status().message().find(c.needle), std::string::npos)
        << r.status();
  }
  int64_t f32_bytes = 0, bf16_bytes = 0;
  for (const DType dtype : {F32, BF16}) {
    PullRequest good;
    good.set_dtype(dtype);
    auto r = shard->Pull(good, Soon());
    ASSERT_TRUE(r.ok()) << r.status();
    for (const PullResponse& m : *r) {
      for (const ChunkSlice& s : m.slices()) {
        EXPECT_EQ(s.dtype(), dtype);
        (dtype == BF16 ? bf16_bytes : f32_bytes) += s.data().size();
      }
    }
  }
  EXPECT_EQ(f32_bytes, 4 * shard->num_elements());
  EXPECT_EQ(bf16_bytes, 2 * shard->num_elements());
}

TEST(ShardTest, PullSplitsMessagesAndFilters) {
  JobSpec spec = Spec(1, 1, ADAMW);
  auto shard = MakeShard(Options(spec, 0));
  PullRequest pull;
  auto msgs = shard->Pull(pull, Soon());
  ASSERT_TRUE(msgs.ok());
  // 1024-byte messages: 256 fp32 values each.
  const int64_t total = shard->num_elements();
  EXPECT_EQ(static_cast<int64_t>(msgs->size()), (4 * total + 1023) / 1024);
  auto values = Values(*msgs, 1024);
  const ShardCheckpoint snap = shard->Snapshot();
  for (const ChunkData& c : snap.chunks) {
    EXPECT_EQ((values[{c.desc.tensor(), c.desc.index()}]), c.params);
  }
  // In 3 streams: messages m % 3 == k each, together the whole pull once.
  for (int k = 0; k < 3; ++k) {
    PullRequest part = pull;
    part.set_streams(3);
    part.set_stream(k);
    auto share = shard->Pull(part, Soon());
    ASSERT_TRUE(share.ok()) << share.status();
    EXPECT_EQ(static_cast<int64_t>(share->size()),
              (static_cast<int64_t>(msgs->size()) - k + 2) / 3);
    for (size_t i = 0; i < share->size(); ++i) {
      EXPECT_EQ((*share)[i].SerializeAsString(),
                (*msgs)[k + 3 * i].SerializeAsString());
    }
  }
  // Filtered.
  pull.add_tensors("h.0.ln_1.weight");
  msgs = shard->Pull(pull, Soon());
  ASSERT_TRUE(msgs.ok());
  ASSERT_EQ(msgs->size(), 1u);
  ASSERT_EQ((*msgs)[0].slices_size(), 1);
  EXPECT_EQ((*msgs)[0].slices(0).data().size(), 32u);  // 8 floats of ones
  pull.add_tensors("nope");
  EXPECT_EQ(shard->Pull(pull, Soon()).status().code(),
            absl::StatusCode::kNotFound);
  // A stale step is served with the current version.
  pull.clear_tensors();
  ASSERT_TRUE(shard->Push(Stream(*shard, 0, 0)).ok());
  ASSERT_TRUE(shard->GradNorm(0, Soon()).ok());
  ASSERT_TRUE(shard->Apply(0, 1.0).ok());
  pull.set_step(0);
  msgs = shard->Pull(pull, Soon());
  ASSERT_TRUE(msgs.ok());
  EXPECT_EQ((*msgs)[0].version(), 1);
  pull.set_partition_version(12345);
  EXPECT_EQ(shard->Pull(pull, Soon()).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ShardTest, ApplyIsIdempotentAndLateGradNormIsAnswered) {
  const JobSpec spec = Spec(1, 1, ADAMW);
  auto shard = MakeShard(Options(spec, 0));
  ASSERT_TRUE(shard->Push(Stream(*shard, 0, 0)).ok());
  const double ss = *shard->GradNorm(0, Soon());
  EXPECT_EQ(*shard->Apply(0, ss), 1);
  const std::string after = Bytes(shard->Snapshot());
  EXPECT_EQ(*shard->Apply(0, ss), 1);
  EXPECT_EQ(Bytes(shard->Snapshot()), after);
  EXPECT_EQ(*shard->GradNorm(0, Soon()), ss);  // a slow worker's call
  EXPECT_EQ(shard->Apply(5, ss).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(shard->Apply(1, std::nan("")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(shard->GradNorm(4, Soon()).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ShardTest, ClippingUsesTheGlobalNorm) {
  // SGD momentum 0.9 from zero state: p1 = p0 - lr * g * scale with
  // scale = clip / (norm + 1e-6).
  JobSpec spec = Spec(1, 1, SGD);
  spec.mutable_optimizer()->set_grad_clip(0.5f);
  auto shard = MakeShard(Options(spec, 0));
  const ShardCheckpoint before = shard->Snapshot();
  ASSERT_TRUE(shard->Push(Stream(*shard, 0, 0)).ok());
  ASSERT_TRUE(shard->GradNorm(0, Soon()).ok());
  ASSERT_TRUE(shard->Apply(0, 4.0).ok());  // global norm 2 -> scale ~0.25
  const ShardCheckpoint after = shard->Snapshot();
  const float scale = static_cast<float>(0.5 / (2.0 + 1e-6));
  for (size_t c = 0; c < after.chunks.size(); ++c) {
    for (size_t i = 0; i < after.chunks[c].params.size(); ++i) {
      const float g = Grad(0, 0, after.chunks[c].desc, i) * scale;
      EXPECT_NEAR(after.chunks[c].params[i],
                  before.chunks[c].params[i] - 0.1f * g, 1e-8);
    }
  }
}

TEST(ShardTest, CheckpointAtIntervalAndResume) {
  const std::string dir = TestDir("resume");
  JobSpec spec = Spec(2, 2, ADAMW);
  spec.mutable_train()->set_checkpoint_interval(2);
  spec.mutable_optimizer()->set_weight_decay(0.1f);
  spec.mutable_optimizer()->set_min_lr(0.01f);
  ShardOptions o = Options(spec, 1);
  o.checkpoint_dir = dir;
  std::vector<std::string> log;
  o.log = [&](const std::string& line) { log.push_back(line); };
  auto a = MakeShard(o);
  auto step = [](ParameterShard* s, int64_t t) {
    ASSERT_TRUE(s->Push(Stream(*s, 0, t)).ok());
    ASSERT_TRUE(s->Push(Stream(*s, 1, t)).ok());
    const double ss = *s->GradNorm(t, Soon());
    ASSERT_TRUE(s->Apply(t, ss * 3).ok());
  };
  step(a.get(), 0);
  EXPECT_TRUE(ListCompleteCheckpointSteps(dir, 1)->empty());
  step(a.get(), 1);
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 1), std::vector<int64_t>{2});
  ASSERT_FALSE(log.empty());
  EXPECT_NE(log.back().find("step_00000002/shard_1.ckpt"), std::string::npos);

  o.start_step = 2;
  o.log = nullptr;
  auto b = MakeShard(o);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->version(), 2);
  EXPECT_EQ(Bytes(b->Snapshot()), Bytes(a->Snapshot()));
  step(a.get(), 2);
  step(b.get(), 2);
  EXPECT_EQ(Bytes(b->Snapshot()), Bytes(a->Snapshot()));

  // Missing or mismatched checkpoints are errors.
  o.start_step = 4;
  EXPECT_EQ(ParameterShard::Create(o).status().code(),
            absl::StatusCode::kNotFound);
  o.start_step = 2;
  o.shard = 0;
  EXPECT_FALSE(ParameterShard::Create(o).ok());
  o.shard = 1;
  o.spec.mutable_optimizer()->set_type(SGD);
  auto wrong = ParameterShard::Create(o);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(wrong.status().message().find("optimizer"), std::string::npos);
}

TEST(ShardTest, CheckpointAtLastStepAndStopAfterStep) {
  const std::string dir = TestDir("last");
  JobSpec spec = Spec(1, 1, SGD);
  spec.mutable_train()->set_steps(3);
  spec.mutable_train()->set_stop_after_step(1);
  ShardOptions o = Options(spec, 0);
  o.checkpoint_dir = dir;
  auto s = MakeShard(o);
  for (int t = 0; t < 3; ++t) {
    ASSERT_TRUE(s->Push(Stream(*s, 0, t)).ok());
    ASSERT_TRUE(s->GradNorm(t, Soon()).ok());
    ASSERT_TRUE(s->Apply(t, 0.0).ok());
  }
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 0), (std::vector<int64_t>{1, 3}));
}

TEST(ShardTest, FailedCheckpointKeepsShardConsistent) {
  const std::string dir = TestDir("blocked");
  // A file where the step directory should go makes the write fail.
  ASSERT_EQ(
      std::system(
          ("mkdir -p " + dir + " && touch " + dir + "/step_00000001").c_str()),
      0);
  JobSpec spec = Spec(1, 1, SGD);
  spec.mutable_train()->set_checkpoint_interval(1);
  ShardOptions o = Options(spec, 0);
  o.checkpoint_dir = dir;
  auto s = MakeShard(o);
  ASSERT_TRUE(s->Push(Stream(*s, 0, 0)).ok());
  ASSERT_TRUE(s->GradNorm(0, Soon()).ok());
  auto v = s->Apply(0, 0.0);
  ASSERT_FALSE(v.ok());
  EXPECT_NE(v.status().message().find("checkpoint failed"), std::string::npos)
      << v.status();
  EXPECT_FALSE(s->last_checkpoint_status().ok());
  EXPECT_EQ(s->version(), 1);
  EXPECT_EQ(*s->Apply(0, 0.0), 1);  // a retry sees the applied step
  ASSERT_TRUE(s->Push(Stream(*s, 0, 1)).ok());
  ASSERT_TRUE(s->GradNorm(1, Soon()).ok());
  EXPECT_EQ(*s->Apply(1, 0.0), 2);  // step_00000002 can be written
  EXPECT_TRUE(s->last_checkpoint_status().ok());
}

TEST(ShardTest, InitFromSafetensors) {
  const std::string dir = TestDir("init");
  const JobSpec spec = Spec(1, 2, ADAMW);
  std::vector<SafeTensor> tensors;
  for (const TensorSpec& t : GptTensorSpecs(spec.model())) {
    SafeTensor st{t.name, t.shape, std::vector<float>(t.num_elements())};
    for (size_t i = 0; i < st.data.size(); ++i) st.data[i] = 0.001f * i + 1;
    tensors.push_back(std::move(st));
  }
  const std::string path = dir + ".safetensors";
  ASSERT_TRUE(WriteSafetensorsFile(path, tensors).ok());
  ShardOptions o = Options(spec, 1);
  o.init_from_safetensors = path;
  auto s = MakeShard(o);
  ASSERT_NE(s, nullptr);
  for (const ChunkData& c : s->Snapshot().chunks) {
    for (size_t i = 0; i < c.params.size(); ++i) {
      ASSERT_EQ(c.params[i], 0.001f * (c.desc.begin() + i) + 1);
    }
  }
  // Wrong shape.
  auto bad = tensors;
  for (auto& t : bad) {
    if (t.name == "wpe.weight") t.shape = {8, 4};
  }
  ASSERT_TRUE(WriteSafetensorsFile(path, bad).ok());
  auto r = ParameterShard::Create(o);
  // Shard 1 may or may not hold wpe; check with both shards.
  o.shard = 0;
  auto r0 = ParameterShard::Create(o);
  EXPECT_TRUE(!r.ok() || !r0.ok());
  for (auto* st : {&r, &r0}) {
    if (!st->ok()) {
      EXPECT_EQ(st->status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_NE(st->status().message().find("wpe.weight"), std::string::npos);
    }
  }
  // Missing tensor.
  bad = tensors;
  bad.erase(bad.begin() + 3);
  const std::string missing = bad.size() > 0 ? tensors[3].name : "";
  ASSERT_TRUE(WriteSafetensorsFile(path, bad).ok());
  o.shard = 0;
  auto m0 = ParameterShard::Create(o);
  o.shard = 1;
  auto m1 = ParameterShard::Create(o);
  EXPECT_TRUE(!m0.ok() || !m1.ok());
  for (auto* st : {&m0, &m1}) {
    if (!st->ok()) {
      EXPECT_EQ(st->status().code(), absl::StatusCode::kNotFound);
      EXPECT_NE(st->status().message().find(missing), std::string::npos);
    }
  }
}

TEST(ShardTest, TensorInfo) {
  const JobSpec spec = Spec(1, 1, ADAMW);
  auto s = MakeShard(Options(spec, 0));
  auto info = s->TensorInfo("h.0.ln_1.weight");
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->tensors_size(), 1);
  EXPECT_NEAR(info->tensors(0).l2_norm(), std::sqrt(8.0), 1e-9);  // ones
  EXPECT_FALSE(info->tensors(0).weight_decay());
  EXPECT_EQ(info->tensors(0).shape_size(), 1);
  auto all = s->TensorInfo("");
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->tensors_size(),
            static_cast<int>(GptTensorSpecs(spec.model()).size()));
  EXPECT_EQ(s->TensorInfo("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(ShardTest, ConcurrentWorkersAndShutdown) {
  const JobSpec spec = Spec(2, 1, ADAMW);
  auto s = MakeShard(Options(spec, 0));
  absl::StatusOr<double> gn0, gn1;
  absl::StatusOr<std::vector<PullResponse>> pulled;
  std::thread waiter([&] { gn0 = s->GradNorm(0, absl::InfiniteFuture()); });
  std::thread puller([&] {
    PullRequest p;
    p.set_step(1);
    pulled = s->Pull(p, absl::InfiniteFuture());
  });
  std::thread w0([&] { ASSERT_TRUE(s->Push(Stream(*s, 0, 0)).ok()); });
  std::thread w1([&] {
    ASSERT_TRUE(s->Push(Stream(*s, 1, 0)).ok());
    gn1 = s->GradNorm(0, absl::InfiniteFuture());
  });
  w0.join();
  w1.join();
  waiter.join();
  ASSERT_TRUE(gn0.ok()) << gn0.status();
  ASSERT_TRUE(gn1.ok());
  EXPECT_EQ(*gn0, *gn1);
  ASSERT_TRUE(s->Apply(0, *gn0).ok());
  puller.join();
  ASSERT_TRUE(pulled.ok()) << pulled.status();
  EXPECT_EQ((*pulled)[0].version(), 1);

  // Shutdown releases a waiter.
  absl::StatusOr<double> late;
  std::thread blocked([&] { late = s->GradNorm(1, absl::InfiniteFuture()); });
  absl::SleepFor(absl::Milliseconds(20));
  s->Shutdown();
  blocked.join();
  EXPECT_EQ(late.status().code(), absl::StatusCode::kUnavailable);
}


}  // namespace
}  // namespace shard_test
}  // namespace lmps
