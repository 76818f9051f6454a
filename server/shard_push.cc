// ParameterShard::Push: validation of a whole push stream before anything
// changes (compressed slices' encodings too: server/tensor_codec.h), the
// tiling of a contributor's chunk part (pipeline and tensor parallel) and
// decoding into gradient buffers; the mode then takes the
// gradient (shard_step.cc or shard_async.cc).
#include "server/shard.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/wire/chunk_wire.h"
#include "server/shard_internal.h"
#include "server/tensor_codec.h"

namespace lmps {

using shard_internal::ChunkName;

// ---------------------------------------------------------------------------
// Push.
// ---------------------------------------------------------------------------

absl::StatusOr<PushResponse> ParameterShard::Push(
    const std::vector<PushRequest>& stream) {
  std::vector<PushRequestView> views;
  views.reserve(stream.size());
  for (const PushRequest& r : stream) views.push_back(ViewOf(r));
  return Push(views);
}

absl::StatusOr<PushResponse> ParameterShard::Push(
    const std::vector<PushRequestView>& stream) {
  const int shard = options_.shard;
  if (stream.empty()) {
    return absl::InvalidArgumentError("empty push stream");
  }
  const PushHeader& head = stream.front().header;
  const int rank = head.dp_rank;
  const int64_t step = head.step;
  const int pp_rank = head.pp_rank, tp_rank = head.tp_rank;
  for (size_t m = 1; m < stream.size(); ++m) {
    const PushHeader& r = stream[m].header;
    if (r.dp_rank != rank || r.step != step ||
        r.partition_version != head.partition_version ||
        r.pp_rank != pp_rank || r.tp_rank != tp_rank) {
      const bool ranks =
          pp_ * tp_ > 1 || r.pp_rank != pp_rank || r.tp_rank != tp_rank;
      return absl::InvalidArgumentError(absl::StrCat(
          "push message ", m, " has dp_rank ", r.dp_rank,
          ranks ? absl::StrCat(" pp_rank ", r.pp_rank, " tp_rank ", r.tp_rank)
                : "",
          " step ", r.step, " partition_version ", r.partition_version,
          " but the stream started with dp_rank ", rank,
          ranks ? absl::StrCat(" pp_rank ", pp_rank, " tp_rank ", tp_rank)
                : "",
          " step ", step, " partition_version ", head.partition_version));
    }
  }
  if (head.partition_version != options_.map.version()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "push partition_version ", head.partition_version,
        " does not match shard ", shard, "'s ", options_.map.version(),
        " (the worker and the servers disagree on model or layout)"));
  }
  if (rank < 0 || rank >= dp_) {
    return absl::InvalidArgumentError(
        absl::StrCat("push dp_rank ", rank, " is out of range [0, ", dp_, ")"));
  }
  if (pp_rank < 0 || pp_rank >= pp_ || tp_rank < 0 || tp_rank >= tp_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push pp_rank ", pp_rank, " tp_rank ", tp_rank,
        " is out of range: the layout has pp=", pp_, " tp=", tp_));
  }
  // A step of the job: the clocks count steps, so a step past the job's
  // end (INT64_MAX once overflowed one) is a bad request in every mode.
  const int64_t steps = options_.spec.train().steps();
  if (step < 0 || step >= steps) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push step ", step, " is outside the job's steps [0, ", steps, ")"));
  }
  const int worker = pp_rank * tp_ + tp_rank;
  const std::string contributor = absl::StrCat(
      "(dp rank ", rank, ", pp ", pp_rank, ", tp ", tp_rank, ")");
  const std::string who =
      pp_ * tp_ > 1
          ? absl::StrCat("push from ", contributor, " for step ", step)
          : absl::StrCat("push from dp rank ", rank, " for step ", step);

  // Static validation: every slice names a chunk of this shard, a valid
  // dtype and an in-range element span; the slices of every chunk tile the
  // pusher's part of it exactly once.
  PushedPieces pieces;
  for (size_t m = 0; m < stream.size(); ++m) {
    for (const ChunkSliceView& s : stream[m].slices) {
      // The encoding (dtype, sparse indices, INT8 scale): how many of the
      // chunk's elements the slice covers.
      absl::StatusOr<int64_t> covered = SliceElements(s);
      if (!covered.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(who, ": ", ChunkName(s.tensor, s.chunk), " ",
                         covered.status().message()));
      }
      absl::Status form = SliceMatchesCompression(
          s, options_.spec.train().compression().kind());
      if (!form.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": ", ChunkName(s.tensor, s.chunk), " ", form.message()));
      }
      const int c = FindChunk(s.tensor, s.chunk);
      if (c < 0) {
        if (tensor_index_.count(s.tensor) == 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(who, ": unknown tensor '", s.tensor, "'"));
        }
        auto owner = chunk_owner_.find({s.tensor, s.chunk});
        if (owner == chunk_owner_.end()) {
          return absl::InvalidArgumentError(absl::StrCat(
              who, ": ", ChunkName(s.tensor, s.chunk), " does not exist"));
        }
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": ", ChunkName(s.tensor, s.chunk), " is held by shard ",
            owner->second, ", not shard ", shard));
      }
      const int64_t n = *covered;
      pieces[c].push_back({s.offset, n, &s});
    }
  }
  const std::vector<int64_t>& sizes = chunk_sizes_;
  for (auto& [c, list] : pieces) {
    const ChunkSliceView& any = *list.front().slice;
    const std::string name = ChunkName(any.tensor, any.chunk);
    const int k = owners_[c].contributor_of[worker];
    if (k < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("push for step ", step, ": ", contributor,
                       " owns no part of ", name,
                       " (common/model/parallel_layout.h)"));
    }
    for (const PushedPiece& p : list) {
      if (p.offset < 0 || p.offset > sizes[c] - p.n) {
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": ", name, " slice of ", p.n, " elements at offset ", p.offset,
            " is outside the chunk's ", sizes[c], " elements"));
      }
    }
    std::sort(list.begin(), list.end(), [](const PushedPiece& a, const PushedPiece& b) {
      return a.offset < b.offset;
    });
    if (std::string error = TilingError(c, k, list); !error.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": ", name, " ", error));
    }
  }
  for (auto& [c, list] : pieces) {
    for (const PushedPiece& p : list) {
      const int64_t bad = FirstNonFiniteElement(*p.slice);
      if (bad >= 0) {
        absl::MutexLock lock(&mu_);
        ++rejected_nonfinite_;
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": non-finite gradient (NaN or Inf) in ",
            ChunkName(p.slice->tensor, p.slice->chunk), " element ",
            p.offset + bad, "; push rejected, nothing applied"));
      }
    }
  }

  absl::MutexLock lock(&mu_);
  if (shutdown_) {
    return absl::UnavailableError(
        absl::StrCat("parameter server shard ", shard, " is shutting down"));
  }
  if (mode_ == ASYNC) return PushAsyncLocked(rank, worker, step, pieces, who);
  return PushStepLocked(rank, worker, step, pieces, who);
}

namespace {

// "[0, 4), [8, 12), ... (9 ranges)": at most three ranges.
template <typename Range>
std::string RangesText(const std::vector<Range>& ranges) {
  std::vector<std::string> parts;
  for (size_t i = 0; i < ranges.size() && i < 3; ++i) {
    parts.push_back(
        absl::StrCat("[", ranges[i].begin, ", ", ranges[i].end, ")"));
  }
  std::string out = absl::StrJoin(parts, ", ");
  if (ranges.size() > 3) {
    absl::StrAppend(&out, ", ... (", ranges.size(), " ranges)");
  }
  return out;
}

}  // namespace

std::string ParameterShard::TilingError(int c, int k,
                                        const std::vector<PushedPiece>& list) const {
  const int64_t size = chunk_sizes_[c];
  const std::vector<OffsetRange>& runs = owners_[c].contributors[k].ranges;
  // Owning the whole chunk (always so with pp = tp = 1): the messages of a
  // whole-chunk push.
  const bool whole = runs.size() == 1 && runs[0].begin == 0 &&
                     runs[0].end == size;
  auto missing = [&](int64_t a, int64_t b) {
    if (whole) {
      return absl::StrCat(
          "is not covered exactly once: missing elements from ", a);
    }
    return absl::StrCat("misses elements [", a, ", ", b,
                        ") of its part (elements ", RangesText(runs), ")");
  };
  auto extra = [&](int64_t a, int64_t b) {
    return absl::StrCat("has elements [", a, ", ", b,
                        ") outside its part (elements ", RangesText(runs),
                        ")");
  };
  int64_t next = 0;  // end of the elements covered so far
  size_t j = 0;      // first run that may hold elements >= next
  for (const PushedPiece& p : list) {
    if (p.n == 0) continue;
    if (p.offset < next) {
      return absl::StrCat(
          "is not covered exactly once: overlapping slices at element ",
          p.offset);
    }
    // Nothing of the part may lie in the gap [next, p.offset).
    while (j < runs.size() && runs[j].end <= next) ++j;
    if (j < runs.size() && std::max(runs[j].begin, next) <
                               std::min(runs[j].end, p.offset)) {
      return missing(std::max(runs[j].begin, next),
                     std::min(runs[j].end, p.offset));
    }
    // The piece lies inside one run.
    while (j < runs.size() && runs[j].end <= p.offset) ++j;
    const int64_t end = p.offset + p.n;
    if (j == runs.size() || runs[j].begin > p.offset) {
      return extra(p.offset,
                   j == runs.size() ? end : std::min(end, runs[j].begin));
    }
    if (runs[j].end < end) {
      return extra(runs[j].end, j + 1 == runs.size()
                                    ? end
                                    : std::min(end, runs[j + 1].begin));
    }
    next = end;
  }
  while (j < runs.size() && runs[j].end <= next) ++j;
  if (j < runs.size()) {
    if (whole) {
      return absl::StrCat("covers ", next, " of its ", size,
                          " elements; a push must cover whole chunks");
    }
    return missing(std::max(runs[j].begin, next), runs[j].end);
  }
  return "";
}

void ParameterShard::DecodePart(int c, const std::vector<PushedPiece>& list,
                                bool first, float* dst) const {
  if (owners_[c].direct) {
    for (const PushedPiece& p : list) {
      DecodeSlice(*p.slice, dst + p.offset);
    }
    return;
  }
  // Several contributors: their parts are summed (they overlap only for the
  // tied embedding, pushed by the first and the last stage).
  if (first) std::fill(dst, dst + chunk_sizes_[c], 0.0f);
  std::vector<float> values;
  for (const PushedPiece& p : list) {
    values.resize(p.n);
    DecodeSlice(*p.slice, values.data());
    float* out = dst + p.offset;
    for (int64_t i = 0; i < p.n; ++i) out[i] += values[i];
  }
}

}  // namespace lmps
