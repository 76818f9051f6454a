#include "worker/trainer.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "common/status_util.h"

namespace lmps {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t)
      .count();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(
    TrainerOptions options, GptModel* model, PsClient* ps,
    const TextDataset* data) {
  const JobSpec& spec = options.spec;
  if (model->num_parameters() != ps->num_parameters()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model has ", model->num_parameters(), " parameters but the partition ",
        ps->num_parameters()));
  }
  if (data->block_size() != spec.model().block_size()) {
    return absl::InvalidArgumentError("dataset block size differs from model");
  }
  std::unique_ptr<Trainer> t(new Trainer());
  t->options_ = std::move(options);
  t->model_ = model;
  t->ps_ = ps;
  t->data_ = data;
  const TrainConfig& train = t->options_.spec.train();
  t->end_step_ = train.steps();
  if (train.stop_after_step() > 0 && train.stop_after_step() < t->end_step_) {
    t->end_step_ = train.stop_after_step();
  }
  t->micro_batch_ = LocalBatch(t->options_.spec) / train.micro_batches();
  t->host_params_.resize(model->num_parameters());
  t->host_grads_.resize(model->num_parameters());
  const int T = t->options_.spec.model().block_size();
  t->tokens_.resize(static_cast<size_t>(t->micro_batch_) * T);
  t->targets_.resize(t->tokens_.size());
  t->progress_.step = t->options_.start_step;
  t->progress_.end_step = t->end_step_;
  return t;
}

absl::Status Trainer::PullInto(int64_t step) {
  LMPS_RETURN_IF_ERROR(ps_->Pull(step, host_params_.data()));
  return model_->SetParametersFromHost(host_params_.data());
}

absl::StatusOr<float> Trainer::Evaluate() {
  const JobSpec& spec = options_.spec;
  const int T = spec.model().block_size();
  double sum = 0;
  int n = 0;
  for (int b = 0; b < spec.train().eval_batches(); ++b) {
    data_->Batch(Split::kVal, spec.train().seed(), b, micro_batch_, 0,
                 micro_batch_, tokens_.data(), targets_.data());
    LMPS_ASSIGN_OR_RETURN(float loss, model_->Forward(tokens_.data(),
                                                      targets_.data(),
                                                      micro_batch_, T));
    sum += loss;
    ++n;
  }
  return static_cast<float>(sum / std::max(1, n));
}

absl::Status Trainer::Run() {
  const JobSpec& spec = options_.spec;
  const TrainConfig& train = spec.train();
  const int T = spec.model().block_size();
  const int local_batch = LocalBatch(spec);
  const int M = train.micro_batches();
  const auto run_start = std::chrono::steady_clock::now();
  int64_t tokens_done = 0;
  for (int64_t step = options_.start_step; step < end_step_; ++step) {
    if (cancelled_) return absl::CancelledError("training cancelled");
    auto t0 = std::chrono::steady_clock::now();
    LMPS_RETURN_IF_ERROR(PullInto(step));
    progress_.pull_seconds = SecondsSince(t0);
    if (options_.dp_rank == 0 && train.eval_interval() > 0 &&
        step % train.eval_interval() == 0 && step > options_.start_step) {
      LMPS_ASSIGN_OR_RETURN(progress_.eval_loss, Evaluate());
    }

    auto t1 = std::chrono::steady_clock::now();
    model_->ZeroGrad();
    double loss = 0;
    for (int mb = 0; mb < M; ++mb) {
      const int first = options_.dp_rank * local_batch + mb * micro_batch_;
      data_->Batch(Split::kTrain, train.seed(), step, train.batch_size(),
                   first, micro_batch_, tokens_.data(), targets_.data());
      LMPS_ASSIGN_OR_RETURN(float l, model_->Forward(tokens_.data(),
                                                     targets_.data(),
                                                     micro_batch_, T));
      LMPS_RETURN_IF_ERROR(model_->Backward(1.0f / static_cast<float>(M)));
      loss += l / M;
    }
    if (!std::isfinite(loss)) {
      return absl::InternalError(absl::StrCat(
          "non-finite training loss at step ", step,
          "; the gradient is not pushed (the servers would reject it)"));
    }
    LMPS_RETURN_IF_ERROR(model_->GradientsToHost(host_grads_.data()));
    progress_.compute_seconds = SecondsSince(t1);

    auto t2 = std::chrono::steady_clock::now();
    LMPS_RETURN_IF_ERROR(
        ps_->Push(step, options_.worker_id, options_.dp_rank, host_grads_.data()));
    progress_.push_seconds = SecondsSince(t2);

    auto t3 = std::chrono::steady_clock::now();
    LMPS_ASSIGN_OR_RETURN(double sum_squares, ps_->GradNorm(step));
    LMPS_ASSIGN_OR_RETURN(int64_t version, ps_->Apply(step, sum_squares));
    progress_.sync_seconds = SecondsSince(t3);
    if (version != step + 1) {
      return absl::InternalError(absl::StrCat("after applying step ", step,
                                              " the servers are at version ",
                                              version));
    }
    tokens_done += static_cast<int64_t>(local_batch) * T;
    progress_.step = step + 1;
    progress_.loss = static_cast<float>(loss);
    progress_.tokens_per_second = tokens_done / SecondsSince(run_start);
    if (options_.on_progress) options_.on_progress(progress_);
  }
  if (options_.dp_rank == 0 && train.eval_interval() > 0 &&
      end_step_ > options_.start_step) {
    LMPS_RETURN_IF_ERROR(PullInto(end_step_));
    LMPS_ASSIGN_OR_RETURN(progress_.eval_loss, Evaluate());
    if (options_.on_progress) options_.on_progress(progress_);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Trainer::Sample(const std::string& prompt, int n,
                                            float temperature, int top_k) {
  LMPS_RETURN_IF_ERROR(PullInto(end_step_));
  LMPS_ASSIGN_OR_RETURN(
      std::vector<int32_t> out,
      model_->Generate(TextDataset::Encode(prompt), n, temperature, top_k,
                       options_.spec.train().seed()));
  return TextDataset::Decode(out);
}

}  // namespace lmps
