// ParameterShard in ASYNC: a rank's push is applied as one update as soon
// as its gradient has every chunk of this shard.
#include "server/shard.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "server/optimizer.h"

namespace lmps {

// ---------------------------------------------------------------------------
// ASYNC: every complete push is an update.
// ---------------------------------------------------------------------------

absl::StatusOr<PushResponse> ParameterShard::PushAsyncLocked(
    int rank, int worker, int64_t step, const PushedPieces& pieces,
    const std::string& who) {
  const int shard = options_.shard;
  if (step < clocks_[rank]) {
    // Each rank's steps arrive in order, so the rank's whole gradient for
    // this step arrived and was applied: a retry (a replacement redoing its
    // predecessor's half-pushed step). Acknowledged, nothing changes.
    PushResponse response;
    response.set_chunks_duplicate(static_cast<int>(pieces.size()));
    duplicates_ += static_cast<int64_t>(pieces.size());
    return response;
  }
  RankGrads& pending = rank_grads_[rank];
  const int n = static_cast<int>(chunks_.size());
  if (pending.parts_received > 0 && pending.step != step) {
    return absl::FailedPreconditionError(absl::StrCat(
        who, ": dp rank ", rank, "'s push of step ", pending.step,
        " is incomplete on shard ", shard, " (", pending.chunks_received,
        " of ", n, " chunks); finish it before pushing step ", step));
  }
  if (pending.grads.empty()) {
    pending.grads.resize(chunks_.size());
    for (size_t c = 0; c < chunks_.size(); ++c) {
      pending.grads[c].assign(chunks_[c].size(), 0.0f);
    }
    pending.received.resize(chunks_.size());
    for (size_t c = 0; c < chunks_.size(); ++c) {
      pending.received[c].assign(owners_[c].contributors.size(), 0);
    }
    pending.parts.assign(chunks_.size(), 0);
  }
  pending.step = step;
  PushResponse response;
  for (const auto& [c, list] : pieces) {
    char& received = pending.received[c][owners_[c].contributor_of[worker]];
    if (received) {
      response.set_chunks_duplicate(response.chunks_duplicate() + 1);
      ++duplicates_;
      continue;
    }
    DecodePart(c, list, pending.parts[c] == 0, pending.grads[c].data());
    received = 1;
    ++pending.parts_received;
    if (++pending.parts[c] ==
        static_cast<int>(owners_[c].contributors.size())) {
      ++pending.chunks_received;
    }
    response.set_chunks_accepted(response.chunks_accepted() + 1);
  }
  if (pending.chunks_received == n) {
    if (absl::Status s = ApplyAsyncLocked(rank); !s.ok()) return s;
  }
  return response;
}

absl::Status ParameterShard::ApplyAsyncLocked(int rank) {
  RankGrads& pending = rank_grads_[rank];
  const int64_t step = pending.step;
  const int64_t slowest_before = MinClockLocked();
  double sum_squares = 0;
  std::vector<const float*> grads(chunks_.size());
  for (size_t c = 0; c < chunks_.size(); ++c) {
    grads[c] = pending.grads[c].data();
    for (float g : pending.grads[c]) {
      sum_squares += static_cast<double>(g) * g;
    }
  }
  const OptimizerConfig& opt = options_.spec.optimizer();
  // This shard's share of the clip threshold (docs/parameter-shard.md).
  const double clip = opt.grad_clip() > 0
                          ? opt.grad_clip() * async_clip_fraction_
                          : opt.grad_clip();
  const float scale =
      static_cast<float>(ClipScale(clip, std::sqrt(sum_squares)));
  const double lr = LearningRate(opt, step, options_.spec.train().steps());
  OptimizerStepLocked(grads, scale, lr, version_);
  ++version_;
  last_grad_norm_ = std::sqrt(sum_squares);
  for (auto& r : pending.received) std::fill(r.begin(), r.end(), 0);
  std::fill(pending.parts.begin(), pending.parts.end(), 0);
  pending.parts_received = 0;
  pending.chunks_received = 0;
  pending.step = -1;
  PushCompletedLocked(rank, step);
  MaybeLogEndLocked();
  const int64_t slowest = MinClockLocked();
  if (slowest > slowest_before && ShouldCheckpoint(slowest)) {
    if (absl::Status s = WriteCheckpointLocked(); !s.ok()) {
      return absl::Status(
          s.code(),
          absl::StrCat("shard ", options_.shard, " applied dp rank ", rank,
                       "'s step ", step, " (now version ", version_,
                       ") but the checkpoint of step ", slowest,
                       " failed: ", s.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace lmps
