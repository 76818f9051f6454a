#include "server/shard.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <thread>

#include "absl/synchronization/notification.h"
#include "common/formats/safetensors.h"
#include "common/model/bf16.h"
#include "common/model/init.h"
#include "common/model/job_spec.h"
#include "common/model/parallel_layout.h"
#include "common/model/partition.h"
#include "common/rpc/status_util.h"
#include "gtest/gtest.h"
#include "server/checkpoint.h"
#include "server/tensor_codec.h"

namespace lmps {
namespace {

// A tiny model: 1 layer, width 8, vocabulary 16; chunks of <= 64 elements.
JobSpec Spec(int dp, int num_shards, OptimizerType type) {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(1);
  m->set_n_head(2);
  m->set_n_embd(8);
  m->set_block_size(4);
  m->set_vocab_size(16);
  spec.mutable_layout()->set_dp(dp);
  spec.mutable_layout()->set_num_shards(num_shards);
  spec.mutable_train()->set_batch_size(2 * dp);
  spec.mutable_train()->set_steps(10);
  spec.mutable_train()->set_checkpoint_interval(1000);
  OptimizerConfig* o = spec.mutable_optimizer();
  o->set_type(type);
  o->set_lr(0.1f);
  o->set_min_lr(0.1f);      // constant learning rate
  o->set_weight_decay(-1);  // none
  o->set_grad_clip(-1);     // no clipping
  spec.set_max_chunk_bytes(256);
  spec.set_max_message_bytes(1024);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

std::string TestDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(tmp ? tmp : "/tmp") + "/" + name;
  EXPECT_EQ(std::system(("rm -rf '" + dir + "'").c_str()), 0);
  return dir;
}

ShardOptions Options(const JobSpec& spec, int shard) {
  ShardOptions o;
  o.shard = shard;
  o.spec = spec;
  o.map = *ComputePartition(spec.model(), spec.layout().num_shards(),
                            spec.max_chunk_bytes());
  o.wait_timeout = absl::Seconds(10);
  return o;
}

std::unique_ptr<ParameterShard> MakeShard(ShardOptions o) {
  auto shard = ParameterShard::Create(std::move(o));
  EXPECT_TRUE(shard.ok()) << shard.status();
  return shard.ok() ? std::move(*shard) : nullptr;
}

// The gradient a rank pushes for element i of a chunk.
float Grad(int rank, int64_t step, const ChunkDesc& c, int64_t i) {
  return 0.01f * static_cast<float>((c.begin() + i + 3 * rank + step) % 7) -
         0.02f * static_cast<float>(rank);
}

void AppendValues(DType dtype, const std::vector<float>& v, int64_t begin,
                  int64_t n, std::string* out) {
  EncodePayload(dtype, v.data() + begin, n, out);
}

// A push stream of `rank` for `step` covering every chunk of the shard, each
// chunk cut into 2 slices and the slices spread over several messages.
std::vector<PushRequest> Stream(const ParameterShard& shard, int rank,
                                int64_t step, DType dtype = F32) {
  std::vector<PushRequest> stream;
  int slices_in_message = 0;
  for (const ChunkDesc& c : ChunksOfShard(shard.partition(), shard.shard())) {
    const int64_t n = c.end() - c.begin();
    std::vector<float> g(n);
    for (int64_t i = 0; i < n; ++i) g[i] = Grad(rank, step, c, i);
    const int64_t half = n / 2;
    for (auto [b, e] : {std::pair<int64_t, int64_t>{half, n}, {0, half}}) {
      if (stream.empty() || slices_in_message == 3) {
        stream.emplace_back();
        stream.back().set_worker_id("w");
        stream.back().set_dp_rank(rank);
        stream.back().set_step(step);
        stream.back().set_partition_version(shard.partition().version());
        slices_in_message = 0;
      }
      ChunkSlice* s = stream.back().add_slices();
      s->set_tensor(c.tensor());
      s->set_chunk(c.index());
      s->set_offset(b);
      s->set_dtype(dtype);
      AppendValues(dtype, g, b, e - b, s->mutable_data());
      ++slices_in_message;
    }
  }
  return stream;
}

absl::Time Soon() { return absl::Now() + absl::Milliseconds(100); }

std::string Bytes(const ShardCheckpoint& c) {
  std::string out;
  for (const ChunkData& chunk : c.chunks) {
    out.append(reinterpret_cast<const char*>(chunk.params.data()),
               4 * chunk.params.size());
    for (const auto& s : chunk.state) {
      out.append(reinterpret_cast<const char*>(s.data()), 4 * s.size());
    }
  }
  return out;
}

// Reassembles pulled messages into per-chunk values.
std::map<std::pair<std::string, int>, std::vector<float>> Values(
    const std::vector<PullResponse>& msgs, int64_t max_payload = 1 << 30) {
  std::map<std::pair<std::string, int>, std::vector<float>> out;
  for (const PullResponse& m : msgs) {
    int64_t payload = 0;
    for (const ChunkSlice& s : m.slices()) {
      const int64_t n = s.data().size() / DTypeSize(s.dtype());
      payload += s.data().size();
      auto& v = out[{s.tensor(), s.chunk()}];
      EXPECT_EQ(static_cast<int64_t>(v.size()), s.offset());
      v.resize(s.offset() + n);
      DecodePayload(s.dtype(), s.data(), v.data() + s.offset());
    }
    EXPECT_LE(payload, max_payload);
  }
  return out;
}

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

void ExpectRejected(ParameterShard* shard, std::vector<PushRequest> stream,
                    absl::StatusCode code, const std::string& needle) {
  const std::string before = Bytes(shard->Snapshot());
  auto r = shard->Push(stream);
  ASSERT_FALSE(r.ok()) << "expected: " << needle;
  EXPECT_EQ(r.status().code(), code) << r.status();
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
  EXPECT_EQ(Bytes(shard->Snapshot()), before);
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

// ---------------------------------------------------------------------------
// Consistency modes.
// ---------------------------------------------------------------------------

JobSpec WithMode(JobSpec spec, ConsistencyMode mode, int staleness = 0) {
  spec.mutable_train()->set_mode(mode);
  spec.mutable_train()->set_staleness(staleness);
  return spec;
}

PullRequest PullFor(int64_t step) {
  PullRequest p;
  p.set_step(step);
  return p;
}

// One SYNC-protocol step on `s` with every rank's push: GradNorm and Apply.
void SyncStep(ParameterShard* s, int64_t t) {
  const double ss = *s->GradNorm(t, Soon());
  ASSERT_EQ(*s->Apply(t, ss), t + 1);
}

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

// ---------------------------------------------------------------------------
// Pipeline and tensor parallel: chunks owned in parts by several workers.
// ---------------------------------------------------------------------------

// 2 layers, 2 heads, width 8, pp = 2, tp = 2; chunks of at most 10 elements,
// so they straddle the tensor-parallel slices' boundaries.
JobSpec ParallelSpec(int pp, int tp, int num_shards) {
  JobSpec spec = Spec(1, num_shards, ADAMW);
  spec.mutable_model()->set_n_layer(2);
  spec.mutable_layout()->set_pp(pp);
  spec.mutable_layout()->set_tp(tp);
  spec.set_max_chunk_bytes(40);  // messages: 1024 bytes, the minimum
  spec.mutable_optimizer()->set_grad_clip(0.5f);  // the norm is above it
  return spec;
}

ParallelLayout Layout(const JobSpec& spec) {
  absl::StatusOr<ParallelLayout> l =
      ParallelLayout::Create(spec.model(), spec.layout());
  EXPECT_TRUE(l.ok()) << l.status();
  return *l;
}

int TensorIndex(const ParallelLayout& layout, const std::string& name) {
  for (size_t t = 0; t < layout.tensors().size(); ++t) {
    if (layout.tensors()[t].name == name) return static_cast<int>(t);
  }
  ADD_FAILURE() << name;
  return -1;
}

// A random gradient per tensor (GptTensorSpecs order); wte's is what the
// first stage pushes, `wte_last` what the last stage pushes (the tied
// embedding's two contributions).
struct FullGradient {
  std::vector<std::vector<float>> tensors;
  std::vector<float> wte_last;
  // The gradient of a pp = 1 worker: the two wte parts summed.
  std::vector<float> Summed(int t) const {
    std::vector<float> g = tensors[t];
    if (t == 0) {
      for (size_t i = 0; i < g.size(); ++i) g[i] += wte_last[i];
    }
    return g;
  }
};

FullGradient RandomGradient(const JobSpec& spec, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-0.05f, 0.05f);
  FullGradient g;
  for (const TensorSpec& t : GptTensorSpecs(spec.model())) {
    g.tensors.emplace_back(t.num_elements());
    for (float& v : g.tensors.back()) v = u(rng);
  }
  EXPECT_EQ(GptTensorSpecs(spec.model())[0].name, "wte.weight");
  g.wte_last.resize(g.tensors[0].size());
  for (float& v : g.wte_last) v = u(rng);
  return g;
}

PushRequest Header(const ParameterShard& shard, int pp, int tp,
                   int64_t step) {
  PushRequest m;
  m.set_worker_id("w");
  m.set_dp_rank(0);
  m.set_pp_rank(pp);
  m.set_tp_rank(tp);
  m.set_step(step);
  m.set_partition_version(shard.partition().version());
  return m;
}

// The push stream of worker (pp, tp) of dp rank 0 to `shard`: its Pushed
// ranges of every chunk, each range cut in two slices, 3 slices a message.
// pp = tp = 1 (full = true): whole chunks of the summed gradient.
std::vector<PushRequest> PartStream(const ParameterShard& shard,
                                    const ParallelLayout& layout,
                                    const FullGradient& g, int pp, int tp,
                                    int64_t step) {
  std::vector<PushRequest> stream;
  int slices = 0;
  for (const ChunkDesc& c : ChunksOfShard(shard.partition(), shard.shard())) {
    const int t = TensorIndex(layout, c.tensor());
    const std::vector<float> values =
        layout.pp() == 1 ? g.Summed(t)
                         : (t == 0 && pp == layout.pp() - 1 && pp > 0
                                ? g.wte_last
                                : g.tensors[t]);
    for (const ElementRange& r :
         IntersectRanges(layout.Pushed(t, pp, tp), c.begin(), c.end())) {
      const int64_t mid = r.begin + r.size() / 2;
      for (auto [b, e] : {std::pair<int64_t, int64_t>{mid, r.end},
                          {r.begin, mid}}) {
        if (b == e) continue;
        if (stream.empty() || slices == 3) {
          stream.push_back(Header(shard, pp, tp, step));
          slices = 0;
        }
        ChunkSlice* s = stream.back().add_slices();
        s->set_tensor(c.tensor());
        s->set_chunk(c.index());
        s->set_offset(b);
        s->set_dtype(F32);
        EncodePayload(F32, values.data() + c.begin() + b, e - b,
                      s->mutable_data());
        ++slices;
      }
    }
  }
  return stream;
}

// Pushes `g` for `step` to every shard of a pp = tp = 1 job (`ref`) and, as
// the four workers' parts, to the pp = 2, tp = 2 job (`par`); applies both
// and expects equal parameters. Checks incompleteness before the last part
// and that retried parts are duplicates.
void PushBothAndApply(std::vector<std::unique_ptr<ParameterShard>>& ref,
                      std::vector<std::unique_ptr<ParameterShard>>& par,
                      const ParallelLayout& ref_layout,
                      const ParallelLayout& layout, const FullGradient& g,
                      int64_t step) {
  double ref_ss = 0, par_ss = 0;
  for (auto& shard : ref) {
    ASSERT_TRUE(
        shard->Push(PartStream(*shard, ref_layout, g, 0, 0, step)).ok());
    ref_ss += *shard->GradNorm(step, Soon());
  }
  // Last worker first on odd steps: arrival order must not matter.
  std::vector<std::pair<int, int>> order = {{0, 0}, {0, 1}, {1, 0}, {1, 1}};
  if (step % 2 == 1) std::reverse(order.begin(), order.end());
  for (auto& shard : par) {
    for (size_t w = 0; w < order.size(); ++w) {
      const auto [pp, tp] = order[w];
      const auto stream = PartStream(*shard, layout, g, pp, tp, step);
      if (stream.empty()) continue;  // nothing of this worker's here
      if (w + 1 == order.size()) {
        // Before the last part the step is incomplete, and the timeout
        // names the missing worker.
        auto gn = shard->GradNorm(step, absl::Now() + absl::Milliseconds(20));
        ASSERT_EQ(gn.status().code(), absl::StatusCode::kDeadlineExceeded);
        EXPECT_NE(gn.status().message().find(absl::StrCat(
                      "dp rank 0 (pp ", pp, ", tp ", tp, ") pushed 0 of")),
                  std::string::npos)
            << gn.status();
        EXPECT_EQ(shard->Apply(step, 1.0).status().code(),
                  absl::StatusCode::kFailedPrecondition);
      }
      auto r = shard->Push(stream);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_GT(r->chunks_accepted(), 0);
      EXPECT_EQ(r->chunks_duplicate(), 0);
      if (w == 0) {  // a retried RPC
        auto dup = shard->Push(stream);
        ASSERT_TRUE(dup.ok()) << dup.status();
        EXPECT_EQ(dup->chunks_accepted(), 0);
        EXPECT_EQ(dup->chunks_duplicate(), r->chunks_accepted());
      }
    }
    par_ss += *shard->GradNorm(step, Soon());
  }
  EXPECT_NEAR(par_ss, ref_ss, 1e-9 * ref_ss);
  for (auto& shard : ref) ASSERT_TRUE(shard->Apply(step, ref_ss).ok());
  for (auto& shard : par) ASSERT_TRUE(shard->Apply(step, par_ss).ok());
  for (size_t s = 0; s < ref.size(); ++s) {
    const ShardCheckpoint a = ref[s]->Snapshot(), b = par[s]->Snapshot();
    ASSERT_EQ(a.chunks.size(), b.chunks.size());
    for (size_t c = 0; c < a.chunks.size(); ++c) {
      ASSERT_EQ(a.chunks[c].params.size(), b.chunks[c].params.size());
      for (size_t i = 0; i < a.chunks[c].params.size(); ++i) {
        ASSERT_NEAR(a.chunks[c].params[i], b.chunks[c].params[i], 1e-6)
            << a.chunks[c].desc.ShortDebugString() << " element " << i;
      }
    }
  }
}

TEST(ShardTest, PipelineAndTensorPartsEqualAFullPush) {
  for (int num_shards : {1, 2}) {
    SCOPED_TRACE(num_shards);
    const JobSpec ref_spec = ParallelSpec(1, 1, num_shards);
    const JobSpec spec = ParallelSpec(2, 2, num_shards);
    const ParallelLayout ref_layout = Layout(ref_spec), layout = Layout(spec);
    std::vector<std::unique_ptr<ParameterShard>> ref, par;
    for (int s = 0; s < num_shards; ++s) {
      ref.push_back(MakeShard(Options(ref_spec, s)));
      par.push_back(MakeShard(Options(spec, s)));
      ASSERT_NE(par.back(), nullptr);
    }
    // Two steps: the second reuses the step slot, whose summed buffers must
    // start from zero again.
    for (int64_t step = 0; step < 2; ++step) {
      PushBothAndApply(ref, par, ref_layout, layout,
                       RandomGradient(spec, 7 + step), step);
      if (HasFailure()) return;
    }
  }
}

TEST(ShardTest, PartsOutsideTheWorkersShareAreRejected) {
  const JobSpec spec = ParallelSpec(2, 2, 1);
  const ParallelLayout layout = Layout(spec);
  auto shard = MakeShard(Options(spec, 0));
  ASSERT_NE(shard, nullptr);
  const FullGradient g = RandomGradient(spec, 3);
  using Code = absl::StatusCode;
  const auto chunks = ChunksOfShard(shard->partition(), 0);
  auto chunk_of = [&](const std::string& tensor, int64_t element) {
    for (const ChunkDesc& c : chunks) {
      if (c.tensor() == tensor && c.begin() <= element && element < c.end()) {
        return c;
      }
    }
    ADD_FAILURE() << tensor;
    return ChunkDesc();
  };
  auto slice = [&](PushRequest* m, const ChunkDesc& c, int64_t b, int64_t e) {
    ChunkSlice* s = m->add_slices();
    s->set_tensor(c.tensor());
    s->set_chunk(c.index());
    s->set_offset(b);
    s->set_dtype(F32);
    std::vector<float> v(e - b, 0.01f);
    EncodePayload(F32, v.data(), v.size(), s->mutable_data());
  };

  // tp rank 1 pushing a replicated LayerNorm tensor.
  PushRequest m = Header(*shard, 0, 1, 0);
  const ChunkDesc ln = chunk_of("h.0.ln_1.weight", 0);
  slice(&m, ln, 0, ln.end() - ln.begin());
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 "(dp rank 0, pp 0, tp 1) owns no part of tensor "
                 "'h.0.ln_1.weight' chunk 0");
  // Stage 1 pushing a block of stage 0.
  m = Header(*shard, 1, 0, 0);
  slice(&m, ln, 0, ln.end() - ln.begin());
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument, "owns no part of");

  // tp rank 0 pushing tp rank 1's slice of a chunk holding both (a chunk
  // of a column-parallel tensor straddling the boundary from tp rank 0's
  // rows to tp rank 1's).
  ChunkDesc straddle;
  std::vector<ElementRange> mine, theirs;
  for (const ChunkDesc& c : chunks) {
    const int t = TensorIndex(layout, c.tensor());
    if (layout.split(t) == TpSplit::kReplicated) continue;
    mine = IntersectRanges(layout.Pushed(t, 0, 0), c.begin(), c.end());
    theirs = IntersectRanges(layout.Pushed(t, 0, 1), c.begin(), c.end());
    if (mine.size() == 1 && theirs.size() == 1 &&
        mine[0].end == theirs[0].begin) {
      straddle = c;
      break;
    }
  }
  ASSERT_FALSE(straddle.tensor().empty());
  const std::string name =
      absl::StrCat("tensor '", straddle.tensor(), "' chunk ", straddle.index());
  m = Header(*shard, 0, 0, 0);
  slice(&m, straddle, theirs[0].begin, theirs[0].end);
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 absl::StrCat("push from (dp rank 0, pp 0, tp 0) for step 0: ",
                              name, " misses elements [", mine[0].begin, ", ",
                              mine[0].end, ") of its part"));
  // Its own part and one element more; its own part less one element.
  m = Header(*shard, 0, 0, 0);
  slice(&m, straddle, mine[0].begin, mine[0].end + 1);
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 absl::StrCat(name, " has elements [", mine[0].end, ", ",
                              mine[0].end + 1, ") outside its part"));
  m = Header(*shard, 0, 0, 0);
  slice(&m, straddle, mine[0].begin, mine[0].end - 1);
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 absl::StrCat("misses elements [", mine[0].end - 1, ", ",
                              mine[0].end, ") of its part"));
  // Both parts from tp rank 0.
  m = Header(*shard, 0, 0, 0);
  slice(&m, straddle, mine[0].begin, theirs[0].end);
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 "outside its part");
  // A row-parallel chunk holding several ranges of tp rank 1 in stage 1:
  // it pushes all but the first.
  ChunkDesc rows;
  std::vector<ElementRange> part;
  for (const ChunkDesc& c : chunks) {
    const int t = TensorIndex(layout, c.tensor());
    if (layout.split(t) != TpSplit::kRow) continue;
    part = IntersectRanges(layout.Pushed(t, 1, 1), c.begin(), c.end());
    if (part.size() >= 2) {
      rows = c;
      break;
    }
  }
  ASSERT_FALSE(rows.tensor().empty());
  m = Header(*shard, 1, 1, 0);
  for (size_t i = 1; i < part.size(); ++i) {
    slice(&m, rows, part[i].begin, part[i].end);
  }
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 absl::StrCat("(dp rank 0, pp 1, tp 1) for step 0: tensor '",
                              rows.tensor(), "' chunk ", rows.index(),
                              " misses elements [", part[0].begin, ", ",
                              part[0].end, ")"));
  // Ranks out of range, or changing within the stream.
  auto good = PartStream(*shard, layout, g, 1, 1, 0);
  ASSERT_GE(good.size(), 2u);
  auto s = good;
  for (auto& msg : s) msg.set_pp_rank(2);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "out of range");
  s = good;
  for (auto& msg : s) msg.set_tp_rank(-1);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "out of range");
  s = good;
  s.back().set_tp_rank(0);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "stream started");

  // Nothing was received: the good parts still complete the step.
  for (int pp = 0; pp < 2; ++pp) {
    for (int tp = 0; tp < 2; ++tp) {
      auto r = shard->Push(PartStream(*shard, layout, g, pp, tp, 0));
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->chunks_duplicate(), 0);
    }
  }
  EXPECT_TRUE(shard->GradNorm(0, Soon()).ok());
  EXPECT_EQ(shard->duplicate_chunks(), 0);
}

TEST(ShardTest, OwnedOnlyPullReturnsExactlyTheHeldRanges) {
  const JobSpec spec = ParallelSpec(2, 2, 2);
  const ParallelLayout layout = Layout(spec);
  std::vector<std::unique_ptr<ParameterShard>> shards;
  for (int s = 0; s < 2; ++s) shards.push_back(MakeShard(Options(spec, s)));
  const std::vector<TensorSpec> specs = GptTensorSpecs(spec.model());
  // The full parameters (deterministic initialisation).
  std::vector<std::vector<float>> full;
  for (const TensorSpec& t : specs) {
    full.emplace_back(t.num_elements());
    InitTensorRange(t, spec.train().seed(), 0, t.num_elements(),
                    full.back().data());
  }
  std::map<std::pair<std::string, int>, int64_t> begin_of;
  for (const ChunkDesc& c : shards[0]->partition().chunks()) {
    begin_of[{c.tensor(), c.index()}] = c.begin();
  }
  for (int pp = 0; pp < 2; ++pp) {
    for (int tp = 0; tp < 2; ++tp) {
      SCOPED_TRACE(absl::StrCat("pp ", pp, " tp ", tp));
      // Elements returned, per tensor.
      std::vector<std::vector<int>> seen(specs.size());
      for (size_t t = 0; t < specs.size(); ++t) {
        seen[t].assign(specs[t].num_elements(), 0);
      }
      int64_t floats = 0;
      for (auto& shard : shards) {
        PullRequest pull;
        pull.set_owned_only(true);
        pull.set_pp_rank(pp);
        pull.set_tp_rank(tp);
        auto msgs = shard->Pull(pull, Soon());
        ASSERT_TRUE(msgs.ok()) << msgs.status();
        for (const PullResponse& msg : *msgs) {
          int64_t payload = 0;
          for (const ChunkSlice& s : msg.slices()) {
            payload += s.data().size();
            const int t = TensorIndex(layout, s.tensor());
            std::vector<float> v(s.data().size() / 4);
            DecodePayload(F32, s.data(), v.data());
            const int64_t at =
                begin_of.at({s.tensor(), s.chunk()}) + s.offset();
            for (size_t i = 0; i < v.size(); ++i) {
              ++seen[t][at + i];
              ASSERT_EQ(v[i], full[t][at + i]) << s.tensor() << " " << at + i;
            }
            floats += v.size();
          }
          EXPECT_LE(payload, spec.max_message_bytes());
        }
      }
      EXPECT_EQ(floats, layout.HeldElements(pp, tp));
      for (size_t t = 0; t < specs.size(); ++t) {
        std::vector<int> want(specs[t].num_elements(), 0);
        for (const ElementRange& r : layout.Held(t, pp, tp)) {
          std::fill(want.begin() + r.begin, want.begin() + r.end, 1);
        }
        EXPECT_EQ(seen[t], want) << specs[t].name;
      }
    }
  }
  // The tensors filter.
  PullRequest pull;
  pull.set_owned_only(true);
  pull.set_pp_rank(1);
  pull.set_tp_rank(1);
  pull.add_tensors("h.1.attn.c_attn.bias");
  int64_t floats = 0;
  for (auto& shard : shards) {
    auto msgs = shard->Pull(pull, Soon());
    ASSERT_TRUE(msgs.ok()) << msgs.status();
    for (const PullResponse& msg : *msgs) {
      for (const ChunkSlice& s : msg.slices()) {
        EXPECT_EQ(s.tensor(), "h.1.attn.c_attn.bias");
        floats += s.data().size() / 4;
      }
    }
  }
  EXPECT_EQ(floats, 12);  // q, k and v: 4 of 8 each
  // Ranks out of range.
  pull.set_pp_rank(2);
  EXPECT_EQ(shards[0]->Pull(pull, Soon()).status().code(),
            absl::StatusCode::kInvalidArgument);
  pull.set_pp_rank(0);
  pull.set_tp_rank(-1);
  EXPECT_EQ(shards[0]->Pull(pull, Soon()).status().code(),
            absl::StatusCode::kInvalidArgument);
  // owned_only = false: whole chunks, ranks ignored.
  pull.set_owned_only(false);
  pull.clear_tensors();
  floats = 0;
  for (auto& shard : shards) {
    auto msgs = shard->Pull(pull, Soon());
    ASSERT_TRUE(msgs.ok()) << msgs.status();
    for (const PullResponse& msg : *msgs) {
      for (const ChunkSlice& s : msg.slices()) floats += s.data().size() / 4;
    }
  }
  EXPECT_EQ(floats, shards[0]->num_elements() + shards[1]->num_elements());
}

// Elastic resize: StopAt(s) checkpoints step s once it exists and refuses
// pulls of steps >= s (workers stop after s - 1); a stop step the shard is
// already past is refused, one it is at checkpoints at once.
TEST(ShardTest, StopAtCheckpointsTheBoundaryAndEndsPulls) {
  const std::string dir = TestDir("stop_at");
  JobSpec spec = Spec(2, 2, ADAMW);
  spec.mutable_train()->set_checkpoint_interval(100);
  ShardOptions o = Options(spec, 1);
  o.checkpoint_dir = dir;
  auto a = MakeShard(o);
  auto step = [](ParameterShard* s, int64_t t) {
    ASSERT_TRUE(s->Push(Stream(*s, 0, t)).ok());
    ASSERT_TRUE(s->Push(Stream(*s, 1, t)).ok());
    const double ss = *s->GradNorm(t, Soon());
    ASSERT_TRUE(s->Apply(t, ss).ok());
  };
  ASSERT_EQ(*a->StopAt(2), 0);
  step(a.get(), 0);
  EXPECT_TRUE(a->Pull(PullFor(1), Soon()).ok());
  step(a.get(), 1);
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 1), std::vector<int64_t>{2});
  auto pull = a->Pull(PullFor(2), Soon());
  EXPECT_EQ(pull.status().code(), absl::StatusCode::kAborted);
  EXPECT_NE(pull.status().message().find("for a resize"), std::string::npos);
  EXPECT_EQ(ReasonOf(pull.status()), STOPPED_FOR_RESIZE);
  EXPECT_EQ(ReasonOf(a->GradNorm(2, Soon()).status()), STOPPED_FOR_RESIZE);
  EXPECT_EQ(a->StopAt(1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReasonOf(a->StopAt(1).status()), STOP_STEP_PASSED);

  const std::string dir2 = TestDir("stop_at_now");
  o.checkpoint_dir = dir2;
  auto b = MakeShard(o);
  step(b.get(), 0);
  ASSERT_EQ(*b->StopAt(1), 1);  // at the boundary already: checkpoint now
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir2, 1), std::vector<int64_t>{1});
}

}  // namespace
}  // namespace lmps
