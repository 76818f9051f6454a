// DataParallelTrainer against real in-process parameter-server shards: pushing the
// gradient while the backward pass runs (overlap_push) gives bit-identical
// parameters to pushing it after the pass, in SYNC with two data-parallel
// replicas and in ASYNC with one, with f32 and bf16 pushes; the overlap is
// reported in TrainerProgress. With a backend whose copies to the host land
// late (as a device's asynchronous copies do), the trainer waits for each
// copy before pushing what it covers. One SGD step equals -lr times the mean
// gradient of the global batch (the 1/M and 1/dp scaling).
#include "worker/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/model/job_spec.h"
#include "gtest/gtest.h"
#include "tests/testing/ps_cluster.h"
#include "worker/backend/cpu_reference.h"
#include "worker/data/dataset.h"
#include "worker/model/gpt.h"
#include "worker/ps_client.h"
#include "worker/testing/full_batch_gradient.h"

namespace lmps {
namespace {

using ::lmps::testing::Cluster;
using ::lmps::testing::CompareWithSgdStep;
using ::lmps::testing::FullBatchGradient;
using ::lmps::testing::QuickBrownFoxData;
using ::lmps::testing::SgdStepError;

constexpr int kSteps = 3;

// 4 layers, width 64, context 32, byte vocabulary: big enough that a
// block's backward pass takes milliseconds, so pushing starts well before
// the pass ends; 2 shards with chunks of at most 4 KiB, so every block's
// gradient is many chunks.
JobSpec Spec(ConsistencyMode mode, int dp) {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(4);
  m->set_n_head(4);
  m->set_n_embd(64);
  m->set_block_size(32);
  m->set_vocab_size(256);
  spec.mutable_layout()->set_dp(dp);
  spec.mutable_layout()->set_num_shards(2);
  TrainConfig* t = spec.mutable_train();
  t->set_mode(mode);
  t->set_batch_size(8 * dp);
  t->set_micro_batches(2);
  t->set_steps(kSteps);
  t->set_eval_interval(0);
  t->set_sample_tokens(0);
  t->set_checkpoint_interval(1000);
  OptimizerConfig* o = spec.mutable_optimizer();
  o->set_type(ADAMW);
  o->set_lr(0.01f);
  spec.set_max_chunk_bytes(4096);
  spec.set_max_message_bytes(16384);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

// A caricature of a device's asynchronous copies: CopyToHostAsync records
// the values at issue time, fills the destination with NaN, and lands the
// values only when WaitCopy reaches their ticket. A trainer that pushed a
// range before waiting for its copy would push NaN (the shards reject it)
// or stale values.
class LateCopyBackend : public ReferenceBackend {
 public:
  // A device's memory: the trainer pulls and pushes through its host
  // buffers and these copies (not in place, as on the CPU backends).
  bool memory_is_host() const override { return false; }
  absl::StatusOr<uint64_t> CopyToHostAsync(float* host_dst, const float* src,
                                           size_t n) override {
    absl::MutexLock lock(&mu_);
    copies_.push_back(Copy{++issued_, host_dst, std::vector<float>(src, src + n)});
    std::fill(host_dst, host_dst + n, std::nanf(""));
    return issued_;
  }
  absl::Status WaitCopy(uint64_t ticket) override {
    absl::MutexLock lock(&mu_);
    while (!copies_.empty() && copies_.front().ticket <= ticket) {
      const Copy& c = copies_.front();
      std::copy(c.values.begin(), c.values.end(), c.dst);
      copies_.pop_front();
      ++landed_;
    }
    return absl::OkStatus();
  }
  int64_t landed() {
    absl::MutexLock lock(&mu_);
    return landed_;
  }
  bool all_landed() {
    absl::MutexLock lock(&mu_);
    return copies_.empty();
  }

 private:
  struct Copy {
    uint64_t ticket;
    float* dst;
    std::vector<float> values;
  };
  absl::Mutex mu_;
  uint64_t issued_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t landed_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<Copy> copies_ ABSL_GUARDED_BY(mu_);
};

struct Result {
  std::vector<float> initial_params;      // version 0, before training
  std::vector<float> params;              // after training
  std::vector<TrainerProgress> progress;  // per dp rank, last step
  int64_t late_copies_landed = 0;         // with late_copies, all ranks
};

// Trains `spec` with every replica on its own thread (its own backend,
// model and client) against fresh shards; returns the final parameters.
absl::StatusOr<Result> Train(const JobSpec& spec, DType push_dtype,
                             bool overlap, bool late_copies = false,
                             bool layerwise = true) {
  Cluster cluster;
  if (absl::Status s = cluster.Start(spec); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<TextDataset>> data = QuickBrownFoxData(spec);
  if (!data.ok()) return data.status();
  const int dp = spec.layout().dp();
  Result result;
  absl::StatusOr<std::unique_ptr<PsClient>> reader = cluster.Client();
  if (!reader.ok()) return reader.status();
  result.initial_params.resize((*reader)->num_parameters());
  if (absl::Status s = (*reader)->Pull(0, result.initial_params.data());
      !s.ok()) {
    return s;
  }
  absl::Mutex result_mu;
  result.progress.resize(dp);
  std::vector<absl::Status> status(dp);
  std::vector<std::thread> threads;
  for (int r = 0; r < dp; ++r) {
    threads.emplace_back([&, r] {
      status[r] = [&]() -> absl::Status {
        // The reference backend: single-threaded, so the replicas' threads
        // do not compete for a pool (CpuBackend is checked against it in
        // worker/backend).
        absl::StatusOr<std::unique_ptr<ReferenceBackend>> backend =
            ReferenceBackend::Create();
        if (!backend.ok()) return backend.status();
        LateCopyBackend* late = nullptr;
        if (late_copies) {
          late = new LateCopyBackend();
          backend->reset(late);
        }
        absl::StatusOr<std::unique_ptr<GptModel>> model =
            GptModel::Create(spec.model(), backend->get(), LocalBatch(spec),
                             spec.model().block_size());
        if (!model.ok()) return model.status();
        PsClientOptions options;
        options.push_dtype = push_dtype;
        absl::StatusOr<std::unique_ptr<PsClient>> ps =
            cluster.Client({}, options);
        if (!ps.ok()) return ps.status();
        DataParallelTrainerOptions to;
        to.worker_id = absl::StrCat("worker-", r);
        to.dp_rank = r;
        to.spec = spec;
        to.overlap_push = overlap;
        to.layerwise_pull = layerwise;
        to.log = [](const std::string&) {};
        absl::StatusOr<std::unique_ptr<DataParallelTrainer>> trainer =
            DataParallelTrainer::Create(to, model->get(), ps->get(), data->get());
        if (!trainer.ok()) return trainer.status();
        if (absl::Status s = (*trainer)->Run(); !s.ok()) return s;
        result.progress[r] = (*trainer)->progress();
        if (late != nullptr) {
          if (!late->all_landed()) {
            return absl::InternalError("a copy was never waited for");
          }
          absl::MutexLock lock(&result_mu);
          result.late_copies_landed += late->landed();
        }
        return absl::OkStatus();
      }();
    });
  }
  for (std::thread& t : threads) t.join();
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  result.params.resize((*reader)->num_parameters());
  const int64_t steps = spec.train().steps();
  const int64_t final_version =
      spec.train().mode() == ASYNC ? steps * dp : steps;
  if (absl::Status s = (*reader)->Pull(final_version, result.params.data());
      !s.ok()) {
    return s;
  }
  return result;
}

struct Case {
  ConsistencyMode mode;
  int dp;
  DType dtype;
};

class TrainerOverlapTest : public ::testing::TestWithParam<Case> {};

TEST_P(TrainerOverlapTest, OverlapIsBitIdenticalAndReported) {
  const Case c = GetParam();
  const JobSpec spec = Spec(c.mode, c.dp);
  absl::StatusOr<Result> after = Train(spec, c.dtype, /*overlap=*/false);
  ASSERT_TRUE(after.ok()) << after.status();
  absl::StatusOr<Result> during = Train(spec, c.dtype, /*overlap=*/true);
  ASSERT_TRUE(during.ok()) << during.status();
  // Bit for bit (EXPECT_EQ on floats), and not vacuous: training moved them.
  EXPECT_EQ(after->params, during->params);
  JobSpec shorter = spec;
  shorter.mutable_train()->set_steps(kSteps - 1);
  absl::StatusOr<Result> fewer = Train(shorter, c.dtype, /*overlap=*/true);
  ASSERT_TRUE(fewer.ok()) << fewer.status();
  EXPECT_NE(fewer->params, during->params);

  const int64_t n = static_cast<int64_t>(after->params.size());
  const int64_t width = c.dtype == BF16 ? 2 : 4;
  for (int r = 0; r < c.dp; ++r) {
    SCOPED_TRACE(absl::StrCat("dp rank ", r));
    EXPECT_EQ(after->progress[r].step, kSteps);
    EXPECT_EQ(after->progress[r].push_bytes, width * n);
    EXPECT_EQ(after->progress[r].push_bytes_overlapped, 0);
    EXPECT_EQ(during->progress[r].push_bytes, width * n);
    // Some of the gradient went out while the backward pass still computed
    // (ln_f and the last blocks are final milliseconds before the first
    // block is), never all of it (the embeddings are final last).
    EXPECT_GT(during->progress[r].push_bytes_overlapped, 0);
    EXPECT_LT(during->progress[r].push_bytes_overlapped, width * n);
  }
}

TEST(TrainerTest, PushWaitsForLateCopies) {
  const JobSpec spec = Spec(SYNC, 2);
  absl::StatusOr<Result> after = Train(spec, F32, /*overlap=*/false);
  ASSERT_TRUE(after.ok()) << after.status();
  absl::StatusOr<Result> late =
      Train(spec, F32, /*overlap=*/true, /*late_copies=*/true);
  ASSERT_TRUE(late.ok()) << late.status();
  EXPECT_EQ(after->params, late->params);
  // Every range of the last micro-batch's backward pass, every step, on
  // both replicas (4 blocks + ln_f + embeddings at least).
  EXPECT_GE(late->late_copies_landed, 2 * kSteps * 6);
}

// Layer-wise pulls (the default) against whole pulls before the forward
// pass: bit-identical parameters, the same bytes, with and without the
// push overlap; the communication time and its hidden part are reported.
TEST(TrainerTest, LayerwisePullIsBitIdenticalAndReported) {
  JobSpec spec = Spec(SYNC, 2);
  spec.mutable_train()->set_eval_interval(2);  // an evaluation mid-run too
  for (const bool overlap : {false, true}) {
    SCOPED_TRACE(absl::StrCat("overlap_push ", overlap));
    absl::StatusOr<Result> whole = Train(spec, F32, overlap, false,
                                         /*layerwise=*/false);
    ASSERT_TRUE(whole.ok()) << whole.status();
    absl::StatusOr<Result> layered = Train(spec, F32, overlap, false,
                                           /*layerwise=*/true);
    ASSERT_TRUE(layered.ok()) << layered.status();
    EXPECT_EQ(whole->params, layered->params);
    EXPECT_NE(whole->params, whole->initial_params);
    const int64_t n = static_cast<int64_t>(whole->params.size());
    for (int r = 0; r < 2; ++r) {
      SCOPED_TRACE(absl::StrCat("dp rank ", r));
      const TrainerProgress& w = whole->progress[r];
      const TrainerProgress& l = layered->progress[r];
      EXPECT_EQ(l.pull_bytes, 4 * n);
      EXPECT_EQ(w.pull_bytes, 4 * n);
      EXPECT_EQ(l.pulled_version, w.pulled_version);
      EXPECT_GT(l.comm_seconds, 0);
      EXPECT_GE(l.comm_hidden_seconds, 0);
      EXPECT_LE(l.comm_hidden_seconds, l.comm_seconds);
      EXPECT_LE(l.pull_seconds, l.comm_seconds);
      EXPECT_GE(w.comm_seconds, w.pull_seconds);
    }
  }
}

// The trainer's gradient scaling, fixed: one plain SGD step (no momentum,
// clipping or weight decay) by dp = 2 replicas of M = 2 micro-batches each
// moves every parameter by exactly -lr times the gradient of the mean loss
// over the whole global batch, computed here by one model in one pass.
// Each micro-batch's gradient is scaled by 1/M on the worker and the
// replicas' sum by 1/dp on the shards; without either the step doubles.
TEST(TrainerTest, OneSgdStepIsTheMeanGradientOfTheGlobalBatch) {
  JobSpec spec = Spec(SYNC, 2);
  spec.mutable_train()->set_steps(1);
  OptimizerConfig* o = spec.mutable_optimizer();
  o->set_type(SGD);
  o->set_lr(0.5f);
  o->set_min_lr(0.5f);
  o->set_momentum(-1);
  o->set_weight_decay(-1);
  o->set_grad_clip(-1);
  ASSERT_EQ(spec.train().micro_batches(), 2);
  absl::StatusOr<Result> trained = Train(spec, F32, /*overlap=*/false);
  ASSERT_TRUE(trained.ok()) << trained.status();

  // The reference: the gradient of the mean loss over all B sequences.
  absl::StatusOr<std::unique_ptr<TextDataset>> data = QuickBrownFoxData(spec);
  ASSERT_TRUE(data.ok()) << data.status();
  absl::StatusOr<std::vector<float>> grad =
      FullBatchGradient(spec, **data, /*step=*/0, trained->initial_params);
  ASSERT_TRUE(grad.ok()) << grad.status();

  const SgdStepError e =
      CompareWithSgdStep(trained->initial_params, trained->params, *grad, 0.5);
  // Only the summation order differs (per micro-batch, then across
  // replicas): ~1e-7 of the step. A missing 1/M or 1/dp is an error as
  // large as the step itself.
  EXPECT_GT(e.max_step, 1e-3) << "the step must be large enough to tell";
  EXPECT_LE(e.max_error, 1e-6) << "largest step " << e.max_step;
}

INSTANTIATE_TEST_SUITE_P(
    ModesAndDtypes, TrainerOverlapTest,
    ::testing::Values(Case{SYNC, 2, F32}, Case{SYNC, 2, BF16},
                      Case{ASYNC, 1, F32}, Case{ASYNC, 1, BF16}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return absl::StrCat(ConsistencyMode_Name(info.param.mode), "_dp",
                          info.param.dp, "_", DType_Name(info.param.dtype));
    });

}  // namespace
}  // namespace lmps
