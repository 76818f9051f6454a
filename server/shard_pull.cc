// ParameterShard reads: Pull (the mode's read rule, then the parameters in
// messages of bounded size, whole chunks or a worker's held part) and
// TensorInfo.
#include "server/shard.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/shm/payloads.h"
#include "common/shm/shared_region.h"
#include "common/wire/chunk_wire.h"
#include "server/shard_internal.h"
#include "server/tensor_codec.h"

namespace lmps {

using shard_internal::ResizeStop;
using shard_internal::Seconds;

// ---------------------------------------------------------------------------
// Pull and TensorInfo.
// ---------------------------------------------------------------------------

absl::StatusOr<std::vector<PullResponse>> ParameterShard::Pull(
    const PullRequest& request, absl::Time deadline) {
  absl::StatusOr<PullPlan> plan = StartPull(request, deadline);
  if (!plan.ok()) return plan.status();
  std::vector<PullResponse> out(plan->messages.size());
  for (size_t i = 0; i < out.size(); ++i) {
    grpc::ByteBuffer message;
    if (absl::Status s = EncodePull(*plan, i, &message); !s.ok()) return s;
    if (absl::Status s = ParseProto(message, &out[i]); !s.ok()) return s;
  }
  return out;
}

absl::StatusOr<ParameterShard::PullPlan> ParameterShard::StartPull(
    const PullRequest& request, absl::Time deadline) {
  const int shard = options_.shard;
  const DType dtype = request.dtype() == BF16 ? BF16 : F32;
  if (DTypeSize(request.dtype()) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pull dtype ", static_cast<int>(request.dtype()),
                     " is not valid; valid: F32, BF16"));
  }
  if (request.partition_version() != 0 &&
      request.partition_version() != options_.map.version()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "pull partition_version ", request.partition_version(),
        " does not match shard ", shard, "'s ", options_.map.version(),
        " (the worker and the servers disagree on model or layout)"));
  }
  if (request.step() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pull step must be >= 0, got ", request.step()));
  }
  for (const std::string& t : request.tensors()) {
    if (tensor_index_.count(t) == 0) {
      return absl::NotFoundError(absl::StrCat("unknown tensor '", t, "'"));
    }
  }
  const bool owned_only = request.owned_only();
  const int pp_rank = request.pp_rank(), tp_rank = request.tp_rank();
  if (owned_only &&
      (pp_rank < 0 || pp_rank >= pp_ || tp_rank < 0 || tp_rank >= tp_)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pull pp_rank ", pp_rank, " tp_rank ", tp_rank,
        " is out of range: the layout has pp=", pp_, " tp=", tp_));
  }
  const int worker = pp_rank * tp_ + tp_rank;
  const bool all = request.tensors().empty();
  std::set<std::string> wanted(request.tensors().begin(),
                               request.tensors().end());
  const bool with_state = request.with_optimizer_state();
  if (with_state && dtype != F32) {
    return absl::InvalidArgumentError(
        "a pull with_optimizer_state must ask for dtype F32 (the state is "
        "fp32)");
  }
  const int streams = std::max(1, request.streams());
  if (request.streams() < 0 || request.streams() > 64 ||
      request.stream() < 0 || request.stream() >= streams) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pull stream ", request.stream(), " of ", request.streams(),
        " is out of range (streams at most 64, 0 <= stream < streams)"));
  }
  const int64_t step = request.step();
  const absl::Time start = absl::Now();
  const absl::Time until = WaitDeadline(deadline);

  // The read rule of the mode (docs/parameter-shard.md).
  const int64_t need = mode_ == ASYNC ? step : step - staleness_;

  // Shared: pulls of several workers copy the parameters in parallel.
  absl::ReaderMutexLock lock(&mu_);
  auto stopped = [this, step]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return stop_at_ >= 0 && step >= stop_at_;
  };
  auto ready = [this, need, &stopped]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    return shutdown_ || version_ >= need || stopped();
  };
  if (!mu_.AwaitWithDeadline(absl::Condition(&ready), until)) {
    std::string why;
    if (mode_ == ASYNC) {
      why = "; in ASYNC the version counts applied pushes";
    } else if (const std::string slow = SlowRanksLocked(need); !slow.empty()) {
      why = absl::StrCat(": ", slow);
    } else {
      why = absl::StrCat(", waiting for the apply of step ", version_);
    }
    return absl::DeadlineExceededError(absl::StrCat(
        "shard ", shard, " step ", step, ": version ", need,
        staleness_ > 0
            ? absl::StrCat(" (step ", step, " - staleness bound ", staleness_,
                           ")")
            : "",
        " not reached after ", Seconds(until - start), " (at version ",
        version_, ")", why));
  }
  if (shutdown_) {
    return absl::UnavailableError(
        absl::StrCat("parameter server shard ", shard, " is shutting down"));
  }
  if (stopped()) {
    return PullStoppedLocked();
  }
  const int64_t budget = options_.spec.max_message_bytes();
  // Bytes per element: the parameter and, if asked, each state buffer.
  const int elem =
      DTypeSize(dtype) *
      (1 + (with_state ? static_cast<int>(chunks_.empty()
                                               ? 0
                                               : chunks_[0].state.size())
                       : 0));
  PullPlan plan;
  plan.version = version_;
  plan.step = step;
  plan.dtype = dtype;
  plan.with_state = with_state;
  plan.messages.emplace_back();
  int64_t payload = 0;
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const Chunk& c = chunks_[i];
    if (!all && wanted.count(c.desc.tensor()) == 0) continue;
    // The whole chunk, or the part of it the worker holds.
    const std::vector<OffsetRange> whole = {{0, c.size()}};
    for (const OffsetRange& r : owned_only ? owners_[i].held[worker] : whole) {
      int64_t offset = r.begin;
      while (offset < r.end) {
        if (budget - payload < elem) {
          plan.messages.emplace_back();
          payload = 0;
        }
        const int64_t n = std::min(r.end - offset, (budget - payload) / elem);
        plan.messages.back().push_back(
            {static_cast<int>(i), offset, offset + n});
        payload += n * elem;
        offset += n;
      }
    }
  }
  if (streams > 1) {
    // This stream's share: messages stream, stream + streams, ...
    std::vector<std::vector<PullPiece>> mine;
    for (size_t m = request.stream(); m < plan.messages.size(); m += streams) {
      mine.push_back(std::move(plan.messages[m]));
    }
    if (mine.empty()) mine.emplace_back();
    plan.messages = std::move(mine);
  }
  return plan;
}

absl::Status ParameterShard::PullStoppedLocked() const {
  return ResizeStop(absl::StrCat(
      "the job stops at step ", stop_at_,
      " for a resize (elastic data parallelism): shard ", options_.shard,
      " serves no later step; the job restarts from the checkpoint of step ",
      stop_at_));
}

absl::Status ParameterShard::FitSharedWindow(int32_t first, char* shm,
                                             int64_t shm_offset,
                                             int64_t window_bytes,
                                             PullPlan* plan) {
  const int32_t n = static_cast<int32_t>(plan->messages.size());
  if (first < 0 || first >= n) {
    return absl::InvalidArgumentError(
        absl::StrCat("pull first_message ", first, " is outside the pull's ",
                     n, " messages"));
  }
  const int elem = DTypeSize(plan->dtype);
  std::vector<PullPiece> fitted;
  int64_t used = 0;
  int32_t m = first;
  for (; m < n; ++m) {
    int64_t bytes = 0;
    for (const PullPiece& p : plan->messages[m]) {
      bytes += SharedPayloadSpan((p.end - p.begin) * elem);
    }
    if (used + bytes > window_bytes) break;
    used += bytes;
    fitted.insert(fitted.end(), plan->messages[m].begin(),
                  plan->messages[m].end());
  }
  if (m == first) {
    return SharedMemoryRefusal(absl::StrCat(
        "a window of ", window_bytes,
        " bytes does not hold message ", first,
        " of the pull (the worker's max_push_stream_bytes is below the "
        "shard's max_message_bytes?)"));
  }
  plan->messages.assign(1, std::move(fitted));
  plan->shm = shm;
  plan->shm_offset = shm_offset;
  plan->next_message = m < n ? m : 0;
  return absl::OkStatus();
}

absl::Status ParameterShard::EncodePull(const PullPlan& plan, size_t i,
                                        grpc::ByteBuffer* out) const {
  std::vector<ChunkSliceOut> slices;
  int64_t shm_at = plan.shm_offset;
  {
    absl::ReaderMutexLock lock(&mu_);
    if (shutdown_) {
      return absl::UnavailableError(absl::StrCat(
          "parameter server shard ", options_.shard, " is shutting down"));
    }
    if (stop_at_ >= 0 && plan.step >= stop_at_) {
      return PullStoppedLocked();
    }
    const int elem = DTypeSize(plan.dtype);
    for (const PullPiece& p : plan.messages[i]) {
      const Chunk& c = chunks_[p.chunk];
      const int64_t n = p.end - p.begin;
      ChunkSliceOut& s = slices.emplace_back();
      s.tensor = c.desc.tensor();
      s.chunk = c.desc.index();
      s.offset = p.begin;
      s.dtype = plan.dtype;
      if (plan.shm != nullptr) {
        // Into the worker's shared memory, which the slice names.
        s.shm_offset = shm_at;
        s.shm_bytes = n * elem;
        EncodePayloadTo(plan.dtype, c.params.data() + p.begin, n,
                        plan.shm + shm_at);
        shm_at += SharedPayloadSpan(n * elem);
        continue;
      }
      // Encoded once, straight from the parameters into the slice gRPC
      // sends (common/wire/chunk_wire.h).
      s.data = NewPayloadSlice(n * elem);
      EncodePayloadTo(plan.dtype, c.params.data() + p.begin, n,
                      MutableBytes(&s.data));
      if (plan.with_state) {
        for (const std::vector<float>& buffer : c.state) {
          grpc::Slice& state = s.state.emplace_back(NewPayloadSlice(n * 4));
          EncodePayloadTo(F32, buffer.data() + p.begin, n,
                          MutableBytes(&state));
        }
      }
    }
  }
  *out = SerializePullResponse(plan.version, slices, plan.next_message);
  return absl::OkStatus();
}

absl::StatusOr<TensorInfoResponse> ParameterShard::TensorInfo(
    const std::string& tensor) const {
  if (!tensor.empty() && tensor_index_.count(tensor) == 0) {
    return absl::NotFoundError(absl::StrCat("unknown tensor '", tensor, "'"));
  }
  absl::ReaderMutexLock lock(&mu_);
  TensorInfoResponse out;
  out.set_shard(options_.shard);
  out.set_version(version_);
  out.set_rejected_nonfinite_pushes(rejected_nonfinite_);
  for (int64_t c : clocks_) out.add_replica_clocks(c);
  for (const TensorSpec& spec : tensors_) {
    if (!tensor.empty() && spec.name != tensor) continue;
    lmps::TensorInfo info;
    info.set_name(spec.name);
    for (int64_t d : spec.shape) info.add_shape(d);
    info.set_weight_decay(spec.weight_decay);
    double sum_squares = 0;
    for (const Chunk& c : chunks_) {
      if (c.desc.tensor() != spec.name) continue;
      *info.add_chunks() = c.desc;
      for (float v : c.params) sum_squares += static_cast<double>(v) * v;
    }
    if (tensor.empty() && info.chunks_size() == 0) continue;
    info.set_l2_norm(std::sqrt(sum_squares));
    *out.add_tensors() = std::move(info);
  }
  return out;
}

}  // namespace lmps
