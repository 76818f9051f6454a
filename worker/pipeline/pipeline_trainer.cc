#include "worker/pipeline/pipeline_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/model/job_spec.h"
#include "common/model/learning_rate.h"
#include "common/rpc/status_util.h"
#include "worker/pipeline/schedule.h"

namespace lmps {
namespace {

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t)
      .count();
}

TransferKey Key(PeerKind kind, bool eval, int64_t step, int micro_batch) {
  TransferKey k;
  k.kind = kind;
  k.eval = eval;
  k.step = step;
  k.micro_batch = micro_batch;
  k.seq = 0;
  k.round = 0;
  return k;
}

}  // namespace

int PipelineTrainer::StageSlots(const JobSpec& spec, int stage) {
  return MaxLiveMicroBatches(StageSchedule(spec.layout().schedule(), stage,
                                           spec.layout().pp(),
                                           spec.train().micro_batches()));
}

StageModelOptions PipelineTrainer::StageOptions(const JobSpec& spec,
                                                const ParallelLayout& layout,
                                                const WorkerCoords& coords,
                                                int micro_batch) {
  const StageRange& stage = layout.stage(coords.pp);
  StageModelOptions so;
  so.config = spec.model();
  so.layer_begin = stage.layer_begin;
  so.layer_end = stage.layer_end;
  so.has_embedding = stage.has_embedding;
  so.has_head = stage.has_head;
  so.tp_size = layout.tp();
  so.tp_rank = coords.tp;
  so.sequence_parallel = layout.sequence_parallel();
  so.vocab_parallel = layout.vocab_parallel();
  so.max_batch = micro_batch;
  so.max_seq = spec.model().block_size();
  so.activation_slots = StageSlots(spec, coords.pp);
  return so;
}

absl::StatusOr<std::unique_ptr<PipelineTrainer>> PipelineTrainer::Create(
    PipelineTrainerOptions options, const ParallelLayout* layout,
    StageModel* model, PsClient* ps, PeerNetwork* peers, TpComm* comm,
    const Dataset* data) {
  const JobSpec& spec = options.spec;
  const WorkerCoords& c = options.coords;
  if (c.dp < 0 || c.dp >= layout->dp() || c.pp < 0 || c.pp >= layout->pp() ||
      c.tp < 0 || c.tp >= layout->tp()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "worker coordinates (dp ", c.dp, ", pp ", c.pp, ", tp ", c.tp,
        ") are outside the layout"));
  }
  if (layout->tp() > 1 && comm == nullptr) {
    return absl::InvalidArgumentError("tp > 1 needs a TpComm");
  }
  if (model->num_parameters() != ps->num_parameters()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the stage model holds ", model->num_parameters(),
        " parameters but the parameter-server view ", ps->num_parameters()));
  }
  if (model->options().activation_slots < StageSlots(spec, c.pp)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the stage model has ", model->options().activation_slots,
        " activation slots; the schedule needs ", StageSlots(spec, c.pp)));
  }
  std::unique_ptr<PipelineTrainer> t(new PipelineTrainer());
  t->options_ = std::move(options);
  t->layout_ = layout;
  t->model_ = model;
  t->ps_ = ps;
  t->peers_ = peers;
  t->comm_ = comm;
  t->data_ = data;
  t->stage_ = layout->stage(c.pp);
  if (c.pp > 0) t->prev_rank_ = layout->Rank({c.dp, c.pp - 1, c.tp});
  if (c.pp + 1 < layout->pp()) t->next_rank_ = layout->Rank({c.dp, c.pp + 1, c.tp});
  const TrainConfig& train = t->options_.spec.train();
  t->end_step_ = train.steps();
  if (train.stop_after_step() > 0 && train.stop_after_step() < t->end_step_) {
    t->end_step_ = train.stop_after_step();
  }
  t->micro_batch_ = LocalBatch(t->options_.spec) / train.micro_batches();
  const int T = t->options_.spec.model().block_size();
  // With sequence parallelism a stage exchanges its tp rank's token chunk.
  const size_t act =
      static_cast<size_t>(t->micro_batch_) * T *
      t->options_.spec.model().n_embd() /
      (layout->sequence_parallel() ? layout->tp() : 1);
  t->host_params_.resize(model->num_parameters());
  t->host_grads_.resize(model->num_parameters());
  t->act_in_.resize(act);
  t->act_out_.resize(act);
  t->tokens_.resize(static_cast<size_t>(t->micro_batch_) * T);
  t->targets_.resize(t->tokens_.size());
  t->progress_.step = t->options_.start_step;
  t->progress_.end_step = t->end_step_;
  PipelineTrainer* raw = t.get();
  t->pinned_ = std::make_unique<PinnedHostBuffers>(
      model->backend(),
      std::vector<std::vector<float>*>{&t->host_params_, &t->host_grads_},
      [raw](const std::string& line) { raw->Log(line); });
  return t;
}

void PipelineTrainer::Log(const std::string& line) const {
  if (options_.log) {
    options_.log(line);
    return;
  }
  std::fprintf(stderr, "[%s] %s\n", options_.worker_id.c_str(), line.c_str());
  std::fflush(stderr);
}

absl::Status PipelineTrainer::PullInto(int64_t step) {
  LMPS_RETURN_IF_ERROR(ps_->Pull(step, host_params_.data()));
  ++progress_.pulls;
  return model_->SetParametersFromHost(host_params_.data());
}

absl::Status PipelineTrainer::AwaitResizeStop(int64_t step,
                                              absl::Status error) {
  return lmps::AwaitResizeStop(ps_, step, std::move(error),
                               options_.resize_wait, cancelled_,
                               host_params_.data(),
                               [this](const std::string& l) { Log(l); });
}

absl::Status PipelineTrainer::ApplyStep(int64_t step) {
  return ApplyStepOnShards(ps_, options_.spec.train().mode(), step,
                           &progress_.grad_norm);
}

absl::StatusOr<int> PipelineTrainer::ForwardOne(int64_t step, bool eval, int i,
                                                const int32_t* tokens,
                                                const int32_t* targets,
                                                float* loss,
                                                double* idle_seconds) {
  const int T = options_.spec.model().block_size();
  const float* input = nullptr;
  std::vector<float> received;
  if (!stage_.has_embedding) {
    const auto t0 = std::chrono::steady_clock::now();
    LMPS_ASSIGN_OR_RETURN(received,
                          peers_->Receive(prev_rank_, Key(ACTIVATION, eval, step, i)));
    *idle_seconds += SecondsSince(t0);
    if (received.size() != act_in_.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "activation of micro-batch ", i, " from ", peers_->Describe(prev_rank_),
          " has ", received.size(), " floats; expected ", act_in_.size()));
    }
    input = received.data();
  }
  int slot = -1;
  for (int s = 0; s < model_->options().activation_slots; ++s) {
    if (!model_->slot_in_use(s)) {
      slot = s;
      break;
    }
  }
  if (slot < 0) {
    return absl::InternalError("no free activation slot (schedule bug)");
  }
  LMPS_ASSIGN_OR_RETURN(
      float l, model_->Forward(slot, tokens, input, targets,
                               stage_.has_head ? nullptr : act_out_.data(),
                               micro_batch_, T));
  if (stage_.has_head) {
    *loss = l;
  } else {
    LMPS_RETURN_IF_ERROR(peers_->Send(next_rank_, Key(ACTIVATION, eval, step, i),
                                      act_out_.data(), act_out_.size()));
  }
  return slot;
}

absl::Status PipelineTrainer::BackwardOne(
    int64_t step, int i, int slot, double* idle_seconds,
    const StageModel::GradientReadyFn& on_ready) {
  const float* dout = nullptr;
  std::vector<float> received;
  if (!stage_.has_head) {
    const auto t0 = std::chrono::steady_clock::now();
    LMPS_ASSIGN_OR_RETURN(
        received, peers_->Receive(next_rank_, Key(ACTIVATION_GRAD, false, step, i)));
    *idle_seconds += SecondsSince(t0);
    if (received.size() != act_out_.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "activation gradient of micro-batch ", i, " from ",
          peers_->Describe(next_rank_), " has ", received.size(),
          " floats; expected ", act_out_.size()));
    }
    dout = received.data();
  }
  const float scale = 1.0f / static_cast<float>(options_.spec.train().micro_batches());
  LMPS_RETURN_IF_ERROR(model_->Backward(
      slot, dout, scale, stage_.has_embedding ? nullptr : act_in_.data(),
      on_ready));
  if (!stage_.has_embedding) {
    LMPS_RETURN_IF_ERROR(peers_->Send(prev_rank_,
                                      Key(ACTIVATION_GRAD, false, step, i),
                                      act_in_.data(), act_in_.size()));
  }
  return absl::OkStatus();
}

absl::Status PipelineTrainer::TrainStep(int64_t step, double* loss,
                                        OverlappedPush* push) {
  const JobSpec& spec = options_.spec;
  const TrainConfig& train = spec.train();
  const int M = train.micro_batches();
  const int local_batch = LocalBatch(spec);
  if (comm_ != nullptr) comm_->SetStep(step, /*eval=*/false);
  model_->ZeroGrad();
  model_->ResetMaxSlotsInUse();
  std::vector<int> slot_of(M, -1);
  double idle = 0;
  *loss = 0;
  const auto start = std::chrono::steady_clock::now();
  const std::vector<PipelineOp> ops = StageSchedule(
      spec.layout().schedule(), options_.coords.pp, layout_->pp(), M);
  // The last backward pass completes the step's gradient: its ready ranges
  // go to the pusher.
  size_t last_backward = ops.size();
  for (size_t k = 0; k < ops.size(); ++k) {
    if (!ops[k].forward) last_backward = k;
  }
  StageModel::GradientReadyFn on_ready = nullptr;
  if (push != nullptr) {
    on_ready = [push](int64_t begin, int64_t end) {
      return push->Ready(begin, end);
    };
  }
  for (size_t k = 0; k < ops.size(); ++k) {
    const PipelineOp& op = ops[k];
    if (cancelled_) return absl::CancelledError("training cancelled");
    const int i = op.micro_batch;
    if (op.forward) {
      const int first = options_.coords.dp * local_batch + i * micro_batch_;
      if (stage_.has_embedding || stage_.has_head) {
        data_->Batch(Split::kTrain, train.seed(), step, train.batch_size(),
                     first, micro_batch_, tokens_.data(), targets_.data());
      }
      float l = 0;
      LMPS_ASSIGN_OR_RETURN(slot_of[i],
                            ForwardOne(step, false, i, tokens_.data(),
                                       targets_.data(), &l, &idle));
      *loss += l / M;
    } else {
      LMPS_RETURN_IF_ERROR(BackwardOne(step, i, slot_of[i], &idle,
                                       k == last_backward ? on_ready : nullptr));
    }
  }
  const double total = SecondsSince(start);
  progress_.bubble_fraction = total > 0 ? idle / total : 0;
  progress_.ideal_bubble_fraction = IdealBubbleFraction(layout_->pp(), M);
  progress_.max_live_micro_batches = model_->max_slots_in_use();
  progress_.peak_activation_bytes = model_->peak_activation_bytes();
  progress_.peak_layernorm_activation_bytes =
      static_cast<int64_t>(model_->max_slots_in_use()) *
      model_->activation_memory().layernorm_region_per_slot;
  return absl::OkStatus();
}

absl::StatusOr<float> PipelineTrainer::Evaluate(int64_t step) {
  const JobSpec& spec = options_.spec;
  if (comm_ != nullptr) comm_->SetStep(step, /*eval=*/true);
  double sum = 0, idle = 0;
  const int n = spec.train().eval_batches();
  for (int b = 0; b < n; ++b) {
    if (stage_.has_embedding || stage_.has_head) {
      data_->Batch(Split::kVal, spec.train().seed(), b, micro_batch_, 0,
                   micro_batch_, tokens_.data(), targets_.data());
    }
    float l = 0;
    LMPS_ASSIGN_OR_RETURN(int slot, ForwardOne(step, true, b, tokens_.data(),
                                               targets_.data(), &l, &idle));
    model_->ReleaseSlot(slot);
    sum += l;
  }
  if (!stage_.has_head) return NAN;
  return static_cast<float>(sum / std::max(1, n));
}

absl::Status PipelineTrainer::Run() {
  const JobSpec& spec = options_.spec;
  const TrainConfig& train = spec.train();
  const int staleness = EffectiveStaleness(spec);
  const int T = spec.model().block_size();
  const bool evaluates = options_.coords.dp == 0 && train.eval_interval() > 0;
  const auto run_start = std::chrono::steady_clock::now();
  int64_t tokens_done = 0;
  for (int64_t step = options_.start_step; step < end_step_; ++step) {
    if (cancelled_) return absl::CancelledError("training cancelled");
    auto t0 = std::chrono::steady_clock::now();
    const int64_t pulled_before = ps_->stats().bytes_pulled;
    LMPS_RETURN_IF_ERROR(PullInto(step));
    progress_.pulled_version = step;
    progress_.pull_seconds = SecondsSince(t0);
    if (evaluates && step % train.eval_interval() == 0 &&
        step > options_.start_step) {
      absl::StatusOr<float> eval = Evaluate(step);
      if (!eval.ok()) return AwaitResizeStop(step, eval.status());
      progress_.eval_loss = *eval;
    }

    if (options_.on_step_start) options_.on_step_start(step);
    auto t1 = std::chrono::steady_clock::now();
    double loss = 0;
    const int64_t bytes_before = ps_->stats().bytes_pushed;
    std::unique_ptr<OverlappedPush> push;
    if (options_.overlap_push) {
      push = std::make_unique<OverlappedPush>(
          model_->backend(), ps_, step, options_.worker_id, options_.coords.dp,
          model_->grads(), host_grads_.data(), model_->num_parameters());
    }
    if (absl::Status s = TrainStep(step, &loss, push.get()); !s.ok()) {
      push.reset();  // pushes nothing more, waits for its copies
      return AwaitResizeStop(step, std::move(s));
    }
    if (stage_.has_head && !std::isfinite(loss)) {
      return absl::InternalError(absl::StrCat(
          "non-finite training loss at step ", step,
          "; the gradient is not pushed (the servers would reject it)"));
    }
    if (push == nullptr) {
      LMPS_RETURN_IF_ERROR(model_->GradientsToHost(host_grads_.data()));
    }
    progress_.compute_seconds = SecondsSince(t1);
    if (train.debug_slow_worker_delay_ms() > 0 &&
        train.debug_slow_worker_rank() == options_.coords.dp) {
      absl::SleepFor(absl::Milliseconds(train.debug_slow_worker_delay_ms()));
    }

    auto t2 = std::chrono::steady_clock::now();
    if (push != nullptr) {
      progress_.push_bytes_overlapped = push->overlapped_bytes();
      LMPS_RETURN_IF_ERROR(push->Finish());
    } else {
      LMPS_RETURN_IF_ERROR(ps_->Push(step, options_.worker_id,
                                     options_.coords.dp, host_grads_.data()));
    }
    progress_.push_bytes = ps_->stats().bytes_pushed - bytes_before;
    progress_.push_seconds = SecondsSince(t2);

    auto t3 = std::chrono::steady_clock::now();
    if (train.mode() == SYNC) {
      LMPS_RETURN_IF_ERROR(ApplyStep(step));
    } else if (step - staleness >= options_.start_step) {
      LMPS_RETURN_IF_ERROR(ApplyStep(step - staleness));
    }
    progress_.sync_seconds = SecondsSince(t3);
    tokens_done += static_cast<int64_t>(LocalBatch(spec)) * T;
    progress_.step = step + 1;
    progress_.loss = stage_.has_head ? static_cast<float>(loss) : NAN;
    progress_.learning_rate =
        LearningRate(spec.optimizer(), step, train.steps());
    progress_.pull_bytes = ps_->stats().bytes_pulled - pulled_before;
    progress_.tokens_per_second = tokens_done / SecondsSince(run_start);
    if (train.debug_trace_steps()) {
      Log(absl::StrFormat(
          "trace dp_rank=%d pp_rank=%d tp_rank=%d step=%d loss=%.6f "
          "compute_s=%.6f bubble=%.4f ideal_bubble=%.4f "
          "max_live_micro_batches=%d push_bytes=%d push_bytes_overlapped=%d "
          "peak_activation_bytes=%d peak_layernorm_activation_bytes=%d",
          options_.coords.dp, options_.coords.pp, options_.coords.tp, step,
          progress_.loss, progress_.compute_seconds, progress_.bubble_fraction,
          progress_.ideal_bubble_fraction, progress_.max_live_micro_batches,
          progress_.push_bytes, progress_.push_bytes_overlapped,
          progress_.peak_activation_bytes,
          progress_.peak_layernorm_activation_bytes));
    }
    if (options_.on_progress) options_.on_progress(progress_);
  }
  if (train.mode() == BOUNDED_STALENESS) {
    for (int64_t j = std::max<int64_t>(options_.start_step, end_step_ - staleness);
         j < end_step_; ++j) {
      if (cancelled_) return absl::CancelledError("training cancelled");
      LMPS_RETURN_IF_ERROR(ApplyStep(j));
    }
  }
  if (evaluates && end_step_ > options_.start_step) {
    LMPS_RETURN_IF_ERROR(PullInto(end_step_));
    LMPS_ASSIGN_OR_RETURN(progress_.eval_loss, Evaluate(end_step_));
    if (options_.on_progress) options_.on_progress(progress_);
  }
  return absl::OkStatus();
}

}  // namespace lmps
