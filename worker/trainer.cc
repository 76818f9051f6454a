#include "worker/trainer.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/job_spec.h"
#include "common/parallel_layout.h"
#include "common/status_util.h"

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

// Pushes a step's host gradient grads[0, n) on a background thread while the
// backward pass finishes it from the end: Ready(b, ticket) says grads[b, n)
// is final on host once the backend's asynchronous copy `ticket`
// (Backend::CopyToHostAsync; 0: none) has landed; the thread waits for that
// copy (Backend::WaitCopy), then pushes the chunks inside the finished
// suffix not pushed yet (PsClient::PushChunks with the previous suffix as
// `done`, so every chunk goes exactly once), coalescing the suffixes that
// became ready during a push. Finish(ticket) (all final) pushes the rest
// and waits; Abandon() (the backward pass failed) stops without pushing
// what is not final, and waits for the copies issued so far.
// Thread-safety: Ready, Finish and Abandon on one thread (the trainer's); the
// client is used by the pushing thread only until Finish/Abandon return.
class SuffixPusher {
 public:
  SuffixPusher(Backend* backend, PsClient* ps, int64_t step,
               const std::string& worker_id, int dp_rank, const float* grads,
               int64_t n)
      : backend_(backend),
        ps_(ps),
        step_(step),
        worker_id_(worker_id),
        dp_rank_(dp_rank),
        grads_(grads),
        n_(n),
        ready_begin_(n) {
    thread_ = std::thread([this] { Loop(); });
  }
  SuffixPusher(const SuffixPusher&) = delete;
  SuffixPusher& operator=(const SuffixPusher&) = delete;
  ~SuffixPusher() { Abandon(); }

  void Ready(int64_t begin, uint64_t ticket) {
    absl::MutexLock lock(&mu_);
    ready_begin_ = std::min(ready_begin_, begin);
    ready_ticket_ = std::max(ready_ticket_, ticket);
    cv_.Signal();
  }
  // The first copy or push error, or OK once every chunk was pushed.
  absl::Status Finish(uint64_t ticket) {
    Ready(0, ticket);
    thread_.join();
    // After a push error too, no copy may land in the buffer later.
    const absl::Status copied = backend_->WaitCopy(ticket);
    return status_.ok() ? copied : status_;
  }
  void Abandon() {
    uint64_t ticket = 0;
    {
      absl::MutexLock lock(&mu_);
      abandoned_ = true;
      ticket = ready_ticket_;
      cv_.Signal();
    }
    if (thread_.joinable()) {
      thread_.join();
      // No copy may land in the host buffer after this returns.
      backend_->WaitCopy(ticket).IgnoreError();
    }
  }
  // Steady-clock microseconds when the first stream started (0: none); read
  // after Finish.
  int64_t first_push_us() const { return first_push_us_; }

 private:
  void Loop() {
    ElementRange done{n_, n_};  // pushed: the chunks inside it
    while (done.begin > 0) {
      ElementRange range{0, n_};
      uint64_t ticket = 0;
      {
        absl::MutexLock lock(&mu_);
        while (!abandoned_ && ready_begin_ >= done.begin) cv_.Wait(&mu_);
        if (abandoned_) return;
        range.begin = ready_begin_;
        ticket = ready_ticket_;
      }
      status_ = backend_->WaitCopy(ticket);
      if (!status_.ok()) return;
      if (first_push_us_ == 0) first_push_us_ = NowMicros();
      status_ = ps_->PushChunks(step_, worker_id_, dp_rank_, grads_, range,
                                done);
      if (!status_.ok()) return;
      done = range;
    }
  }

  Backend* const backend_;
  PsClient* const ps_;
  const int64_t step_;
  const std::string worker_id_;
  const int dp_rank_;
  const float* const grads_;
  const int64_t n_;
  absl::Mutex mu_;
  absl::CondVar cv_;
  int64_t ready_begin_ ABSL_GUARDED_BY(mu_);
  uint64_t ready_ticket_ ABSL_GUARDED_BY(mu_) = 0;
  bool abandoned_ ABSL_GUARDED_BY(mu_) = false;
  // Written by the pushing thread, read after it is joined.
  absl::Status status_;
  int64_t first_push_us_ = 0;
  std::thread thread_;
};

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
  // Page-locked host buffers make a device backend's copies asynchronous
  // DMA (a no-op on the CPU); without them copies are only slower.
  Backend* backend = model->backend();
  for (std::vector<float>* buffer : {&t->host_params_, &t->host_grads_}) {
    if (absl::Status s = backend->PinHostMemory(
            buffer->data(), buffer->size() * sizeof(float));
        !s.ok()) {
      t->Log(absl::StrCat("cannot pin a host buffer (copies are slower): ",
                          s.message()));
    }
  }
  return t;
}

Trainer::~Trainer() {
  if (model_ == nullptr) return;
  model_->backend()->UnpinHostMemory(host_params_.data());
  model_->backend()->UnpinHostMemory(host_grads_.data());
}

absl::Status Trainer::PullInto(int64_t step, int64_t* version) {
  LMPS_RETURN_IF_ERROR(ps_->Pull(step, host_params_.data(), version));
  return model_->SetParametersFromHost(host_params_.data());
}

absl::Status ApplyStepOnShards(PsClient* ps, ConsistencyMode mode,
                               int64_t step) {
  LMPS_ASSIGN_OR_RETURN(double sum_squares, ps->GradNorm(step));
  if (mode == SYNC) {
    LMPS_ASSIGN_OR_RETURN(int64_t version, ps->Apply(step, sum_squares));
    if (version != step + 1) {
      return absl::InternalError(absl::StrCat("after applying step ", step,
                                              " the servers are at version ",
                                              version));
    }
    return absl::OkStatus();
  }
  return ps->ApplyBounded(step, sum_squares).status();
}

absl::Status Trainer::ApplyStep(int64_t step) {
  return ApplyStepOnShards(ps_, options_.spec.train().mode(), step);
}

int64_t Trainer::FinalVersion() const {
  if (options_.spec.train().mode() != ASYNC) return end_step_;
  const int64_t steps = std::max<int64_t>(0, end_step_ - options_.start_step);
  return options_.start_step + options_.spec.layout().dp() * steps;
}

int64_t Trainer::Staleness(int64_t step, int64_t pulled_version) const {
  if (options_.spec.train().mode() != ASYNC) return step - pulled_version;
  const int64_t start = options_.start_step;
  const int64_t seen =
      start + (pulled_version - start) / options_.spec.layout().dp();
  return std::max<int64_t>(0, step - seen);
}

void Trainer::Log(const std::string& line) const {
  if (options_.log) {
    options_.log(line);
    return;
  }
  std::fprintf(stderr, "[%s] %s\n", options_.worker_id.c_str(), line.c_str());
  std::fflush(stderr);
}

absl::Status Trainer::BackwardAndPush(
    int64_t step, float grad_scale,
    std::chrono::steady_clock::time_point* backward_done,
    int64_t* push_start_us) {
  const int64_t n = model_->num_parameters();
  float* host = host_grads_.data();
  Backend* backend = model_->backend();
  SuffixPusher pusher(backend, ps_, step, options_.worker_id,
                      options_.dp_rank, host, n);
  const int64_t bytes_before = ps_->stats().bytes_pushed;
  // host[suffix, n) is final and handed to the pusher. `overlapped`: bytes
  // pushed before the pass's last range was final (its compute ended).
  // Each finished range is copied to the host asynchronously (on a device
  // the copy runs while the backward pass goes on); the pusher waits for a
  // copy before pushing what it covers.
  int64_t suffix = n;
  int64_t overlapped = 0;
  uint64_t last_ticket = 0;
  absl::Status status = model_->Backward(
      grad_scale, [&](int64_t begin, int64_t end) -> absl::Status {
        LMPS_ASSIGN_OR_RETURN(
            const uint64_t ticket,
            backend->CopyToHostAsync(host + begin, model_->grads() + begin,
                                     end - begin));
        last_ticket = std::max(last_ticket, ticket);
        overlapped = ps_->stats().bytes_pushed - bytes_before;
        if (end == suffix) {
          suffix = begin;
          pusher.Ready(begin, last_ticket);
        }
        return absl::OkStatus();
      });
  if (status.ok() && suffix > 0) {
    // Ranges that did not extend the suffix: copied again, all at once
    // (the pusher reads only host[suffix, n)).
    status = backend->CopyToHost(host, model_->grads(), suffix);
  }
  if (!status.ok()) {
    pusher.Abandon();  // nothing that is not final is pushed
    return status;
  }
  *backward_done = std::chrono::steady_clock::now();
  progress_.push_bytes_overlapped = overlapped;
  status = pusher.Finish(last_ticket);
  *push_start_us = pusher.first_push_us();
  return status;
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
  for (int64_t step = options_.start_step; step < end_step_; ++step) {
    if (cancelled_) return absl::CancelledError("training cancelled");
    auto t0 = std::chrono::steady_clock::now();
    int64_t version = 0;
    LMPS_RETURN_IF_ERROR(
        PullInto(mode == ASYNC ? async_seen : step, &version));
    const int64_t pull_done_us = NowMicros();
    async_seen = std::max(async_seen, version);
    progress_.pulled_version = version;
    progress_.staleness = Staleness(step, version);
    progress_.pull_seconds = SecondsSince(t0);
    if (options_.dp_rank == 0 && train.eval_interval() > 0 &&
        step % train.eval_interval() == 0 && step > options_.start_step) {
      LMPS_ASSIGN_OR_RETURN(progress_.eval_loss, Evaluate());
    }

    auto t1 = std::chrono::steady_clock::now();
    model_->ZeroGrad();
    const bool overlap = options_.overlap_push;
    const float grad_scale = 1.0f / static_cast<float>(M);
    const int64_t bytes_before = ps_->stats().bytes_pushed;
    double loss = 0;
    double slept = 0;
    int64_t push_start_us = 0;
    std::chrono::steady_clock::time_point t2;
    for (int mb = 0; mb < M; ++mb) {
      const int first = options_.dp_rank * local_batch + mb * micro_batch_;
      data_->Batch(Split::kTrain, train.seed(), step, train.batch_size(),
                   first, micro_batch_, tokens_.data(), targets_.data());
      LMPS_ASSIGN_OR_RETURN(float l, model_->Forward(tokens_.data(),
                                                     targets_.data(),
                                                     micro_batch_, T));
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
    if (overlap) {
      LMPS_RETURN_IF_ERROR(
          BackwardAndPush(step, grad_scale, &t2, &push_start_us));
      progress_.compute_seconds =
          std::chrono::duration<double>(t2 - t1).count() - slept;
    } else {
      LMPS_RETURN_IF_ERROR(model_->GradientsToHost(host_grads_.data()));
      progress_.compute_seconds = SecondsSince(t1);
      if (slow) {
        absl::SleepFor(absl::Milliseconds(train.debug_slow_worker_delay_ms()));
      }
      t2 = std::chrono::steady_clock::now();
      push_start_us = NowMicros();
      LMPS_RETURN_IF_ERROR(ps_->Push(step, options_.worker_id,
                                     options_.dp_rank, host_grads_.data()));
      progress_.push_bytes_overlapped = 0;
    }
    const int64_t push_done_us = NowMicros();
    progress_.push_seconds = SecondsSince(t2);
    progress_.push_bytes = ps_->stats().bytes_pushed - bytes_before;

    auto t3 = std::chrono::steady_clock::now();
    if (mode == SYNC) {
      LMPS_RETURN_IF_ERROR(ApplyStep(step));
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
  if (options_.dp_rank == 0 && train.eval_interval() > 0 &&
      end_step_ > options_.start_step) {
    LMPS_RETURN_IF_ERROR(PullInto(FinalVersion()));
    LMPS_ASSIGN_OR_RETURN(progress_.eval_loss, Evaluate());
    if (options_.on_progress) options_.on_progress(progress_);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Trainer::Sample(const std::string& prompt, int n,
                                            float temperature, int top_k) {
  LMPS_RETURN_IF_ERROR(PullInto(FinalVersion()));
  LMPS_ASSIGN_OR_RETURN(
      std::vector<int32_t> out,
      model_->Generate(TextDataset::Encode(prompt), n, temperature, top_k,
                       options_.spec.train().seed()));
  // Generate returns only the new tokens.
  return prompt + TextDataset::Decode(out);
}

}  // namespace lmps
