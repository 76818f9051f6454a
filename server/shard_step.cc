// ParameterShard in SYNC and BOUNDED_STALENESS (one code path; SYNC is
// staleness 0): the step slots holding the pending steps' gradients, their
// completion and reduction, GradNorm, Apply and StopAt (elastic resize).
#include "server/shard.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/rpc/status_util.h"
#include "server/optimizer.h"
#include "server/shard_internal.h"
#include "server/tensor_codec.h"

namespace lmps {

using shard_internal::NotInAsync;
using shard_internal::ResizeStop;
using shard_internal::Seconds;

// ---------------------------------------------------------------------------
// SYNC and BOUNDED_STALENESS: push, GradNorm and Apply.
// ---------------------------------------------------------------------------

ParameterShard::StepGrads* ParameterShard::FindSlotLocked(int64_t step) {
  if (step < 0 || step_slots_.empty()) return nullptr;
  StepGrads& slot = step_slots_[step % step_slots_.size()];
  return slot.step == step ? &slot : nullptr;
}

const ParameterShard::StepGrads* ParameterShard::FindSlotLocked(
    int64_t step) const {
  if (step < 0 || step_slots_.empty()) return nullptr;
  const StepGrads& slot = step_slots_[step % step_slots_.size()];
  return slot.step == step ? &slot : nullptr;
}

ParameterShard::StepGrads& ParameterShard::SlotLocked(int64_t step) {
  StepGrads& slot = step_slots_[step % step_slots_.size()];
  if (slot.step == step) return slot;
  // The slot is free or holds an applied step: steps version..version + s
  // map to distinct slots.
  slot.step = step;
  slot.reduced = false;
  slot.sum_squares = 0;
  if (slot.sum.empty()) {
    slot.sum.resize(chunks_.size());
    slot.held.resize(chunks_.size());
    slot.received.resize(chunks_.size());
    slot.parts.resize(chunks_.size());
    for (size_t c = 0; c < chunks_.size(); ++c) {
      slot.sum[c].assign(chunks_[c].size(), 0.0f);
      slot.held[c].resize(dp_);
      slot.received[c].assign(dp_ * owners_[c].contributors.size(), 0);
      slot.parts[c].assign(dp_, 0);
    }
    slot.chunks_received.assign(dp_, 0);
  } else {
    // The sums keep the old step's values: the first rank folded
    // overwrites them (TakePartLocked).
    for (auto& r : slot.received) std::fill(r.begin(), r.end(), 0);
    for (auto& r : slot.parts) std::fill(r.begin(), r.end(), 0);
    for (auto& c : slot.held) {
      for (auto& h : c) std::vector<float>().swap(h);
    }
    std::fill(slot.chunks_received.begin(), slot.chunks_received.end(), 0);
  }
  slot.folded.assign(chunks_.size(), 0);
  slot.first_folded.assign(chunks_.size(), -1);
  return slot;
}

absl::StatusOr<PushResponse> ParameterShard::PushStepLocked(
    int rank, int worker, int64_t step, const PushedPieces& pieces,
    const std::string& who) {
  const int shard = options_.shard;
  if (step < version_) {
    if (clocks_[rank] > step) {
      // This rank's whole gradient for the step had arrived before it was
      // applied: a retry (e.g. a replacement worker redoing the step its
      // predecessor had half pushed). Acknowledge it as a duplicate.
      PushResponse response;
      response.set_chunks_duplicate(static_cast<int>(pieces.size()));
      duplicates_ += static_cast<int64_t>(pieces.size());
      return response;
    }
    return absl::FailedPreconditionError(
        absl::StrCat(who, ": shard ", shard, " is at version ", version_,
                     "; step ", step, " was already applied"));
  }
  if (step > version_ + staleness_) {
    if (staleness_ == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          who, ": shard ", shard, " is at version ", version_, "; step ", step,
          " is far in the future (pull version ", step, " first)"));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        who, ": shard ", shard, " is at version ", version_, "; step ", step,
        " is far in the future: more than the staleness bound ", staleness_,
        " ahead (pull step ", step, " first)"));
  }
  StepGrads& slot = SlotLocked(step);
  const int n = static_cast<int>(chunks_.size());
  const bool was_complete = slot.chunks_received[rank] == n;
  PushResponse response;
  for (const auto& [c, list] : pieces) {
    const int contributors = static_cast<int>(owners_[c].contributors.size());
    const int k = owners_[c].contributor_of[worker];
    char& received = slot.received[c][rank * contributors + k];
    if (received) {
      response.set_chunks_duplicate(response.chunks_duplicate() + 1);
      ++duplicates_;
      continue;
    }
    received = 1;
    ++slot.parts[c][rank];
    TakePartLocked(&slot, c, rank, list);
    if (slot.parts[c][rank] == contributors) ++slot.chunks_received[rank];
    response.set_chunks_accepted(response.chunks_accepted() + 1);
  }
  if (!was_complete && slot.chunks_received[rank] == n) {
    PushCompletedLocked(rank, step);
  }
  return response;
}

bool ParameterShard::CompleteLocked(int64_t step) const {
  const int n = static_cast<int>(chunks_.size());
  if (n == 0) return true;
  const StepGrads* slot = FindSlotLocked(step);
  if (slot == nullptr) return false;
  for (int r = 0; r < dp_; ++r) {
    if (slot->chunks_received[r] < n) return false;
  }
  return true;
}

std::string ParameterShard::MissingRanksLocked(int64_t step,
                                               absl::string_view after) const {
  const int n = static_cast<int>(chunks_.size());
  const StepGrads* slot = FindSlotLocked(step);
  std::vector<int> missing;
  std::vector<std::string> partial;
  for (int r = 0; r < dp_; ++r) {
    const int got = slot == nullptr ? 0 : slot->chunks_received[r];
    if (got < n) missing.push_back(r);
    if (slot == nullptr || got == n) continue;
    if (pp_ * tp_ == 1) {
      if (got > 0) {
        partial.push_back(
            absl::StrCat("dp rank ", r, " pushed ", got, " of ", n, " chunks"));
      }
      continue;
    }
    // Parts received per contributor; only ranks that pushed something are
    // detailed, and only their incomplete contributors.
    std::vector<int> parts(pp_ * tp_, 0);
    int any = 0;
    for (int c = 0; c < n; ++c) {
      const std::vector<Contributor>& cs = owners_[c].contributors;
      for (size_t k = 0; k < cs.size(); ++k) {
        if (slot->received[c][r * cs.size() + k]) {
          ++parts[cs[k].worker];
          ++any;
        }
      }
    }
    if (any == 0) continue;
    for (int w = 0; w < pp_ * tp_; ++w) {
      if (parts[w] < parts_of_worker_[w]) {
        partial.push_back(absl::StrCat("dp rank ", r, " (pp ", w / tp_,
                                       ", tp ", w % tp_, ") pushed ", parts[w],
                                       " of ", parts_of_worker_[w],
                                       " chunk parts"));
      }
    }
  }
  std::string out = absl::StrCat("no gradients from dp ranks [",
                                 absl::StrJoin(missing, ", "), "]", after);
  if (!partial.empty()) {
    absl::StrAppend(&out, " (", absl::StrJoin(partial, "; "), ")");
  }
  return out;
}

bool ParameterShard::FoldableLocked(const StepGrads& slot, int c,
                                    int rank) const {
  const int k = slot.folded[c];
  if (k == 0) return rank <= 1;
  if (k == 1) return rank == 1 - slot.first_folded[c];
  return rank == k;
}

void ParameterShard::TakePartLocked(StepGrads* slot, int c, int rank,
                                    const std::vector<PushedPiece>& list) {
  std::vector<float>& sum = slot->sum[c];
  if (owners_[c].direct && FoldableLocked(*slot, c, rank)) {
    // The whole chunk, in turn: decoded into (first rank) or added to the
    // sum, with no buffer of its own.
    for (const PushedPiece& p : list) {
      if (slot->folded[c] == 0) {
        DecodeSlice(*p.slice, sum.data() + p.offset);
      } else {
        AccumulateSlice(*p.slice, sum.data() + p.offset);
      }
    }
    if (slot->folded[c]++ == 0) slot->first_folded[c] = rank;
  } else {
    std::vector<float>& held = slot->held[c][rank];
    if (held.empty()) held.resize(chunks_[c].size());
    DecodePart(c, list, slot->parts[c][rank] == 1, held.data());
  }
  FoldHeldLocked(slot, c);
}

void ParameterShard::FoldHeldLocked(StepGrads* slot, int c) {
  const int contributors = static_cast<int>(owners_[c].contributors.size());
  while (slot->folded[c] < dp_) {
    int rank = -1;
    for (int r = 0; r < dp_ && r <= std::max(1, slot->folded[c]); ++r) {
      if (!slot->held[c][r].empty() &&
          slot->parts[c][r] == contributors && FoldableLocked(*slot, c, r)) {
        rank = r;
        break;
      }
    }
    if (rank < 0) return;
    std::vector<float>& held = slot->held[c][rank];
    if (slot->folded[c] == 0) {
      slot->sum[c].swap(held);
      slot->first_folded[c] = rank;
    } else {
      float* acc = slot->sum[c].data();
      const float* g = held.data();
      const int64_t n = chunks_[c].size();
      for (int64_t i = 0; i < n; ++i) acc[i] += g[i];
    }
    std::vector<float>().swap(held);  // freed once folded
    ++slot->folded[c];
  }
}

int64_t ParameterShard::gradient_bytes() const {
  absl::ReaderMutexLock lock(&mu_);
  int64_t floats = 0;
  for (const StepGrads& slot : step_slots_) {
    for (const auto& sum : slot.sum) floats += sum.capacity();
    for (const auto& chunk : slot.held) {
      for (const auto& h : chunk) floats += h.capacity();
    }
  }
  for (const RankGrads& r : rank_grads_) {
    for (const auto& g : r.grads) floats += g.capacity();
  }
  return 4 * floats;
}

void ParameterShard::ReduceLocked(StepGrads* slot) {
  if (slot->reduced) return;
  std::vector<absl::Span<float>> sums;
  for (size_t c = 0; c < chunks_.size(); ++c) {
    sums.push_back(absl::MakeSpan(slot->sum[c].data(), chunks_[c].size()));
  }
  slot->sum_squares = ShardMeanAndSumSquares(static_cast<float>(dp_), sums,
                                             pool_.get());
  slot->reduced = true;
}

absl::StatusOr<double> ParameterShard::GradNorm(int64_t step,
                                                absl::Time deadline) {
  const int shard = options_.shard;
  if (mode_ == ASYNC) return NotInAsync(shard, "GradNorm");
  const absl::Time start = absl::Now();
  const absl::Time until = WaitDeadline(deadline);
  absl::MutexLock lock(&mu_);
  if (step > version_) {
    return absl::FailedPreconditionError(
        absl::StrCat("shard ", shard, " step ", step, ": shard is at version ",
                     version_, "; step ", step, " is far in the future"));
  }
  // A stop (StopAt) at or before `step` ends the wait: a dead replica's
  // gradient will not come, the job restarts from the stop's checkpoint.
  auto stopped = [this, step]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stop_at_ >= 0 && step >= stop_at_ && version_ <= step;
  };
  auto ready = [this, step, &stopped]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return shutdown_ || version_ > step || CompleteLocked(step) || stopped();
  };
  if (!mu_.AwaitWithDeadline(absl::Condition(&ready), until)) {
    const std::string after = absl::StrCat(" after ", Seconds(until - start));
    return absl::DeadlineExceededError(absl::StrCat(
        "shard ", shard, " step ", step, ": ", MissingRanksLocked(step, after)));
  }
  if (shutdown_) {
    return absl::UnavailableError(
        absl::StrCat("parameter server shard ", shard, " is shutting down"));
  }
  if (stopped() && !CompleteLocked(step)) {
    return ResizeStop(absl::StrCat(
        "the job stops at step ", stop_at_,
        " for a resize (elastic data parallelism): shard ", shard,
        " applies no later step; the job restarts from the checkpoint of step ",
        stop_at_));
  }
  if (version_ > step) {
    auto it = applied_sum_squares_.find(step);
    if (it != applied_sum_squares_.end()) return it->second;
    return absl::FailedPreconditionError(
        absl::StrCat("shard ", shard, " step ", step,
                     ": already applied; shard is at "
                     "version ",
                     version_));
  }
  StepGrads* slot = FindSlotLocked(step);
  if (slot == nullptr) return 0.0;  // a shard without chunks
  ReduceLocked(slot);
  return slot->sum_squares;
}

absl::StatusOr<int64_t> ParameterShard::StopAt(int64_t step) {
  absl::MutexLock lock(&mu_);
  if (mode_ == ASYNC) {
    return absl::FailedPreconditionError(
        "StopAt needs step boundaries; ASYNC mode has none");
  }
  if (step < 1 || version_ > step) {
    return WithReason(
        absl::FailedPreconditionError(absl::StrCat(
            "shard ", options_.shard, " is at version ", version_,
            ", past the requested stop step ", step, "; ask for a later one")),
        STOP_STEP_PASSED);
  }
  const bool now = version_ == step && stop_at_ != step;
  stop_at_ = step;
  Log(absl::StrCat("the job stops at step ", step,
                   " (elastic resize); at version ", version_));
  if (now && !options_.checkpoint_dir.empty() && !ShouldCheckpoint(step)) {
    if (absl::Status s = WriteCheckpointLocked(); !s.ok()) return s;
  }
  return version_;
}

absl::StatusOr<int64_t> ParameterShard::Apply(int64_t step,
                                              double global_sum_squares) {
  const int shard = options_.shard;
  if (mode_ == ASYNC) return NotInAsync(shard, "Apply");
  if (!std::isfinite(global_sum_squares) || global_sum_squares < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("apply step ", step,
                     ": global_sum_squares must be finite and >= 0, "
                     "got ",
                     global_sum_squares));
  }
  absl::MutexLock lock(&mu_);
  if (shutdown_) {
    return absl::UnavailableError(
        absl::StrCat("parameter server shard ", shard, " is shutting down"));
  }
  if (step < version_) return version_;  // already applied: idempotent
  if (step > version_) {
    return absl::FailedPreconditionError(
        absl::StrCat("apply step ", step, ": shard ", shard, " is at version ",
                     version_, "; step ", step, " is far in the future"));
  }
  if (!CompleteLocked(step)) {
    return absl::FailedPreconditionError(
        absl::StrCat("apply step ", step, ": shard ", shard, " has ",
                     MissingRanksLocked(step, ""), "; call GradNorm first"));
  }
  StepGrads* slot = FindSlotLocked(step);
  double sum_squares = 0;
  if (slot != nullptr) {
    ReduceLocked(slot);
    sum_squares = slot->sum_squares;
    std::vector<const float*> grads(chunks_.size());
    for (size_t c = 0; c < chunks_.size(); ++c) {
      grads[c] = slot->sum[c].data();
    }
    const OptimizerConfig& opt = options_.spec.optimizer();
    const double lr = LearningRate(opt, step, options_.spec.train().steps());
    const float scale = static_cast<float>(
        ClipScale(opt.grad_clip(), std::sqrt(global_sum_squares)));
    OptimizerStepLocked(grads, scale, lr, step);
    slot->step = -1;  // free for step + s + 1
  }
  applied_sum_squares_[step] = sum_squares;
  while (applied_sum_squares_.size() > static_cast<size_t>(staleness_ + 1)) {
    applied_sum_squares_.erase(applied_sum_squares_.begin());
  }
  version_ = step + 1;
  last_grad_norm_ = std::sqrt(global_sum_squares);
  MaybeLogEndLocked();
  if (ShouldCheckpoint(version_) ||
      (version_ == stop_at_ && !options_.checkpoint_dir.empty())) {
    if (absl::Status s = WriteCheckpointLocked(); !s.ok()) {
      return WithMessage(s, absl::StrCat("shard ", shard, " applied step ",
                                         step, " (now version ", version_,
                                         ") but the checkpoint failed: ",
                                         s.message()));
    }
  }
  return version_;
}

}  // namespace lmps
