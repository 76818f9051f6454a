// LayerwisePull against real in-process shards: the groups of GptModel's
// buffer, landing in forward order with the same values as a whole pull
// (F32 and BF16), copies handed over group by group, and a refused pull
// reported by every wait.
#include "worker/layerwise_pull.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model/job_spec.h"
#include "common/model/model_spec.h"
#include "gtest/gtest.h"
#include "tests/testing/ps_cluster.h"
#include "worker/comm_scheduler.h"

namespace lmps {
namespace {

using ::lmps::testing::Cluster;

JobSpec Spec() {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(3);
  m->set_n_head(2);
  m->set_n_embd(16);
  m->set_block_size(8);
  m->set_vocab_size(32);
  spec.mutable_layout()->set_num_shards(2);
  spec.mutable_train()->set_batch_size(2);
  spec.mutable_train()->set_steps(4);
  spec.mutable_train()->set_checkpoint_interval(1000);
  spec.set_max_chunk_bytes(512);  // tensors cut into chunks on both shards
  spec.set_max_message_bytes(1024);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

TEST(LayerwisePullTest, GroupsAreTheLayersInForwardOrder) {
  const JobSpec spec = Spec();
  const std::vector<PullGroup> groups = GptPullGroups(spec.model());
  ASSERT_EQ(groups.size(), 5u);  // embeddings, 3 blocks, ln_f
  EXPECT_EQ(groups[0].tensors,
            (std::set<std::string>{"wte.weight", "wpe.weight"}));
  EXPECT_EQ(groups[2].tensors.size(), 12u);
  EXPECT_EQ(groups[2].tensors.count("h.1.mlp.c_proj.bias"), 1u);
  EXPECT_EQ(groups[4].tensors,
            (std::set<std::string>{"ln_f.weight", "ln_f.bias"}));
  int64_t at = 0;
  for (const PullGroup& g : groups) {
    EXPECT_EQ(g.begin, at);
    EXPECT_GT(g.end, g.begin);
    at = g.end;
  }
  EXPECT_EQ(at, GptNumParameters(spec.model()));
}

TEST(LayerwisePullTest, LandsLikeAWholePullGroupByGroup) {
  const JobSpec spec = Spec();
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(spec).ok());
  const std::vector<PullGroup> groups = GptPullGroups(spec.model());
  for (const DType dtype : {F32, BF16}) {
    SCOPED_TRACE(DType_Name(dtype));
    PsClientOptions options;
    options.pull_dtype = dtype;
    absl::StatusOr<std::unique_ptr<PsClient>> ps = cluster.Client({}, options);
    ASSERT_TRUE(ps.ok()) << ps.status();
    const int64_t n = (*ps)->num_parameters();
    std::vector<float> want(n), host(n, -1.0f);
    ASSERT_TRUE((*ps)->Pull(0, want.data()).ok());
    const int64_t before = (*ps)->stats().bytes_pulled;
    // One transfer at a time, so the lanes and the credit both matter.
    CommScheduler scheduler({.credit_bytes = 256, .max_per_lane = 1,
                             .threads = 2});
    LayerwisePull pull(ps->get(), &scheduler, &groups, 0, host.data());
    std::vector<std::pair<int64_t, int64_t>> copied;
    auto copy = [&](int64_t b, int64_t e) {
      copied.push_back({b, e});
      // What is handed over has landed.
      for (int64_t i = b; i < e; ++i) {
        if (host[i] != want[i]) {
          return absl::InternalError(absl::StrCat("element ", i));
        }
      }
      return absl::OkStatus();
    };
    // The second block needs the embeddings and the first two blocks.
    ASSERT_TRUE(pull.WaitFor(groups[2].begin + 1, copy).ok());
    EXPECT_EQ(copied, (std::vector<std::pair<int64_t, int64_t>>{
                          {groups[0].begin, groups[0].end},
                          {groups[1].begin, groups[1].end},
                          {groups[2].begin, groups[2].end}}));
    ASSERT_TRUE(pull.WaitAll(copy).ok());
    EXPECT_EQ(copied.size(), groups.size());
    EXPECT_EQ(host, want);
    EXPECT_EQ(pull.min_version(), 0);
    EXPECT_EQ((*ps)->stats().bytes_pulled - before,
              (dtype == BF16 ? 2 : 4) * n);
    EXPECT_GE(pull.total_seconds(), 0);
    EXPECT_GT(pull.landed_us(), 0);
    EXPECT_LE(scheduler.max_bytes_in_flight(),
              std::max<int64_t>(256, 4 * (groups[1].end - groups[1].begin)));
  }
}

TEST(LayerwisePullTest, ARefusedPullFailsEveryWait) {
  const JobSpec spec = Spec();
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(spec).ok());
  const std::vector<PullGroup> groups = GptPullGroups(spec.model());
  absl::StatusOr<std::unique_ptr<PsClient>> ps = cluster.Client();
  ASSERT_TRUE(ps.ok()) << ps.status();
  std::vector<float> host((*ps)->num_parameters());
  CommScheduler scheduler({});
  // Step -1: every shard refuses it.
  LayerwisePull pull(ps->get(), &scheduler, &groups, -1, host.data());
  int copies = 0;
  auto copy = [&](int64_t, int64_t) {
    ++copies;
    return absl::OkStatus();
  };
  const absl::Status first = pull.WaitFor(1, copy);
  EXPECT_EQ(first.code(), absl::StatusCode::kInvalidArgument) << first;
  EXPECT_NE(first.message().find("parameter server shard"), std::string::npos)
      << first;
  EXPECT_EQ(pull.WaitAll(copy).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(copies, 0);
}

}  // namespace
}  // namespace lmps
