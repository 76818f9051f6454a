// PsClient through shared memory (docs/parameter-shard.md, "Same-host
// payloads") and the fused push (PushAndReduce), against a cluster of real
// shards in this process (tests/testing/ps_cluster.h).
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/support/client_interceptor.h"
#include "gtest/gtest.h"
#include "tests/testing/ps_cluster.h"
#include "worker/ps_client.h"
#include "worker/ps_client_test_util.h"

namespace lmps {
namespace {

using ::lmps::testing::Cluster;
using ::lmps::testing::FullGradient;
using ::lmps::testing::RandomGradient;
using ::lmps::testing::Spec;

// Shared memory (docs/parameter-shard.md): the same bits as the socket for
// pulls and pushes in fp32 and bf16, with one or several streams per shard, and
// windows so small that a pull takes several requests and some push streams
// do not fit (those go through the socket).
TEST(PsClientTest, SharedMemoryMovesTheSameBitsAsTheSocket) {
  struct Case {
    DType dtype;
    int streams;
    int64_t window;
  };
  for (const Case c : {Case{F32, 1, 0}, Case{BF16, 1, 0}, Case{F32, 1, 2200},
                       Case{BF16, 1, 2000}, Case{F32, 3, 256}}) {
    SCOPED_TRACE(absl::StrCat(DType_Name(c.dtype), " streams ", c.streams,
                              " window ", c.window));
    const JobSpec spec = Spec(1, 1);
    Cluster socket_cluster, shm_cluster;
    ASSERT_TRUE(socket_cluster.Start(spec).ok());
    ASSERT_TRUE(shm_cluster.Start(spec).ok());
    PsClientOptions options;
    options.push_dtype = c.dtype;
    options.pull_dtype = c.dtype;
    options.max_message_bytes = spec.max_message_bytes();
    options.max_push_stream_bytes = 512;
    options.streams_per_shard = c.streams;
    auto a = socket_cluster.Client({}, options);
    options.shared_memory = true;
    options.shared_window_bytes = c.window;
    std::vector<std::string> logged;
    options.log = [&](const std::string& line) { logged.push_back(line); };
    auto b = shm_cluster.Client({}, options);
    ASSERT_TRUE(a.ok() && b.ok());
    PsClient& sock = **a;
    PsClient& shm = **b;
    for (int64_t step = 0; step < 3; ++step) {
      std::vector<float> p_sock(sock.num_parameters()), p_shm(p_sock.size());
      const int64_t rpcs = shm.stats().rpcs;
      ASSERT_TRUE(sock.Pull(step, p_sock.data()).ok());
      ASSERT_TRUE(shm.Pull(step, p_shm.data()).ok());
      ASSERT_EQ(p_shm, p_sock);
      if (c.window == 256) {
        // 1024-byte messages do not fit: refused at the first pull (per
        // shard at least one of its concurrent streams, at most all), which
        // goes over the socket, as every later request does.
        const int64_t calls = shm.stats().rpcs - rpcs;
        if (step == 0) {
          EXPECT_GE(calls, 2 * c.streams + 2);
          EXPECT_LE(calls, 4 * c.streams);
        } else {
          EXPECT_EQ(calls, 2 * c.streams);
        }
      } else if (c.window > 0) {
        // Several requests per stream, each as many messages as fit.
        EXPECT_GT(shm.stats().rpcs - rpcs, 2 * c.streams);
      } else {
        EXPECT_EQ(shm.stats().rpcs - rpcs, 2 * c.streams);
      }
      const std::vector<float> grads =
          FullGradient(RandomGradient(spec.model(), 17 + step));
      ASSERT_TRUE(sock.Push(step, "w", 0, grads.data()).ok());
      ASSERT_TRUE(shm.Push(step, "w", 0, grads.data()).ok());
      absl::StatusOr<double> ss_sock = sock.GradNorm(step);
      absl::StatusOr<double> ss_shm = shm.GradNorm(step);
      ASSERT_TRUE(ss_sock.ok() && ss_shm.ok());
      EXPECT_EQ(*ss_shm, *ss_sock);
      ASSERT_TRUE(sock.Apply(step, *ss_sock).ok());
      ASSERT_TRUE(shm.Apply(step, *ss_shm).ok());
    }
    EXPECT_EQ(shm.stats().bytes_pushed, sock.stats().bytes_pushed);
    EXPECT_EQ(shm.stats().bytes_pulled, sock.stats().bytes_pulled);
    EXPECT_EQ(sock.stats().bytes_shared, 0);
    if (c.window == 256) {
      EXPECT_EQ(shm.stats().bytes_shared, 0);
      EXPECT_FALSE(logged.empty());
    } else {
      EXPECT_GT(shm.stats().bytes_shared, 0);
      EXPECT_TRUE(logged.empty()) << logged[0];
    }
    if (c.window == 0) {  // everything fits: everything shared
      EXPECT_EQ(shm.stats().bytes_shared,
                shm.stats().bytes_pushed + shm.stats().bytes_pulled);
    }
  }
}

// A shard that maps no worker memory (lmps_server --shared_memory=false, or
// one on another host) refuses the region: the worker says so once per
// shard and repeats the request over the socket, nothing lost or doubled.
TEST(PsClientTest, FallsBackToTheSocketWhenTheShardRefusesTheRegion) {
  const JobSpec spec = Spec(1, 1);
  Cluster plain, refusing;
  refusing.shared_memory = false;
  ASSERT_TRUE(plain.Start(spec).ok());
  ASSERT_TRUE(refusing.Start(spec).ok());
  PsClientOptions options;
  auto a = plain.Client({}, options);
  options.shared_memory = true;
  std::vector<std::string> logged;
  options.log = [&](const std::string& line) { logged.push_back(line); };
  auto b = refusing.Client({}, options);
  ASSERT_TRUE(a.ok() && b.ok());
  for (int64_t step = 0; step < 2; ++step) {
    const std::vector<float> grads =
        FullGradient(RandomGradient(spec.model(), 3 + step));
    // Push first: the first request to each shard is a push.
    ASSERT_TRUE((*a)->Push(step, "w", 0, grads.data()).ok());
    ASSERT_TRUE((*b)->Push(step, "w", 0, grads.data()).ok());
    absl::StatusOr<double> ss_a = (*a)->GradNorm(step);
    absl::StatusOr<double> ss_b = (*b)->GradNorm(step);
    ASSERT_TRUE(ss_a.ok() && ss_b.ok()) << ss_b.status();
    EXPECT_EQ(*ss_a, *ss_b);  // each gradient counted once
    ASSERT_TRUE((*a)->Apply(step, *ss_a).ok());
    ASSERT_TRUE((*b)->Apply(step, *ss_b).ok());
    std::vector<float> pa((*a)->num_parameters()), pb(pa.size());
    ASSERT_TRUE((*a)->Pull(step + 1, pa.data()).ok());
    ASSERT_TRUE((*b)->Pull(step + 1, pb.data()).ok());
    EXPECT_EQ(pa, pb);
  }
  EXPECT_EQ((*b)->stats().bytes_shared, 0);
  ASSERT_EQ(logged.size(), 2u);  // once per shard
  EXPECT_NE(logged[0].find("--shared_memory=false"), std::string::npos)
      << logged[0];
}

// PushAndReduce (SYNC, the worker pushes to every shard) is Push, GradNorm
// and -- with one shard -- Apply, to the bit, in the push's streams only
// (bounded streams, several lanes: `then` rides on each shard's last
// stream). With one shard sharing memory the push's answer also carries the
// next step's pull: next_params equals Pull(step + 1) with no pull RPC of
// its own (a window too small for the whole pull continues with ordinary
// requests); without shared memory (or a shard that refuses it) `pulled`
// stays false and the parameters are Pull's to fetch.
TEST(PsClientTest, PushAndReduceIsPushGradNormAndApplyInFewerRoundTrips) {
  struct Case {
    int shards;
    int streams;
    bool shm;            // the client offers shared memory
    bool refused;        // the shard maps no worker memory
    int64_t window;      // shared_window_bytes (0: default)
  };
  for (const Case c : {Case{2, 1, false, false, 0}, Case{2, 3, true, false, 0},
                       Case{1, 1, true, false, 0}, Case{1, 2, true, false, 0},
                       Case{1, 1, true, false, 2200},
                       Case{1, 1, false, false, 0},
                       Case{1, 1, true, true, 0}}) {
    SCOPED_TRACE(absl::StrCat("shards ", c.shards, " streams ", c.streams,
                              " shm ", c.shm, " refused ", c.refused,
                              " window ", c.window));
    JobSpec spec = Spec(1, 1);
    spec.mutable_layout()->set_num_shards(c.shards);
    Cluster reference, fused;
    fused.shared_memory = !c.refused;
    ASSERT_TRUE(reference.Start(spec).ok());
    ASSERT_TRUE(fused.Start(spec).ok());
    PsClientOptions options;
    options.max_push_stream_bytes = 512;
    options.streams_per_shard = c.streams;
    auto a = reference.Client({}, options);
    options.shared_memory = c.shm;
    options.shared_window_bytes = c.window;
    auto b = fused.Client({}, options);
    ASSERT_TRUE(a.ok() && b.ok());
    PsClient& ref = **a;
    PsClient& ps = **b;
    ASSERT_TRUE(ps.pushes_to_every_shard());
    std::vector<float> want(ref.num_parameters()), got(want.size());
    ASSERT_TRUE(ps.Pull(0, got.data()).ok());
    for (int64_t step = 0; step < 3; ++step) {
      const std::vector<float> grads =
          FullGradient(RandomGradient(spec.model(), 29 + step));
      const int64_t ref_rpcs = ref.stats().rpcs;
      ASSERT_TRUE(ref.Push(step, "w", 0, grads.data()).ok());
      const int64_t push_rpcs = ref.stats().rpcs - ref_rpcs;  // its streams
      absl::StatusOr<double> ss = ref.GradNorm(step);
      ASSERT_TRUE(ss.ok()) << ss.status();
      ASSERT_TRUE(ref.Apply(step, *ss).ok());
      ASSERT_TRUE(ref.Pull(step + 1, want.data()).ok());

      const int64_t rpcs = ps.stats().rpcs;
      absl::StatusOr<PsClient::PushedStep> pushed =
          ps.PushAndReduce(step, "w", 0, grads.data(), got.data());
      ASSERT_TRUE(pushed.ok()) << pushed.status();
      EXPECT_EQ(pushed->sum_squares, *ss);  // bitwise
      const bool fold = c.shards == 1 && c.shm && !c.refused;
      EXPECT_EQ(pushed->pulled, fold);
      if (c.shards == 1) {
        EXPECT_EQ(pushed->version, step + 1);
      } else {
        EXPECT_EQ(pushed->version, -1);
        absl::StatusOr<int64_t> v = ps.Apply(step, pushed->sum_squares);
        ASSERT_TRUE(v.ok()) << v.status();
      }
      if (fold) {
        EXPECT_EQ(pushed->pulled_version, step + 1);
        if (c.window == 0) {
          // The push's streams and nothing else.
          EXPECT_EQ(ps.stats().rpcs - rpcs, push_rpcs);
        } else {
          EXPECT_GT(ps.stats().rpcs - rpcs, push_rpcs);
        }
      } else {
        // The push's streams (the refusing shard's first one twice), and
        // with several shards an Apply per shard.
        if (!c.refused) {
          EXPECT_EQ(ps.stats().rpcs - rpcs,
                    push_rpcs + (c.shards == 1 ? 0 : c.shards));
        }
        ASSERT_TRUE(ps.Pull(step + 1, got.data()).ok());
      }
      ASSERT_EQ(got, want);
    }
  }
}

// Replaces the request of every Pull call with bytes that do not parse
// while `on` is set: the shard answers InvalidArgument.
class SpoilPulls final : public grpc::experimental::Interceptor {
 public:
  SpoilPulls(grpc::experimental::ClientRpcInfo* info, std::atomic<bool>* on)
      : pull_(std::string(info->method()) == "/lmps.ParameterServer/Pull"),
        on_(on) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* m) override {
    if (pull_ && on_->load() &&
        m->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      const std::string junk(16, '\xff');
      grpc::Slice slice(junk);
      *m->GetSerializedSendMessage() = grpc::ByteBuffer(&slice, 1);
    }
    m->Proceed();
  }

 private:
  const bool pull_;
  std::atomic<bool>* const on_;
};

class SpoilPullsFactory final
    : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit SpoilPullsFactory(std::atomic<bool>* on) : on_(on) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(
      grpc::experimental::ClientRpcInfo* info) override {
    return new SpoilPulls(info, on_);
  }

 private:
  std::atomic<bool>* const on_;
};

// A pull answered with the push whose further requests (a window smaller
// than the pull) fail: the step is applied all the same, PushAndReduce
// succeeds with `pulled` false and says so in the log, and an ordinary Pull
// then gets what the reference's does.
TEST(PsClientTest, PullWithThePushThatCannotFinishLeavesTheStepApplied) {
  JobSpec spec = Spec(1, 1);
  spec.mutable_layout()->set_num_shards(1);
  Cluster reference, fused;
  ASSERT_TRUE(reference.Start(spec).ok());
  ASSERT_TRUE(fused.Start(spec).ok());
  PsClientOptions options;
  options.max_push_stream_bytes = 512;
  auto a = reference.Client({}, options);
  ASSERT_TRUE(a.ok());
  std::atomic<bool> spoil{false};
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<
      grpc::experimental::ClientInterceptorFactoryInterface>>
      interceptors;
  interceptors.push_back(std::make_unique<SpoilPullsFactory>(&spoil));
  channels.push_back(grpc::experimental::CreateCustomChannelWithInterceptors(
      fused.addresses()[0], grpc::InsecureChannelCredentials(),
      grpc::ChannelArguments(), std::move(interceptors)));
  options.max_message_bytes = spec.max_message_bytes();
  options.rpc_timeout = absl::Seconds(20);
  options.shared_memory = true;
  options.shared_window_bytes = 2200;  // the pull takes several requests
  std::vector<std::string> log;
  absl::Mutex log_mu;
  options.log = [&](const std::string& line) {
    absl::MutexLock lock(&log_mu);
    log.push_back(line);
  };
  auto b = PsClient::Create(spec.model(), fused.map(), channels,
                            fused.addresses(), options);
  ASSERT_TRUE(b.ok()) << b.status();
  PsClient& ref = **a;
  PsClient& ps = **b;
  std::vector<float> want(ref.num_parameters()), got(want.size());
  ASSERT_TRUE(ps.Pull(0, got.data()).ok());
  const std::vector<float> grads =
      FullGradient(RandomGradient(spec.model(), 31));
  ASSERT_TRUE(ref.Push(0, "w", 0, grads.data()).ok());
  absl::StatusOr<double> ss = ref.GradNorm(0);
  ASSERT_TRUE(ss.ok()) << ss.status();
  ASSERT_TRUE(ref.Apply(0, *ss).ok());
  ASSERT_TRUE(ref.Pull(1, want.data()).ok());

  spoil = true;
  absl::StatusOr<PsClient::PushedStep> pushed =
      ps.PushAndReduce(0, "w", 0, grads.data(), got.data());
  spoil = false;
  ASSERT_TRUE(pushed.ok()) << pushed.status();
  EXPECT_FALSE(pushed->pulled);
  EXPECT_EQ(pushed->version, 1);
  EXPECT_EQ(pushed->sum_squares, *ss);
  {
    absl::MutexLock lock(&log_mu);
    bool said = false;
    for (const std::string& line : log) {
      said = said || absl::StrContains(line, "the pull of step 1 answered "
                                             "with the push failed");
    }
    EXPECT_TRUE(said) << absl::StrJoin(log, "\n");
  }
  ASSERT_TRUE(ps.Pull(1, got.data()).ok());
  EXPECT_EQ(got, want);
}

}  // namespace
}  // namespace lmps
