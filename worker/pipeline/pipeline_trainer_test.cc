// PipelineTrainer's gradient scaling, fixed, as worker/trainer_test does for
// DataParallelTrainer: one plain SGD step (no momentum, clipping or weight
// decay) by dp = 2 replicas of M = 2 micro-batches, each replica one
// single-stage PipelineTrainer (pp = tp = 1: no peers) against real
// in-process shards, moves every parameter by exactly -lr times the
// gradient of the mean loss over the whole global batch, computed by one
// model in one pass. The last stage scales each micro-batch's loss
// gradient by 1/M and the shards the replicas' sum by 1/dp; without either
// the step doubles. (Multi-stage and tensor-parallel layouts are checked
// against an independent PyTorch reference by
// tests/torch_train_reference_test.)
#include "worker/pipeline/pipeline_trainer.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model/job_spec.h"
#include "common/model/parallel_layout.h"
#include "gtest/gtest.h"
#include "tests/testing/ps_cluster.h"
#include "worker/backend/cpu_reference.h"
#include "worker/model/stage_model.h"
#include "worker/ps_client.h"
#include "worker/testing/full_batch_gradient.h"

namespace lmps {
namespace {

using ::lmps::testing::Cluster;
using ::lmps::testing::CompareWithSgdStep;
using ::lmps::testing::FullBatchGradient;
using ::lmps::testing::QuickBrownFoxData;
using ::lmps::testing::SgdStepError;

constexpr float kLr = 0.5f;

JobSpec SgdSpec() {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(2);
  m->set_n_head(2);
  m->set_n_embd(32);
  m->set_block_size(16);
  m->set_vocab_size(256);
  LayoutConfig* l = spec.mutable_layout();
  l->set_dp(2);
  l->set_num_shards(2);
  TrainConfig* t = spec.mutable_train();
  t->set_batch_size(16);
  t->set_micro_batches(2);
  t->set_steps(1);
  t->set_eval_interval(-1);
  t->set_sample_tokens(0);
  t->set_checkpoint_interval(1000);
  OptimizerConfig* o = spec.mutable_optimizer();
  o->set_type(SGD);
  o->set_lr(kLr);
  o->set_min_lr(kLr);
  o->set_momentum(-1);
  o->set_weight_decay(-1);
  o->set_grad_clip(-1);
  spec.set_max_chunk_bytes(4096);
  spec.set_max_message_bytes(16384);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

TEST(PipelineTrainerTest, OneSgdStepIsTheMeanGradientOfTheGlobalBatch) {
  const JobSpec spec = SgdSpec();
  ASSERT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
  absl::StatusOr<ParallelLayout> layout =
      ParallelLayout::Create(spec.model(), spec.layout());
  ASSERT_TRUE(layout.ok()) << layout.status();
  Cluster cluster;
  ASSERT_TRUE(cluster.Start(spec).ok());
  absl::StatusOr<std::unique_ptr<TextDataset>> data = QuickBrownFoxData(spec);
  ASSERT_TRUE(data.ok()) << data.status();
  absl::StatusOr<std::unique_ptr<PsClient>> reader = cluster.Client();
  ASSERT_TRUE(reader.ok()) << reader.status();
  std::vector<float> initial((*reader)->num_parameters());
  ASSERT_TRUE((*reader)->Pull(0, initial.data()).ok());

  const int dp = spec.layout().dp();
  std::vector<absl::Status> status(dp);
  std::vector<std::thread> threads;
  for (int r = 0; r < dp; ++r) {
    threads.emplace_back([&, r] {
      status[r] = [&]() -> absl::Status {
        absl::StatusOr<std::unique_ptr<ReferenceBackend>> backend =
            ReferenceBackend::Create();
        if (!backend.ok()) return backend.status();
        const StageModelOptions so = PipelineTrainer::StageOptions(
            spec, *layout, layout->Coords(r),
            LocalBatch(spec) / spec.train().micro_batches());
        absl::StatusOr<std::unique_ptr<StageModel>> model =
            StageModel::Create(so, backend->get(), /*comm=*/nullptr);
        if (!model.ok()) return model.status();
        PsClientView view;
        view.layout = &*layout;
        absl::StatusOr<std::unique_ptr<PsClient>> ps = cluster.Client(view);
        if (!ps.ok()) return ps.status();
        PipelineTrainerOptions o;
        o.worker_id = absl::StrCat("worker-", r);
        o.coords = layout->Coords(r);
        o.spec = spec;
        o.log = [](const std::string&) {};
        absl::StatusOr<std::unique_ptr<PipelineTrainer>> trainer =
            PipelineTrainer::Create(o, &*layout, model->get(), ps->get(),
                                    /*peers=*/nullptr, /*comm=*/nullptr,
                                    data->get());
        if (!trainer.ok()) return trainer.status();
        return (*trainer)->Run();
      }();
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < dp; ++r) ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r];

  std::vector<float> trained(initial.size());
  ASSERT_TRUE((*reader)->Pull(1, trained.data()).ok());
  absl::StatusOr<std::vector<float>> grad =
      FullBatchGradient(spec, **data, /*step=*/0, initial);
  ASSERT_TRUE(grad.ok()) << grad.status();
  const SgdStepError e = CompareWithSgdStep(initial, trained, *grad, kLr);
  // Only the summation order differs (per micro-batch, then across
  // replicas): ~1e-7 of the step. A missing 1/M or 1/dp is an error as
  // large as the step itself.
  EXPECT_GT(e.max_step, 1e-3) << "the step must be large enough to tell";
  EXPECT_LE(e.max_error, 1e-6) << "largest step " << e.max_step;
}

}  // namespace
}  // namespace lmps
