// PsClient against real parameter-server shards (ParameterShard behind
// ParameterServerService, in-process on 127.0.0.1): the local buffers of a
// pipeline x tensor-parallel view, and what each worker transfers.
#include "worker/ps_client.h"

#include <cmath>
#include <limits>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/model/bf16.h"
#include "common/model/job_spec.h"
#include "common/model/model_spec.h"
#include "common/model/parallel_layout.h"
#include "common/model/partition.h"
#include "common/rpc/grpc_server.h"
#include "gtest/gtest.h"
#include "tests/testing/ps_cluster.h"
#include "worker/ps_client_test_util.h"

namespace lmps {
namespace {

using ::lmps::testing::Cluster;
using ::lmps::testing::FullGradient;
using ::lmps::testing::Gradient;
using ::lmps::testing::RandomGradient;
using ::lmps::testing::Spec;


// `full` (flat, whole model) gathered into the local layout of (pp, tp).
std::vector<float> Gather(const ParallelLayout& layout, int pp, int tp,
                          const std::vector<float>& full) {
  std::vector<float> out;
  int64_t base = 0;
  for (size_t t = 0; t < layout.tensors().size(); ++t) {
    for (const ElementRange& r : layout.Held(t, pp, tp)) {
      out.insert(out.end(), full.begin() + base + r.begin,
                 full.begin() + base + r.end);
    }
    base += layout.tensors()[t].num_elements();
  }
  return out;
}

// The local gradient worker (pp, tp) computes: its stage's values where it
// holds a tensor; NaN where it holds but must not push (replicated tensors
// on tp ranks > 0), which a shard would reject.
std::vector<float> LocalGradient(const ParallelLayout& layout, int pp, int tp,
                                 const Gradient& g) {
  std::vector<float> out;
  for (size_t t = 0; t < layout.tensors().size(); ++t) {
    const bool pushes = !layout.Pushed(t, pp, tp).empty();
    const std::vector<float>& values =
        t == 0 && pp == layout.pp() - 1 && pp > 0 ? g.last : g.first[t];
    for (const ElementRange& r : layout.Held(t, pp, tp)) {
      for (int64_t i = r.begin; i < r.end; ++i) {
        out.push_back(pushes ? values[i]
                             : std::numeric_limits<float>::quiet_NaN());
      }
    }
  }
  return out;
}

int64_t PushedElements(const ParallelLayout& layout, int pp, int tp) {
  int64_t n = 0;
  for (size_t t = 0; t < layout.tensors().size(); ++t) {
    for (const ElementRange& r : layout.Pushed(t, pp, tp)) n += r.size();
  }
  return n;
}

void ExpectNear(const std::vector<float>& got, const std::vector<float>& want,
                const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 1e-6) << what << " element " << i;
  }
}

TEST(PsClientTest, PipelineAndTensorViewsMatchAFullModelClient) {
  const JobSpec ref_spec = Spec(1, 1), spec = Spec(2, 2);
  Cluster ref_cluster, cluster;
  ASSERT_TRUE(ref_cluster.Start(ref_spec).ok());
  ASSERT_TRUE(cluster.Start(spec).ok());
  absl::StatusOr<ParallelLayout> layout =
      ParallelLayout::Create(spec.model(), spec.layout());
  ASSERT_TRUE(layout.ok()) << layout.status();

  absl::StatusOr<std::unique_ptr<PsClient>> ref = ref_cluster.Client();
  ASSERT_TRUE(ref.ok()) << ref.status();
  const int64_t total = (*ref)->num_parameters();
  std::vector<std::unique_ptr<PsClient>> clients;  // index pp * 2 + tp
  for (int pp = 0; pp < 2; ++pp) {
    for (int tp = 0; tp < 2; ++tp) {
      absl::StatusOr<std::unique_ptr<PsClient>> c =
          cluster.Client({&*layout, pp, tp});
      ASSERT_TRUE(c.ok()) << c.status();
      EXPECT_EQ((*c)->num_parameters(), layout->HeldElements(pp, tp));
      EXPECT_LT((*c)->num_parameters(), total);
      clients.push_back(std::move(*c));
    }
  }

  std::vector<float> full(total);
  for (int64_t step = 0; step < 2; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    ASSERT_TRUE((*ref)->Pull(step, full.data()).ok());
    const Gradient g = RandomGradient(spec.model(), 11 + step);
    ASSERT_TRUE((*ref)->Push(step, "ref", 0, FullGradient(g).data()).ok());
    absl::StatusOr<double> ref_ss = (*ref)->GradNorm(step);
    ASSERT_TRUE(ref_ss.ok()) << ref_ss.status();
    ASSERT_TRUE((*ref)->Apply(step, *ref_ss).ok());

    for (int w = 0; w < 4; ++w) {
      const int pp = w / 2, tp = w % 2;
      PsClient& c = *clients[w];
      std::vector<float> local(c.num_parameters());
      const int64_t pulled = c.stats().bytes_pulled;
      int64_t version = -1;
      ASSERT_TRUE(c.Pull(step, local.data(), &version).ok());
      EXPECT_EQ(version, step);
      EXPECT_EQ(c.stats().bytes_pulled - pulled,
                4 * layout->HeldElements(pp, tp));
      ExpectNear(local, Gather(*layout, pp, tp, full),
                 absl::StrCat("pulled by pp ", pp, " tp ", tp));
      const int64_t pushed = c.stats().bytes_pushed;
      absl::Status s = c.Push(step, absl::StrCat("worker-", w), 0,
                              LocalGradient(*layout, pp, tp, g).data());
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(c.stats().bytes_pushed - pushed,
                4 * PushedElements(*layout, pp, tp));
    }
    for (auto& c : clients) {
      absl::StatusOr<double> ss = c->GradNorm(step);
      ASSERT_TRUE(ss.ok()) << ss.status();
      EXPECT_NEAR(*ss, *ref_ss, 1e-9 * *ref_ss);
      absl::StatusOr<int64_t> v = c->Apply(step, *ss);
      ASSERT_TRUE(v.ok()) << v.status();
      EXPECT_EQ(*v, step + 1);
    }
  }
  // The parameters after both steps.
  ASSERT_TRUE((*ref)->Pull(2, full.data()).ok());
  for (int w = 0; w < 4; ++w) {
    std::vector<float> local(clients[w]->num_parameters());
    ASSERT_TRUE(clients[w]->Pull(2, local.data()).ok());
    ExpectNear(local, Gather(*layout, w / 2, w % 2, full),
               absl::StrCat("worker ", w, " after two steps"));
  }
  // No worker transfers what it does not own: tp rank 1 pushes less than
  // tp rank 0 of its stage (not the replicated tensors).
  for (int pp = 0; pp < 2; ++pp) {
    EXPECT_LT(clients[pp * 2 + 1]->stats().bytes_pushed,
              clients[pp * 2]->stats().bytes_pushed);
    EXPECT_LT(PushedElements(*layout, pp, 1), PushedElements(*layout, pp, 0));
  }
}

// Failover when the client knows no backup for a shard (none had
// registered when it last asked the scheduler) and the known node is gone:
// it asks the resolver at once instead of calling the dead node until
// failover_timeout.
TEST(PsClientTest, FailoverWithNoKnownBackupAsksWhereTheShardIsNow) {
  JobSpec spec = Spec(/*pp=*/1, /*tp=*/1);
  spec.mutable_layout()->set_num_shards(1);
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(spec).ok());
  const std::string address = cluster.addresses()[0];

  std::vector<std::shared_ptr<grpc::Channel>> channels;
  channels.push_back(MakeChannel("127.0.0.1:1"));
  PsClientOptions options;
  options.max_message_bytes = spec.max_message_bytes();
  options.rpc_timeout = absl::Seconds(5);
  options.failover_timeout = absl::Seconds(5);
  absl::StatusOr<std::unique_ptr<PsClient>> client = PsClient::Create(
      spec.model(), cluster.map(), std::move(channels), {"127.0.0.1:1"}, options);
  ASSERT_TRUE(client.ok()) << client.status();
  int resolved = 0;
  (*client)->SetBackups(
      {""},
      [](const std::string& a) { return MakeChannel(a); },
      [&](int) -> absl::StatusOr<PsClient::ShardNodes> {
        ++resolved;
        return PsClient::ShardNodes{address, ""};
      });
  std::vector<float> params((*client)->num_parameters());
  const absl::Time start = absl::Now();
  const absl::Status pulled = (*client)->Pull(0, params.data());
  EXPECT_TRUE(pulled.ok()) << pulled;
  EXPECT_LT(absl::Now() - start, absl::Seconds(4));
  EXPECT_EQ(resolved, 1);
  EXPECT_GE((*client)->stats().failovers.load(), 1);
}

TEST(PsClientTest, StatsCountPayloadBytesWithoutAView) {
  const JobSpec spec = Spec(1, 1);
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(spec).ok());
  absl::StatusOr<std::unique_ptr<PsClient>> c = cluster.Client();
  ASSERT_TRUE(c.ok()) << c.status();
  const int64_t n = (*c)->num_parameters();
  EXPECT_EQ(n, GptNumParameters(spec.model()));
  std::vector<float> params(n), grads(n, 0.01f);
  ASSERT_TRUE((*c)->Pull(0, params.data()).ok());
  EXPECT_EQ((*c)->stats().bytes_pulled, 4 * n);
  ASSERT_TRUE((*c)->Push(0, "w", 0, grads.data()).ok());
  EXPECT_EQ((*c)->stats().bytes_pushed, 4 * n);
  // A view of the pp = tp = 1 layout is the whole model, the same buffers.
  absl::StatusOr<ParallelLayout> layout =
      ParallelLayout::Create(spec.model(), spec.layout());
  ASSERT_TRUE(layout.ok());
  absl::StatusOr<std::unique_ptr<PsClient>> v = cluster.Client({&*layout});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ((*v)->num_parameters(), n);
  std::vector<float> again(n);
  ASSERT_TRUE((*v)->Pull(0, again.data()).ok());
  EXPECT_EQ(again, params);
  // Ranks outside the layout.
  EXPECT_EQ(cluster.Client({&*layout, 1, 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The ring all-reduce workers' local norm equals the shards' GradNorm of
// the same gradient to the bit (2 shards, many chunks; dp 2: the shards
// add both ranks' pushes, then divide), and leaves the mean in the buffer.
TEST(PsClientTest, LocalMeanAndSumSquaresIsTheShardsGradNorm) {
  JobSpec spec = Spec(1, 1);
  spec.mutable_layout()->set_dp(2);
  spec.mutable_train()->set_batch_size(4);
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(spec).ok());
  absl::StatusOr<std::unique_ptr<PsClient>> c = cluster.Client();
  ASSERT_TRUE(c.ok()) << c.status();
  const int64_t n = (*c)->num_parameters();
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 0.3f);
  std::vector<float> g0(n), g1(n), sum(n);
  for (int64_t i = 0; i < n; ++i) {
    g0[i] = d(rng);
    g1[i] = d(rng);
    sum[i] = g0[i] + g1[i];
  }
  ASSERT_TRUE((*c)->Push(0, "w0", 0, g0.data()).ok());
  ASSERT_TRUE((*c)->Push(0, "w1", 1, g1.data()).ok());
  absl::StatusOr<double> shards = (*c)->GradNorm(0);
  ASSERT_TRUE(shards.ok()) << shards.status();
  EXPECT_EQ((*c)->MeanAndSumSquares(2.0f, sum.data()), *shards);
  EXPECT_EQ(sum[n - 1], (g0[n - 1] + g1[n - 1]) / 2.0f);
}

TEST(PsClientTest, PullDtypeDefaultsToBf16OnlyOnCuda) {
  EXPECT_EQ(ResolvePullDtype(DTYPE_UNSPECIFIED, "cpu"), F32);
  EXPECT_EQ(ResolvePullDtype(DTYPE_UNSPECIFIED, "cuda"), BF16);
  EXPECT_EQ(ResolvePullDtype(DTYPE_UNSPECIFIED, "cuda:1"), BF16);
  EXPECT_EQ(ResolvePullDtype(DTYPE_UNSPECIFIED, "cudax"), F32);
  EXPECT_EQ(ResolvePullDtype(F32, "cuda"), F32);
  EXPECT_EQ(ResolvePullDtype(BF16, "cpu"), BF16);
}

TEST(PsClientTest, LayerwisePullDefaultsToOnOnlyOnCuda) {
  EXPECT_FALSE(ResolveLayerwisePull(LAYERWISE_PULL_DEFAULT, "cpu"));
  EXPECT_FALSE(ResolveLayerwisePull(LAYERWISE_PULL_DEFAULT, "sim:100"));
  EXPECT_TRUE(ResolveLayerwisePull(LAYERWISE_PULL_DEFAULT, "cuda"));
  EXPECT_TRUE(ResolveLayerwisePull(LAYERWISE_PULL_DEFAULT, "cuda:1"));
  EXPECT_FALSE(ResolveLayerwisePull(LAYERWISE_PULL_DEFAULT, "cudax"));
  EXPECT_TRUE(ResolveLayerwisePull(LAYERWISE_PULL_ON, "cpu"));
  EXPECT_FALSE(ResolveLayerwisePull(LAYERWISE_PULL_OFF, "cuda"));
}

// train.pull_dtype BF16: half the bytes, every value the fp32 master
// rounded to nearest even, with and without a pp x tp view.
TEST(PsClientTest, Bf16PullsHalveTheBytesAndRoundEachValue) {
  for (const auto& [pp, tp] : {std::pair{1, 1}, std::pair{2, 2}}) {
    const JobSpec spec = Spec(pp, tp);
    Cluster cluster;
    ASSERT_TRUE(cluster.Start(spec).ok());
    absl::StatusOr<ParallelLayout> layout =
        ParallelLayout::Create(spec.model(), spec.layout());
    ASSERT_TRUE(layout.ok());
    PsClientOptions f32, bf16;
    bf16.pull_dtype = BF16;
    for (int p = 0; p < pp; ++p) {
      for (int t = 0; t < tp; ++t) {
        const PsClientView view = {pp * tp > 1 ? &*layout : nullptr, p, t};
        absl::StatusOr<std::unique_ptr<PsClient>> a = cluster.Client(view, f32);
        absl::StatusOr<std::unique_ptr<PsClient>> b =
            cluster.Client(view, bf16);
        ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
        const int64_t n = (*a)->num_parameters();
        std::vector<float> exact(n), rounded(n);
        ASSERT_TRUE((*a)->Pull(0, exact.data()).ok());
        ASSERT_TRUE((*b)->Pull(0, rounded.data()).ok());
        EXPECT_EQ((*a)->stats().bytes_pulled, 4 * n);
        EXPECT_EQ((*b)->stats().bytes_pulled, 2 * n);
        int64_t differ = 0;
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_EQ(rounded[i], Bf16BitsToFloat(FloatToBf16Bits(exact[i])))
              << "pp " << p << " tp " << t << " element " << i;
          differ += rounded[i] != exact[i];
        }
        EXPECT_GT(differ, n / 2);  // the init values do need rounding
      }
    }
  }
  PsClientOptions bad;
  bad.pull_dtype = INT8;
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(Spec(1, 1)).ok());
  absl::StatusOr<std::unique_ptr<PsClient>> c = cluster.Client({}, bad);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("pull dtype must be F32 or BF16"),
            std::string::npos)
      << c.status();
}

// PushChunks over growing ranges cut anywhere (chunks straddle the cuts,
// some calls add nothing) pushes every chunk exactly once, whole: the
// shards end up with exactly what one Push per worker gives, bit for bit,
// in f32 and bf16, without a view and with a pp x tp view.
TEST(PsClientTest, PushChunksOverGrowingRangesEqualsOnePush) {
  for (const DType dtype : {F32, BF16}) {
    for (const int parallel : {1, 2}) {
      SCOPED_TRACE(absl::StrCat("dtype ", DType_Name(dtype), " pp = tp = ",
                                parallel));
      const JobSpec spec = Spec(parallel, parallel);
      absl::StatusOr<ParallelLayout> layout =
          ParallelLayout::Create(spec.model(), spec.layout());
      ASSERT_TRUE(layout.ok()) << layout.status();
      Cluster whole, parts;
      ASSERT_TRUE(whole.Start(spec).ok());
      ASSERT_TRUE(parts.Start(spec).ok());
      PsClientOptions options;
      options.push_dtype = dtype;
      std::vector<std::unique_ptr<PsClient>> by_push, by_chunks;
      for (int w = 0; w < parallel * parallel; ++w) {
        PsClientView view;
        if (parallel > 1) view = {&*layout, w / parallel, w % parallel};
        auto a = whole.Client(view, options);
        auto b = parts.Client(view, options);
        ASSERT_TRUE(a.ok() && b.ok());
        by_push.push_back(std::move(*a));
        by_chunks.push_back(std::move(*b));
      }
      for (int64_t step = 0; step < 2; ++step) {
        const Gradient g = RandomGradient(spec.model(), 21 + step);
        for (int w = 0; w < parallel * parallel; ++w) {
          const std::string id = absl::StrCat("worker-", w);
          const std::vector<float> grads =
              parallel == 1
                  ? FullGradient(g)
                  : LocalGradient(*layout, w / parallel, w % parallel, g);
          std::vector<float> params(by_push[w]->num_parameters());
          ASSERT_TRUE(by_push[w]->Pull(step, params.data()).ok());
          ASSERT_TRUE(by_chunks[w]->Pull(step, params.data()).ok());
          ASSERT_TRUE(by_push[w]->Push(step, id, 0, grads.data()).ok());
          const int64_t n = by_chunks[w]->num_parameters();
          const int64_t pushed = by_chunks[w]->stats().bytes_pushed;
          const int64_t rpcs = by_chunks[w]->stats().rpcs;
          ElementRange done;  // empty
          const std::vector<int64_t> begins = {
              n, n - 3, n - n / 5, n / 2 + 1, n / 2 + 1, n / 3, 7, 0};
          for (const int64_t begin : begins) {
            const ElementRange range{begin, n};
            absl::Status s = by_chunks[w]->PushChunks(step, id, 0,
                                                      grads.data(), range,
                                                      done);
            ASSERT_TRUE(s.ok()) << s;
            done = range;
          }
          // The same bytes as one Push, in more streams.
          EXPECT_EQ(by_chunks[w]->stats().bytes_pushed - pushed,
                    by_push[w]->stats().bytes_pushed / (step + 1));
          EXPECT_GT(by_chunks[w]->stats().rpcs - rpcs, 2);
        }
        absl::StatusOr<double> ss_whole = by_push[0]->GradNorm(step);
        absl::StatusOr<double> ss_parts = by_chunks[0]->GradNorm(step);
        ASSERT_TRUE(ss_whole.ok()) << ss_whole.status();
        ASSERT_TRUE(ss_parts.ok()) << ss_parts.status();
        EXPECT_EQ(*ss_whole, *ss_parts);
        ASSERT_TRUE(by_push[0]->Apply(step, *ss_whole).ok());
        ASSERT_TRUE(by_chunks[0]->Apply(step, *ss_parts).ok());
      }
      for (int w = 0; w < parallel * parallel; ++w) {
        std::vector<float> a(by_push[w]->num_parameters()), b(a.size());
        ASSERT_TRUE(by_push[w]->Pull(2, a.data()).ok());
        ASSERT_TRUE(by_chunks[w]->Pull(2, b.data()).ok());
        EXPECT_EQ(a, b) << "worker " << w;
      }
    }
  }
}

// max_push_stream_bytes cuts each shard's push into several streams of
// whole chunks (bounding what a shard holds per pusher); the shards take
// the same gradient as from one stream per shard, bit for bit.
// With streams_per_shard 3 as well: the pulls and the push streams run 3 at
// a time per shard (PullRequest.streams), with the same result.
TEST(PsClientTest, PushInBoundedStreamsEqualsOneStreamPerShard) {
  for (const auto& [dtype, streams] : {std::pair<DType, int>{F32, 1},
                                      {BF16, 1}, {F32, 3}, {BF16, 3}}) {
    SCOPED_TRACE(absl::StrCat(DType_Name(dtype), " streams ", streams));
    const JobSpec spec = Spec(1, 1);
    Cluster one, bounded;
    ASSERT_TRUE(one.Start(spec).ok());
    ASSERT_TRUE(bounded.Start(spec).ok());
    PsClientOptions options;
    options.push_dtype = dtype;
    options.max_push_stream_bytes = 0;
    auto a = one.Client({}, options);
    options.max_push_stream_bytes = 1024;
    options.streams_per_shard = streams;
    auto b = bounded.Client({}, options);
    ASSERT_TRUE(a.ok() && b.ok());
    PsClient& whole = **a;
    PsClient& cut = **b;
    for (int64_t step = 0; step < 2; ++step) {
      const std::vector<float> grads =
          FullGradient(RandomGradient(spec.model(), 5 + step));
      std::vector<float> params(whole.num_parameters());
      std::vector<float> cut_params(params.size());
      const int64_t pulls_before = cut.stats().rpcs;
      ASSERT_TRUE(whole.Pull(step, params.data()).ok());
      ASSERT_TRUE(cut.Pull(step, cut_params.data()).ok());
      EXPECT_EQ(cut_params, params);
      EXPECT_EQ(cut.stats().rpcs - pulls_before, 2 * streams);  // 2 shards
      const int64_t rpcs_whole = whole.stats().rpcs;
      const int64_t rpcs_cut = cut.stats().rpcs;
      ASSERT_TRUE(whole.Push(step, "w", 0, grads.data()).ok());
      ASSERT_TRUE(cut.Push(step, "w", 0, grads.data()).ok());
      // One stream per shard against at least payload / 1024 streams.
      EXPECT_EQ(whole.stats().rpcs - rpcs_whole, 2);
      const int64_t payload = cut.stats().bytes_pushed / (step + 1);
      EXPECT_GE(cut.stats().rpcs - rpcs_cut, payload / 1024);
      EXPECT_EQ(cut.stats().bytes_pushed, whole.stats().bytes_pushed);
      absl::StatusOr<double> ss_whole = whole.GradNorm(step);
      absl::StatusOr<double> ss_cut = cut.GradNorm(step);
      ASSERT_TRUE(ss_whole.ok() && ss_cut.ok());
      EXPECT_EQ(*ss_whole, *ss_cut);
      ASSERT_TRUE(whole.Apply(step, *ss_whole).ok());
      ASSERT_TRUE(cut.Apply(step, *ss_cut).ok());
    }
    std::vector<float> p_whole(whole.num_parameters()), p_cut(p_whole.size());
    ASSERT_TRUE(whole.Pull(2, p_whole.data()).ok());
    ASSERT_TRUE(cut.Pull(2, p_cut.data()).ok());
    EXPECT_EQ(p_whole, p_cut);
  }
}

// Compressed pushes (train.compression) with plain SGD at lr 1: each
// step's parameter change is minus what the shards decoded. Top-k and
// random-k send about `ratio` of the elements (8 bytes each), the rest
// stays in the worker's residual and goes in the next step (a zero
// gradient then sends exactly what was held back); int8 is within half a
// quantisation step and about 4x smaller than fp32.
TEST(PsClientTest, CompressedPushesReachTheShardsWithErrorFeedback) {
  for (const CompressionKind kind : {TOPK, RANDOMK, QUANT_INT8}) {
    SCOPED_TRACE(CompressionKind_Name(kind));
    JobSpec spec = Spec(1, 1);
    OptimizerConfig* o = spec.mutable_optimizer();
    o->set_type(SGD);
    o->set_lr(1.0f);
    o->set_min_lr(1.0f);
    o->set_momentum(-1);
    o->set_weight_decay(-1);
    o->set_grad_clip(-1);
    // The shards refuse slices of another kind than the job's.
    CompressionConfig* compression = spec.mutable_train()->mutable_compression();
    compression->set_kind(kind);
    if (kind != QUANT_INT8) compression->set_ratio(0.25f);
    Cluster cluster;
    ASSERT_TRUE(cluster.Start(spec).ok());
    PsClientOptions options;
    options.compression = *compression;
    options.seed = spec.train().seed();
    absl::StatusOr<std::unique_ptr<PsClient>> c =
        cluster.Client({}, options);
    ASSERT_TRUE(c.ok()) << c.status();
    const int64_t n = (*c)->num_parameters();
    const std::vector<float> g = FullGradient(RandomGradient(spec.model(), 5));
    const std::vector<float> zero(n, 0.0f);
    std::vector<float> before(n), after(n);
    std::vector<std::vector<float>> sent;
    std::vector<int64_t> bytes;
    for (int64_t step = 0; step < 2; ++step) {
      ASSERT_TRUE((*c)->Pull(step, before.data()).ok());
      const int64_t pushed = (*c)->stats().bytes_pushed;
      absl::Status st =
          (*c)->Push(step, "w", 0, step == 0 ? g.data() : zero.data());
      ASSERT_TRUE(st.ok()) << st;
      bytes.push_back((*c)->stats().bytes_pushed - pushed);
      absl::StatusOr<double> ss = (*c)->GradNorm(step);
      ASSERT_TRUE(ss.ok()) << ss.status();
      ASSERT_TRUE((*c)->Apply(step, *ss).ok());
      ASSERT_TRUE((*c)->Pull(step + 1, after.data()).ok());
      sent.emplace_back(n);
      for (int64_t i = 0; i < n; ++i) sent[step][i] = before[i] - after[i];
    }
    if (kind == QUANT_INT8) {
      float max = 0;
      for (float x : g) max = std::max(max, std::fabs(x));
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_NEAR(sent[0][i], g[i], 0.5f * max / 127 + 1e-5f) << i;
      }
      // One byte per element and a 4-byte scale per slice (<= 10 elements).
      EXPECT_GT(bytes[0], n);
      EXPECT_LE(bytes[0], n + 4 * (n / 5));
      EXPECT_LT(bytes[0], 4 * n / 2);
      continue;
    }
    int64_t sent0 = 0, sent1 = 0;
    for (int64_t i = 0; i < n; ++i) {
      const bool first = std::fabs(sent[0][i]) > 1e-6f;
      const bool second = std::fabs(sent[1][i]) > 1e-6f;
      sent0 += first;
      sent1 += second;
      if (first) {
        ASSERT_NEAR(sent[0][i], g[i], 1e-5f) << i;
      }
      // The second step sends only what the first held back, as it was.
      if (second) {
        ASSERT_FALSE(first) << i;
        ASSERT_NEAR(sent[1][i], g[i], 1e-5f) << i;
      }
    }
    // ceil(0.25 * m) of each chunk's m <= 10 elements: 25% to 35% of them.
    EXPECT_GE(sent0, n / 4);
    EXPECT_LE(sent0, n * 35 / 100);
    EXPECT_EQ(bytes[0], 8 * sent0);  // 4-byte index + fp32 value each
    // Top-k: about as many again (fewer in one-element chunks), all held
    // back the step before (random-k may pick zeros left where it sent).
    if (kind == TOPK) {
      EXPECT_GE(sent1, sent0 * 9 / 10);
    }
    EXPECT_GT(sent1, 0);
    EXPECT_LT(bytes[0], 4 * n * 2 / 3);  // vs 4n dense
  }
  // Compression encodes its own values: not with bf16 pushes.
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(Spec(1, 1)).ok());
  PsClientOptions bf16;
  bf16.push_dtype = BF16;
  bf16.compression.set_kind(QUANT_INT8);
  EXPECT_EQ(cluster.Client({}, bf16).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace lmps
