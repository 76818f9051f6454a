#include "worker/trainer.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <optional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/model/job_spec.h"
#include "common/model/learning_rate.h"
#include "common/model/parallel_layout.h"
#include "common/model/model_spec.h"
#include "common/rpc/status_util.h"
#include "worker/layerwise_pull.h"
#include "server/optimizer.h"
#include "worker/overlapped_push.h"

namespace lmps {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t)
      .count();
}

// Steady-clock microseconds (CLOCK_MONOTONIC: comparable between processes
// on one host), for trace lines.
int64_t NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

absl::StatusOr<std::unique_ptr<DataParallelTrainer>> DataParallelTrainer::Create(
    DataParallelTrainerOptions options, GptModel* model, PsClient* ps,
    const Dataset* data) {
  const JobSpec& spec = options.spec;
  if (model->num_parameters() != ps->num_parameters()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model has ", model->num_parameters(), " parameters but the partition ",
        ps->num_parameters()));
  }
  if (data->block_size() != spec.model().block_size()) {
    return absl::InvalidArgumentError("dataset block size differs from model");
  }
  std::unique_ptr<DataParallelTrainer> t(new DataParallelTrainer());
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
  DataParallelTrainer* raw = t.get();
  t->layerwise_ = t->options_.layerwise_pull && train.mode() != ASYNC &&
                  train.dp_aggregation() != RING_ALLREDUCE &&
                  t->options_.host_ring == nullptr &&
                  EffectiveStaleness(t->options_.spec) == 0;
  if (t->layerwise_) {
    t->groups_ = GptPullGroups(t->options_.spec.model());
    const int per_lane = ps->replicated() ? 1 : 2;
    t->scheduler_ = std::make_unique<CommScheduler>(CommSchedulerOptions{
        .credit_bytes = std::max<int64_t>(4 << 20,
                                          t->options_.spec.max_message_bytes()),
        .max_per_lane = per_lane,
        .threads = std::max(2, ps->num_shards() * per_lane)});
  }
  const int per_host = WorkersPerHost(t->options_.spec);
  if (per_host > 1) {
    const TpComm* ring = t->options_.host_ring;
    if (ring == nullptr || ring->size() != per_host ||
        ring->rank() != t->options_.dp_rank % per_host) {
      return absl::InvalidArgumentError(absl::StrCat(
          "train.workers_per_host ", per_host, " needs a host ring of ",
          per_host, " workers with this worker at rank ",
          t->options_.dp_rank % per_host));
    }
  } else if (t->options_.host_ring != nullptr) {
    return absl::InvalidArgumentError(
        "a host ring is only for train.workers_per_host > 1");
  }
  if (train.dp_aggregation() == RING_ALLREDUCE) {
    const JobSpec& spec = t->options_.spec;  // `options` was moved from
    const int dp = spec.layout().dp();
    if (t->options_.dp_ring == nullptr || t->options_.dp_ring->size() != dp ||
        t->options_.dp_ring->rank() != t->options_.dp_rank) {
      return absl::InvalidArgumentError(absl::StrCat(
          "train.dp_aggregation RING_ALLREDUCE needs a data-parallel ring of ",
          dp, " replicas with this replica at rank ", t->options_.dp_rank));
    }
    int64_t total = 0;
    for (const TensorSpec& ts : GptTensorSpecs(spec.model())) {
      t->tensor_decay_.emplace_back(ts.num_elements(), ts.weight_decay);
      total += ts.num_elements();
    }
    if (total != model->num_parameters()) {
      return absl::InternalError(absl::StrCat(
          "tensor specs hold ", total, " parameters, the model ",
          model->num_parameters()));
    }
    t->opt_state_.assign(OptimizerStateBuffers(spec.optimizer().type()),
                         std::vector<float>(total, 0.0f));
  }
  t->pinned_ = std::make_unique<PinnedHostBuffers>(
      model->backend(),
      std::vector<std::vector<float>*>{&t->host_params_, &t->host_grads_},
      [raw](const std::string& line) { raw->Log(line); });
  return t;
}

DataParallelTrainer::~DataParallelTrainer() {
  if (shard_update_.joinable()) shard_update_.join();
}

absl::Status DataParallelTrainer::JoinShardUpdate() {
  if (shard_update_.joinable()) shard_update_.join();
  return std::exchange(shard_update_status_, absl::OkStatus());
}

absl::Status DataParallelTrainer::RingStep(int64_t step) {
  const JobSpec& spec = options_.spec;
  const int64_t n = model_->num_parameters();
  // dp rank 0: the shards' update of the step before (started after its
  // all-reduce, overlapped with this step's compute) ends before this
  // step's all-reduce, so a failure of it (or a kill injected into it)
  // comes before any peer is drawn into this step.
  if (options_.dp_rank == 0) LMPS_RETURN_IF_ERROR(JoinShardUpdate());
  // Sum over the replicas (bitwise identical everywhere), then the mean as
  // the shards compute it (sum, then divide by dp).
  options_.dp_ring->SetStep(step, /*eval=*/false);
  LMPS_RETURN_IF_ERROR(
      options_.dp_ring->AllReduceSum(model_->backend(), model_->grads(), n));
  LMPS_RETURN_IF_ERROR(model_->GradientsToHost(host_grads_.data()));
  const float dp = static_cast<float>(spec.layout().dp());
  // The shards' norm of the same gradient, bitwise.
  const double sum_squares = ps_->MeanAndSumSquares(dp, host_grads_.data());
  if (!std::isfinite(sum_squares)) {
    return absl::InternalError(absl::StrCat(
        "non-finite averaged gradient at step ", step, " (ring all-reduce)"));
  }
  // dp rank 0 hands the same gradient to the shards, off the critical path.
  if (options_.dp_rank == 0) {
    shard_grads_ = host_grads_;
    const int64_t bytes_before = ps_->stats().bytes_pushed;
    shard_update_ = std::thread([this, step, bytes_before] {
      absl::Status s = ps_->Push(step, options_.worker_id, 0,
                                 shard_grads_.data());
      if (s.ok()) s = ApplyStepOnShards(ps_, SYNC, step);
      shard_update_status_ = std::move(s);
    });
  }
  // The shards' update (ParameterShard::OptimizerStepLocked), per tensor.
  const OptimizerConfig& opt = spec.optimizer();
  const double lr = LearningRate(opt, step, spec.train().steps());
  const float scale = static_cast<float>(
      ClipScale(opt.grad_clip(), std::sqrt(sum_squares)));
  progress_.grad_norm = std::sqrt(sum_squares);
  int64_t off = 0;
  for (const auto& [len, decays] : tensor_decay_) {
    const absl::Span<const float> g(host_grads_.data() + off, len);
    const absl::Span<float> p(host_params_.data() + off, len);
    std::vector<absl::Span<float>> state;
    for (std::vector<float>& buffer : opt_state_) {
      state.push_back(absl::MakeSpan(buffer.data() + off, len));
    }
    OptimizerStep(opt, lr, step, decays, scale, g, p, state);
    off += len;
  }
  return model_->SetParametersFromHost(host_params_.data());
}

absl::Status DataParallelTrainer::HostPull(int64_t step, int64_t* version) {
  TpComm* ring = options_.host_ring;
  ring->SetStep(step, /*eval=*/false);
  if (host_leader()) {
    LMPS_RETURN_IF_ERROR(PullInto(step, version));
  } else {
    std::fill(host_params_.begin(), host_params_.end(), 0.0f);
    LMPS_RETURN_IF_ERROR(model_->SetParametersFromHost(host_params_.data()));
    *version = step;  // SYNC: the leader's pull waited for it
  }
  return ring->AllReduceSum(model_->backend(), model_->params(),
                            model_->num_parameters());
}

absl::Status DataParallelTrainer::HostPush(int64_t step) {
  TpComm* ring = options_.host_ring;
  const int64_t n = model_->num_parameters();
  LMPS_RETURN_IF_ERROR(
      ring->AllReduceSum(model_->backend(), model_->grads(), n));
  LMPS_RETURN_IF_ERROR(model_->GradientsToHost(host_grads_.data()));
  if (!host_leader()) return absl::OkStatus();
  const float w = static_cast<float>(ring->size());
  for (int64_t i = 0; i < n; ++i) host_grads_[i] /= w;
  return ps_->Push(step, options_.worker_id, options_.dp_rank / ring->size(),
                   host_grads_.data());
}

absl::Status DataParallelTrainer::PullInto(int64_t step, int64_t* version) {
  // Host-memory backends: straight into the model's parameters (one copy
  // of the model fewer).
  const bool in_place = model_->backend()->memory_is_host();
  LMPS_RETURN_IF_ERROR(ps_->Pull(
      step, in_place ? model_->params() : host_params_.data(), version));
  ++progress_.pulls;
  if (in_place) return absl::OkStatus();
  return model_->SetParametersFromHost(host_params_.data());
}

std::unique_ptr<LayerwisePull> DataParallelTrainer::StartPull(int64_t step) {
  pull_bytes_start_ = ps_->stats().bytes_pulled;
  return std::make_unique<LayerwisePull>(ps_, scheduler_.get(), &groups_, step,
                                         host_params_.data());
}

absl::Status DataParallelTrainer::CopyParams(int64_t begin, int64_t end) {
  return model_->backend()->CopyToBackend(model_->params() + begin,
                                          host_params_.data() + begin,
                                          end - begin);
}

absl::Status DataParallelTrainer::ApplyStep(
    int64_t step, const PsClient::PushedStep* pushed) {
  return ApplyStepOnShards(ps_, options_.spec.train().mode(), step,
                           &progress_.grad_norm, pushed);
}

int64_t DataParallelTrainer::FinalVersion() const {
  if (options_.spec.train().mode() != ASYNC) return end_step_;
  const int64_t steps = std::max<int64_t>(0, end_step_ - options_.start_step);
  return options_.start_step + options_.spec.layout().dp() * steps;
}

int64_t DataParallelTrainer::Staleness(int64_t step, int64_t pulled_version) const {
  if (options_.spec.train().mode() != ASYNC) return step - pulled_version;
  const int64_t start = options_.start_step;
  const int64_t seen =
      start + (pulled_version - start) / options_.spec.layout().dp();
  return std::max<int64_t>(0, step - seen);
}

void DataParallelTrainer::Log(const std::string& line) const {
  if (options_.log) {
    options_.log(line);
    return;
  }
  std::fprintf(stderr, "[%s] %s\n", options_.worker_id.c_str(), line.c_str());
  std::fflush(stderr);
}

absl::Status DataParallelTrainer::BackwardAndPush(
    int64_t step, float grad_scale,
    std::chrono::steady_clock::time_point* backward_done,
    int64_t* push_start_us) {
  OverlappedPush push(model_->backend(), ps_, step, options_.worker_id,
                      options_.dp_rank, model_->grads(), host_grads_.data(),
                      model_->num_parameters());
  LMPS_RETURN_IF_ERROR(model_->Backward(
      grad_scale,
      [&](int64_t begin, int64_t end) { return push.Ready(begin, end); }));
  *backward_done = std::chrono::steady_clock::now();
  progress_.push_bytes_overlapped = push.overlapped_bytes();
  const absl::Status status = push.Finish();
  *push_start_us = push.first_push_us();
  return status;
}

absl::StatusOr<float> DataParallelTrainer::Evaluate() {
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

absl::Status DataParallelTrainer::Run() {
  absl::Status status = RunSteps();
  // Ring and host-group peers: a dead peer fails the step; the scheduler
  // regroups the job at it (TrainingLoopOptions::resize_wait).
  if (status.ok() || !(ring() || hierarchical())) return status;
  return AwaitResizeStop(ps_, step_in_progress_, std::move(status),
                         options_.resize_wait, cancelled_,
                         host_params_.data(),
                         [this](const std::string& l) { Log(l); });
}

absl::Status DataParallelTrainer::RunSteps() {
  const JobSpec& spec = options_.spec;
  const TrainConfig& train = spec.train();
  const ConsistencyMode mode = train.mode();
  const int staleness = EffectiveStaleness(spec);
  const int T = spec.model().block_size();
  const int local_batch = LocalBatch(spec);
  const int M = train.micro_batches();
  const bool slow = train.debug_slow_worker_delay_ms() > 0 &&
                    train.debug_slow_worker_rank() == options_.dp_rank;
  const auto run_start = std::chrono::steady_clock::now();
  int64_t tokens_done = 0;
  // ASYNC: the last version seen; pulling for it never waits (versions only
  // grow) and keeps reads monotonic.
  int64_t async_seen = options_.start_step;
  // Layer-wise: the pull of the next step, started once this step applied.
  std::unique_ptr<LayerwisePull> ahead;
  // The version the last push's answer pulled for this step (-1: none;
  // PsClient::PushAndReduce's next_params).
  int64_t pulled_ahead = -1;
  const bool in_place = model_->backend()->memory_is_host();
  const auto copy = [this](int64_t begin, int64_t end) {
    return CopyParams(begin, end);
  };
  for (int64_t step = options_.start_step; step < end_step_; ++step) {
    if (cancelled_) return absl::CancelledError("training cancelled");
    step_in_progress_ = step;
    auto t0 = std::chrono::steady_clock::now();
    int64_t version = 0;
    int64_t pull_done_us = 0;
    std::unique_ptr<LayerwisePull> pull;  // layer-wise: lands in the forward
    if (layerwise_) {
      pull = ahead != nullptr ? std::move(ahead) : StartPull(step);
      ++progress_.pulls;
    } else {
      pull_bytes_start_ = ps_->stats().bytes_pulled;
      if (hierarchical()) {
        LMPS_RETURN_IF_ERROR(HostPull(step, &version));
      } else if (!ring() && pulled_ahead >= 0) {
        version = pulled_ahead;
        pulled_ahead = -1;
        ++progress_.pulls;
        if (!in_place) {
          LMPS_RETURN_IF_ERROR(
              model_->SetParametersFromHost(host_params_.data()));
        }
      } else if (!ring()) {
        LMPS_RETURN_IF_ERROR(
            PullInto(mode == ASYNC ? async_seen : step, &version));
      } else if (step == options_.start_step) {
        // The shards' parameters and optimizer state: a resumed or replaced
        // worker continues where the other replicas are (bitwise).
        std::vector<float*> state;
        for (std::vector<float>& b : opt_state_) state.push_back(b.data());
        LMPS_RETURN_IF_ERROR(ps_->PullWithOptimizerState(
            step, host_params_.data(), state, &version));
        ++progress_.pulls;
        LMPS_RETURN_IF_ERROR(
            model_->SetParametersFromHost(host_params_.data()));
      } else {
        version = step;  // the local copy, updated by RingStep
      }
      pull_done_us = NowMicros();
      async_seen = std::max(async_seen, version);
      progress_.pulled_version = version;
      progress_.staleness = Staleness(step, version);
    }
    progress_.pull_seconds = SecondsSince(t0);
    if (options_.dp_rank == 0 && train.eval_interval() > 0 &&
        step % train.eval_interval() == 0 && step > options_.start_step) {
      if (pull != nullptr) LMPS_RETURN_IF_ERROR(pull->WaitAll(copy));
      LMPS_ASSIGN_OR_RETURN(progress_.eval_loss, Evaluate());
    }
    const double waited_before = pull != nullptr ? pull->exposed_seconds() : 0;

    auto t1 = std::chrono::steady_clock::now();
    model_->ZeroGrad();
    const bool overlap = options_.overlap_push && !ring() && !hierarchical();
    const float grad_scale = 1.0f / static_cast<float>(M);
    const int64_t bytes_before = ps_->stats().bytes_pushed;
    double loss = 0;
    double slept = 0;
    int64_t push_start_us = 0;
    std::optional<PsClient::PushedStep> pushed;
    std::chrono::steady_clock::time_point t2;
    for (int mb = 0; mb < M; ++mb) {
      const int first = options_.dp_rank * local_batch + mb * micro_batch_;
      data_->Batch(Split::kTrain, train.seed(), step, train.batch_size(),
                   first, micro_batch_, tokens_.data(), targets_.data());
      // The first forward pass waits for each block's parameters only.
      GptModel::ParametersReadyFn ready;
      if (pull != nullptr && mb == 0) {
        ready = [&](int64_t end) { return pull->WaitFor(end, copy); };
      }
      LMPS_ASSIGN_OR_RETURN(
          float l, model_->Forward(tokens_.data(), targets_.data(),
                                   micro_batch_, T, ready));
      if (pull != nullptr && mb == 0) {
        LMPS_RETURN_IF_ERROR(pull->WaitAll(copy));
        version = pull->min_version();
        pull_done_us = pull->landed_us();
        progress_.pulled_version = version;
        progress_.staleness = Staleness(step, version);
      }
      loss += l / M;
      if (overlap && mb == M - 1) break;  // pushed during its backward pass
      LMPS_RETURN_IF_ERROR(model_->Backward(grad_scale));
    }
    if (!std::isfinite(loss)) {
      return absl::InternalError(absl::StrCat(
          "non-finite training loss at step ", step,
          "; the gradient is not pushed (the servers would reject it)"));
    }
    if (slow && overlap) {
      const auto sleep_start = std::chrono::steady_clock::now();
      absl::SleepFor(absl::Milliseconds(train.debug_slow_worker_delay_ms()));
      slept = SecondsSince(sleep_start);
    }
    // The forward pass's waits for parameters are the pull's, not compute.
    const double pull_waited =
        pull != nullptr ? pull->exposed_seconds() - waited_before : 0;
    if (ring() || hierarchical()) {
      t2 = std::chrono::steady_clock::now();
      progress_.compute_seconds = std::chrono::duration<double>(t2 - t1).count();
      push_start_us = NowMicros();
      LMPS_RETURN_IF_ERROR(ring() ? RingStep(step) : HostPush(step));
      progress_.push_bytes_overlapped = 0;
    } else if (overlap) {
      LMPS_RETURN_IF_ERROR(
          BackwardAndPush(step, grad_scale, &t2, &push_start_us));
      progress_.compute_seconds =
          std::chrono::duration<double>(t2 - t1).count() - slept - pull_waited;
    } else {
      // Host-memory backends push straight from the model's gradient.
      if (!in_place) {
        LMPS_RETURN_IF_ERROR(model_->GradientsToHost(host_grads_.data()));
      }
      progress_.compute_seconds = SecondsSince(t1) - pull_waited;
      if (slow) {
        absl::SleepFor(absl::Milliseconds(train.debug_slow_worker_delay_ms()));
      }
      t2 = std::chrono::steady_clock::now();
      push_start_us = NowMicros();
      const float* grads = in_place ? model_->grads() : host_grads_.data();
      if (mode == SYNC && ps_->pushes_to_every_shard()) {
        // The shards answer with the step's norm (and with one shard apply
        // it, and answer the next step's pull): one to three round trips
        // fewer.
        float* next = nullptr;
        if (options_.pull_with_push && !layerwise_ && step + 1 < end_step_) {
          next = in_place ? model_->params() : host_params_.data();
        }
        LMPS_ASSIGN_OR_RETURN(
            pushed, ps_->PushAndReduce(step, options_.worker_id,
                                       options_.dp_rank, grads, next));
        if (pushed->pulled) pulled_ahead = pushed->pulled_version;
      } else {
        LMPS_RETURN_IF_ERROR(
            ps_->Push(step, options_.worker_id, options_.dp_rank, grads));
      }
      progress_.push_bytes_overlapped = 0;
    }
    const int64_t push_done_us = NowMicros();
    progress_.push_seconds = SecondsSince(t2);
    progress_.push_bytes = ps_->stats().bytes_pushed - bytes_before;

    auto t3 = std::chrono::steady_clock::now();
    if (ring()) {
      // RingStep updated the parameters.
    } else if (hierarchical() && !host_leader()) {
      // The leader applies; the next HostPull shares the result.
    } else if (mode == SYNC) {
      LMPS_RETURN_IF_ERROR(ApplyStep(step, pushed ? &*pushed : nullptr));
    } else if (mode == BOUNDED_STALENESS &&
               step - staleness >= options_.start_step) {
      // Waits until the slowest replica pushed step - staleness.
      LMPS_RETURN_IF_ERROR(ApplyStep(step - staleness));
    }
    progress_.sync_seconds = SecondsSince(t3);
    tokens_done += static_cast<int64_t>(local_batch) * T;
    progress_.step = step + 1;
    progress_.loss = static_cast<float>(loss);
    progress_.tokens_per_second = tokens_done / SecondsSince(run_start);
    progress_.learning_rate =
        LearningRate(options_.spec.optimizer(), step, train.steps());
    progress_.pull_bytes = ps_->stats().bytes_pulled - pull_bytes_start_;
    // Communication hidden behind compute: the pull's and the push's wall
    // time in flight, less the time the step waited for them.
    double pull_total = progress_.pull_seconds;
    if (pull != nullptr) {
      progress_.pull_seconds = pull->exposed_seconds();
      pull_total = pull->total_seconds();
    }
    const double push_total =
        overlap ? std::max(0.0, (push_done_us - push_start_us) / 1e6)
                : progress_.push_seconds;
    progress_.comm_seconds = pull_total + push_total;
    progress_.comm_hidden_seconds =
        std::max(0.0, progress_.comm_seconds - progress_.pull_seconds -
                          progress_.push_seconds);
    pull.reset();
    if (layerwise_ && step + 1 < end_step_) ahead = StartPull(step + 1);
    if (train.debug_trace_steps()) {
      Log(absl::StrFormat(
          "trace dp_rank=%d step=%d pulled_version=%d staleness=%d loss=%.6f "
          "pull_done_us=%d push_start_us=%d push_done_us=%d",
          options_.dp_rank, step, version, progress_.staleness, loss,
          pull_done_us, push_start_us, push_done_us));
    }
    if (options_.on_progress) options_.on_progress(progress_);
  }
  if (mode == BOUNDED_STALENESS) {
    // The last `staleness` steps are not applied yet.
    for (int64_t j = std::max<int64_t>(options_.start_step,
                                       end_step_ - staleness);
         j < end_step_; ++j) {
      if (cancelled_) return absl::CancelledError("training cancelled");
      LMPS_RETURN_IF_ERROR(ApplyStep(j));
    }
  }
  // RING_ALLREDUCE: the shards have the last step before Run returns (the
  // checkpoint after the last step, export and the final eval read them).
  LMPS_RETURN_IF_ERROR(JoinShardUpdate());
  if (options_.dp_rank == 0 && train.eval_interval() > 0 &&
      end_step_ > options_.start_step) {
    // RING_ALLREDUCE: the model already holds the final parameters.
    if (!ring()) LMPS_RETURN_IF_ERROR(PullInto(FinalVersion()));
    LMPS_ASSIGN_OR_RETURN(progress_.eval_loss, Evaluate());
    if (options_.on_progress) options_.on_progress(progress_);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> DataParallelTrainer::Sample(const std::string& prompt, int n,
                                            float temperature, int top_k) {
  LMPS_RETURN_IF_ERROR(PullInto(FinalVersion()));
  LMPS_ASSIGN_OR_RETURN(
      std::vector<int32_t> out,
      model_->Generate(data_->EncodePrompt(prompt), n,
                       SamplingOptions{.temperature = temperature,
                                       .top_k = top_k,
                                       .vocab_limit = std::min(
                                           data_->SampleVocab(),
                                           model_->config().vocab_size())},
                       options_.spec.train().seed()));
  // Generate returns only the new tokens.
  return prompt + data_->DecodeSample(out);
}

}  // namespace lmps
