#include "server/shard.h"

#include <algorithm>
#include <cmath>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/init.h"
#include "common/job_spec.h"
#include "common/parallel_layout.h"
#include "common/partition.h"
#include "common/safetensors.h"
#include "common/status_util.h"
#include "server/optimizer.h"
#include "server/reshard.h"
#include "server/tensor_codec.h"

namespace lmps {
namespace {

std::string ChunkName(const std::string& tensor, int index) {
  return absl::StrCat("tensor '", tensor, "' chunk ", index);
}

// A call refused because the job stops for an elastic resize.
absl::Status ResizeStop(const std::string& message) {
  return WithReason(absl::AbortedError(message), STOPPED_FOR_RESIZE);
}

std::string Shape(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string Seconds(absl::Duration d) {
  return absl::FormatDuration(absl::Trunc(d, absl::Milliseconds(1)));
}

}  // namespace

ParameterShard::ParameterShard(ShardOptions options)
    : options_(std::move(options)) {}

ParameterShard::~ParameterShard() { Shutdown(); }

absl::StatusOr<std::unique_ptr<ParameterShard>> ParameterShard::Create(
    ShardOptions options) {
  if (absl::Status s = ValidateJobSpec(options.spec); !s.ok()) return s;
  const int num_shards = options.spec.layout().num_shards();
  if (options.shard < 0 || options.shard >= num_shards) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard ", options.shard, " is out of range: the job has ",
                     num_shards, " shards"));
  }
  if (options.start_step < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("start_step must be >= 0, got ", options.start_step));
  }
  absl::StatusOr<PartitionMap> expected = ComputePartition(
      options.spec.model(), num_shards, options.spec.max_chunk_bytes());
  if (!expected.ok()) return expected.status();
  if (options.map.version() != expected->version() ||
      options.map.chunks_size() != expected->chunks_size()) {
    return absl::FailedPreconditionError(
        absl::StrCat("partition map version ", options.map.version(),
                     " does not match the job spec's (", expected->version(),
                     "): model, num_shards or max_chunk_bytes differ"));
  }
  if (options.wait_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("wait_timeout must be positive");
  }
  std::unique_ptr<ParameterShard> shard(new ParameterShard(std::move(options)));
  if (absl::Status s = shard->Init(); !s.ok()) return s;
  return shard;
}

absl::Status ParameterShard::Init() {
  dp_ = options_.spec.layout().dp();
  const TrainConfig& train = options_.spec.train();
  mode_ = train.mode();
  staleness_ = EffectiveStaleness(options_.spec);
  end_step_ = train.steps();
  if (train.stop_after_step() > 0 && train.stop_after_step() < end_step_) {
    end_step_ = train.stop_after_step();
  }
  tensors_ = GptTensorSpecs(options_.spec.model());
  for (size_t i = 0; i < tensors_.size(); ++i) {
    tensor_index_[tensors_[i].name] = static_cast<int>(i);
    model_elements_ += tensors_[i].num_elements();
  }
  const int buffers = OptimizerStateBuffers(options_.spec.optimizer().type());
  absl::MutexLock lock(&mu_);
  for (const ChunkDesc& desc : options_.map.chunks()) {
    chunk_owner_[{desc.tensor(), desc.index()}] = desc.shard();
    if (desc.shard() != options_.shard) continue;
    auto it = tensor_index_.find(desc.tensor());
    if (it == tensor_index_.end() || desc.begin() < 0 ||
        desc.end() <= desc.begin() ||
        desc.end() > tensors_[it->second].num_elements()) {
      return absl::InvalidArgumentError(
          absl::StrCat("partition map: bad chunk ", desc.ShortDebugString()));
    }
    chunk_index_[{desc.tensor(), desc.index()}] =
        static_cast<int>(chunks_.size());
    Chunk c;
    c.desc = desc;
    c.tensor = &tensors_[it->second];
    c.params.assign(c.size(), 0.0f);
    c.state.assign(buffers, std::vector<float>(c.size(), 0.0f));
    num_elements_ += c.size();
    chunk_sizes_.push_back(c.size());
    chunks_.push_back(std::move(c));
  }
  if (absl::Status s = InitOwners(); !s.ok()) return s;
  async_clip_fraction_ =
      model_elements_ > 0 ? std::sqrt(static_cast<double>(num_elements_) /
                                      static_cast<double>(model_elements_))
                          : 1.0;
  if (mode_ == ASYNC) {
    rank_grads_.resize(dp_);
  } else {
    step_slots_.resize(staleness_ + 1);
  }
  version_ = options_.start_step;
  clocks_.assign(dp_, options_.start_step);
  if (options_.start_step > 0) return InitFromCheckpoint();
  if (!options_.init_from_safetensors.empty()) return InitFromSafetensors();
  for (Chunk& c : chunks_) {
    InitTensorRange(*c.tensor, options_.spec.train().seed(), c.desc.begin(),
                    c.desc.end(), c.params.data());
  }
  return absl::OkStatus();
}

absl::Status ParameterShard::InitOwners() {
  absl::StatusOr<ParallelLayout> layout =
      ParallelLayout::Create(options_.spec.model(), options_.spec.layout());
  if (!layout.ok()) return layout.status();
  pp_ = layout->pp();
  tp_ = layout->tp();
  const int workers = pp_ * tp_;
  parts_of_worker_.assign(workers, 0);
  // Sorted tensor ranges clipped to [begin, end), in chunk offsets, with
  // adjacent ranges merged.
  auto clip = [](const auto& ranges, int64_t begin, int64_t end) {
    std::vector<OffsetRange> out;
    for (const auto& r : ranges) {
      const int64_t b = std::max<int64_t>(r.begin, begin);
      const int64_t e = std::min<int64_t>(r.end, end);
      if (b >= e) continue;
      if (!out.empty() && out.back().end == b - begin) {
        out.back().end = e - begin;
      } else {
        out.push_back({b - begin, e - begin});
      }
    }
    return out;
  };
  owners_.clear();
  for (const Chunk& c : chunks_) {
    const int t = tensor_index_.at(c.desc.tensor());
    ChunkOwners o;
    o.contributor_of.assign(workers, -1);
    o.held.resize(workers);
    for (int w = 0; w < workers; ++w) {
      const int pp_rank = w / tp_, tp_rank = w % tp_;
      o.held[w] = clip(layout->Held(t, pp_rank, tp_rank), c.desc.begin(),
                       c.desc.end());
      std::vector<OffsetRange> pushed = clip(
          layout->Pushed(t, pp_rank, tp_rank), c.desc.begin(), c.desc.end());
      if (pushed.empty()) continue;
      o.contributor_of[w] = static_cast<int>(o.contributors.size());
      o.contributors.push_back({w, std::move(pushed)});
      ++parts_of_worker_[w];
    }
    if (o.contributors.empty()) {
      return absl::InternalError(
          absl::StrCat("layout pp=", pp_, " tp=", tp_, ": no worker pushes ",
                       ChunkName(c.desc.tensor(), c.desc.index())));
    }
    const std::vector<OffsetRange>& first = o.contributors[0].ranges;
    o.direct = o.contributors.size() == 1 && first.size() == 1 &&
               first[0].begin == 0 && first[0].end == c.size();
    owners_.push_back(std::move(o));
  }
  return absl::OkStatus();
}

absl::Status ParameterShard::InitFromCheckpoint() {
  const int64_t step = options_.start_step;
  if (options_.checkpoint_dir.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("shard ", options_.shard, ": resuming from step ", step,
                     " needs a checkpoint directory"));
  }
  const std::string path =
      CheckpointPath(options_.checkpoint_dir, step, options_.shard);
  // Written under another layout (num_shards, max_chunk_bytes), or no file
  // of this shard: build the chunks from the old layout's shard files.
  if (CheckpointNeedsReshard(path, options_.map)) {
    decltype(ReshardRequest::ranges) ranges(chunks_.size());
    for (size_t i = 0; i < chunks_.size(); ++i) {
      ranges[i].tensor = chunks_[i].desc.tensor();
      ranges[i].begin = chunks_[i].desc.begin();
      ranges[i].end = chunks_[i].desc.end();
    }
    absl::StatusOr<std::vector<RangeData>> data =
        LoadShardRanges(options_.checkpoint_dir, step, options_.spec,
                        std::move(ranges), options_.shard, options_.log);
    if (!data.ok()) return data.status();
    for (size_t i = 0; i < chunks_.size(); ++i) {
      chunks_[i].params = std::move((*data)[i].params);
      chunks_[i].state = std::move((*data)[i].state);
    }
    return absl::OkStatus();
  }
  absl::StatusOr<ShardCheckpoint> ckpt = ReadShardCheckpoint(path);
  if (!ckpt.ok()) {
    return absl::Status(
        ckpt.status().code(),
        absl::StrCat("shard ", options_.shard, ": cannot resume from step ",
                     step, ": ", ckpt.status().message()));
  }
  const CheckpointHeader& h = ckpt->header;
  auto mismatch = [&](const std::string& what) {
    return absl::FailedPreconditionError(
        absl::StrCat("checkpoint ", path, " does not fit this job: ", what));
  };
  if (h.step != step || h.shard != options_.shard) {
    return mismatch(
        absl::StrCat("it holds step ", h.step, " of shard ", h.shard));
  }
  if (h.partition_version != options_.map.version() ||
      h.num_shards != options_.spec.layout().num_shards()) {
    return mismatch(absl::StrCat(
        "it was written with partition version ", h.partition_version, " (",
        h.num_shards, " shards), the job has ", options_.map.version(), " (",
        options_.spec.layout().num_shards(),
        " shards): model, num_shards or max_chunk_bytes changed"));
  }
  const OptimizerType type = options_.spec.optimizer().type();
  if (h.state_buffers != OptimizerStateBuffers(type) ||
      OptimizerStateBuffers(h.optimizer) != OptimizerStateBuffers(type)) {
    return mismatch(absl::StrCat("it holds state of optimizer ",
                                 OptimizerType_Name(h.optimizer),
                                 ", the job uses ", OptimizerType_Name(type)));
  }
  if (ckpt->chunks.size() != chunks_.size()) {
    return mismatch(absl::StrCat("it has ", ckpt->chunks.size(),
                                 " chunks, the shard owns ", chunks_.size()));
  }
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const ChunkDesc& want = chunks_[i].desc;
    ChunkData& got = ckpt->chunks[i];
    if (got.desc.tensor() != want.tensor() ||
        got.desc.index() != want.index() || got.desc.begin() != want.begin() ||
        got.desc.end() != want.end()) {
      return mismatch(absl::StrCat("chunk ", i, " is ",
                                   got.desc.ShortDebugString(), ", expected ",
                                   want.ShortDebugString()));
    }
    chunks_[i].params = std::move(got.params);
    chunks_[i].state = std::move(got.state);
  }
  Log(absl::StrCat("resumed from checkpoint ", path, " (version ", step, ")"));
  return absl::OkStatus();
}

absl::Status ParameterShard::InitFromSafetensors() {
  const std::string& path = options_.init_from_safetensors;
  absl::StatusOr<SafetensorsContents> file = ReadSafetensorsFile(path);
  if (!file.ok()) return file.status();
  for (Chunk& c : chunks_) {
    const SafeTensor* t = file->Find(c.desc.tensor());
    if (t == nullptr) {
      return absl::NotFoundError(absl::StrCat(
          "initial weights ", path, " have no tensor '", c.desc.tensor(),
          "' (shape ", Shape(c.tensor->shape), ")"));
    }
    if (t->shape != c.tensor->shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "initial weights ", path, ": tensor '", t->name, "' has shape ",
          Shape(t->shape), ", the model needs ", Shape(c.tensor->shape)));
    }
    const float* src = t->data.data() + c.desc.begin();
    for (int64_t i = 0; i < c.size(); ++i) {
      if (!std::isfinite(src[i])) {
        return absl::InvalidArgumentError(
            absl::StrCat("initial weights ", path, ": tensor '", t->name,
                         "' element ", c.desc.begin() + i, " is not finite"));
      }
    }
    std::copy(src, src + c.size(), c.params.begin());
  }
  Log(absl::StrCat("initial weights from ", path));
  return absl::OkStatus();
}

void ParameterShard::Log(const std::string& line) const {
  if (options_.log) options_.log(line);
}

absl::Time ParameterShard::WaitDeadline(absl::Time deadline) const {
  return std::min(deadline, absl::Now() + options_.wait_timeout);
}

int ParameterShard::FindChunk(const std::string& tensor, int index) const {
  auto it = chunk_index_.find({tensor, index});
  return it == chunk_index_.end() ? -1 : it->second;
}

int64_t ParameterShard::version() const {
  absl::MutexLock lock(&mu_);
  return version_;
}

int64_t ParameterShard::rejected_nonfinite_pushes() const {
  absl::MutexLock lock(&mu_);
  return rejected_nonfinite_;
}

int64_t ParameterShard::duplicate_chunks() const {
  absl::MutexLock lock(&mu_);
  return duplicates_;
}

absl::Status ParameterShard::last_checkpoint_status() const {
  absl::MutexLock lock(&mu_);
  return checkpoint_status_;
}

void ParameterShard::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_ = true;
}

// ---------------------------------------------------------------------------
// Push.
// ---------------------------------------------------------------------------

absl::StatusOr<PushResponse> ParameterShard::Push(
    const std::vector<PushRequest>& stream) {
  const int shard = options_.shard;
  if (stream.empty()) {
    return absl::InvalidArgumentError("empty push stream");
  }
  const PushRequest& head = stream.front();
  const int rank = head.dp_rank();
  const int64_t step = head.step();
  const int pp_rank = head.pp_rank(), tp_rank = head.tp_rank();
  for (size_t m = 1; m < stream.size(); ++m) {
    const PushRequest& r = stream[m];
    if (r.dp_rank() != rank || r.step() != step ||
        r.partition_version() != head.partition_version() ||
        r.pp_rank() != pp_rank || r.tp_rank() != tp_rank) {
      const bool ranks = pp_ * tp_ > 1 || r.pp_rank() != pp_rank ||
                         r.tp_rank() != tp_rank;
      return absl::InvalidArgumentError(absl::StrCat(
          "push message ", m, " has dp_rank ", r.dp_rank(),
          ranks ? absl::StrCat(" pp_rank ", r.pp_rank(), " tp_rank ",
                               r.tp_rank())
                : "",
          " step ", r.step(), " partition_version ", r.partition_version(),
          " but the stream started with dp_rank ", rank,
          ranks ? absl::StrCat(" pp_rank ", pp_rank, " tp_rank ", tp_rank)
                : "",
          " step ", step, " partition_version ", head.partition_version()));
    }
  }
  if (head.partition_version() != options_.map.version()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "push partition_version ", head.partition_version(),
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
    for (const ChunkSlice& s : stream[m].slices()) {
      const int size = DTypeSize(s.dtype());
      if (size == 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": ", ChunkName(s.tensor(), s.chunk()), " has dtype ",
            static_cast<int>(s.dtype()), "; valid: F32, BF16"));
      }
      const int c = FindChunk(s.tensor(), s.chunk());
      if (c < 0) {
        if (tensor_index_.count(s.tensor()) == 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(who, ": unknown tensor '", s.tensor(), "'"));
        }
        auto owner = chunk_owner_.find({s.tensor(), s.chunk()});
        if (owner == chunk_owner_.end()) {
          return absl::InvalidArgumentError(absl::StrCat(
              who, ": ", ChunkName(s.tensor(), s.chunk()), " does not exist"));
        }
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": ", ChunkName(s.tensor(), s.chunk()), " is held by shard ",
            owner->second, ", not shard ", shard));
      }
      if (s.data().size() % size != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": ", ChunkName(s.tensor(), s.chunk()), " payload of ",
            s.data().size(), " bytes is not a multiple of ", size, " (",
            DType_Name(s.dtype() == BF16 ? BF16 : F32), ")"));
      }
      const int64_t n = static_cast<int64_t>(s.data().size()) / size;
      pieces[c].push_back({s.offset(), n, &s});
    }
  }
  const std::vector<int64_t>& sizes = chunk_sizes_;
  for (auto& [c, list] : pieces) {
    const ChunkSlice& any = *list.front().slice;
    const std::string name = ChunkName(any.tensor(), any.chunk());
    const int k = owners_[c].contributor_of[worker];
    if (k < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("push for step ", step, ": ", contributor,
                       " owns no part of ", name,
                       " (common/parallel_layout.h)"));
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
      const int64_t bad = FirstNonFinite(p.slice->dtype(), p.slice->data());
      if (bad >= 0) {
        absl::MutexLock lock(&mu_);
        ++rejected_nonfinite_;
        return absl::InvalidArgumentError(absl::StrCat(
            who, ": non-finite gradient (NaN or Inf) in ",
            ChunkName(p.slice->tensor(), p.slice->chunk()), " element ",
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
      DecodePayload(p.slice->dtype(), p.slice->data(), dst + p.offset);
    }
    return;
  }
  // Several contributors: their parts are summed (they overlap only for the
  // tied embedding, pushed by the first and the last stage).
  if (first) std::fill(dst, dst + chunk_sizes_[c], 0.0f);
  std::vector<float> values;
  for (const PushedPiece& p : list) {
    values.resize(p.n);
    DecodePayload(p.slice->dtype(), p.slice->data(), values.data());
    float* out = dst + p.offset;
    for (int64_t i = 0; i < p.n; ++i) out[i] += values[i];
  }
}

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
  if (slot.grads.empty()) {
    slot.grads.resize(chunks_.size());
    slot.received.resize(chunks_.size());
    slot.parts.resize(chunks_.size());
    for (size_t c = 0; c < chunks_.size(); ++c) {
      slot.grads[c].assign(dp_, std::vector<float>(chunks_[c].size(), 0.0f));
      slot.received[c].assign(dp_ * owners_[c].contributors.size(), 0);
      slot.parts[c].assign(dp_, 0);
    }
    slot.chunks_received.assign(dp_, 0);
  } else {
    // The buffers keep the old step's values: a part owning the whole chunk
    // overwrites them, several contributors' parts are summed into a buffer
    // zeroed when the first arrives (DecodePart).
    for (auto& r : slot.received) std::fill(r.begin(), r.end(), 0);
    for (auto& r : slot.parts) std::fill(r.begin(), r.end(), 0);
    std::fill(slot.chunks_received.begin(), slot.chunks_received.end(), 0);
  }
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
    DecodePart(c, list, slot.parts[c][rank] == 0, slot.grads[c][rank].data());
    received = 1;
    if (++slot.parts[c][rank] == contributors) ++slot.chunks_received[rank];
    response.set_chunks_accepted(response.chunks_accepted() + 1);
  }
  if (!was_complete && slot.chunks_received[rank] == n) {
    PushCompletedLocked(rank, step);
  }
  return response;
}

void ParameterShard::PushCompletedLocked(int rank, int64_t step) {
  max_staleness_ = std::max(max_staleness_, step - MinClockLocked());
  if (mode_ == ASYNC) {
    clocks_[rank] = std::max(clocks_[rank], step + 1);
    return;
  }
  // The clock is the first step not completely pushed: pushes of a rank
  // normally arrive in step order, but a retried one may fill a gap.
  const int n = static_cast<int>(chunks_.size());
  while (true) {
    const StepGrads* slot = FindSlotLocked(clocks_[rank]);
    if (slot == nullptr || slot->chunks_received[rank] < n) break;
    ++clocks_[rank];
  }
}

int64_t ParameterShard::MinClockLocked() const {
  return *std::min_element(clocks_.begin(), clocks_.end());
}

int64_t ParameterShard::StepClockLocked() const {
  return mode_ == ASYNC ? MinClockLocked() : version_;
}

std::string ParameterShard::SlowRanksLocked(int64_t needed) const {
  std::vector<std::string> slow;
  for (int r = 0; r < dp_; ++r) {
    if (clocks_[r] < needed) {
      slow.push_back(absl::StrCat("dp rank ", r, " has completed ", clocks_[r],
                                  " of the ", needed, " steps needed"));
    }
  }
  return absl::StrJoin(slow, "; ");
}

void ParameterShard::MaybeLogEndLocked() {
  if (logged_end_ || StepClockLocked() < end_step_) return;
  logged_end_ = true;
  Log(absl::StrCat("every dp replica completed step ", end_step_,
                   " (mode ", ConsistencyMode_Name(mode_),
                   mode_ == BOUNDED_STALENESS
                       ? absl::StrCat(", staleness bound ", staleness_)
                       : "",
                   "): replica clocks [", absl::StrJoin(clocks_, ", "),
                   "], max staleness seen ", max_staleness_, " steps, version ",
                   version_));
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

void ParameterShard::ReduceLocked(StepGrads* slot) {
  if (slot->reduced) return;
  const float dp = static_cast<float>(dp_);
  double sum_squares = 0;
  for (size_t c = 0; c < chunks_.size(); ++c) {
    float* acc = slot->grads[c][0].data();
    const int64_t n = chunks_[c].size();
    for (int r = 1; r < dp_; ++r) {
      const float* g = slot->grads[c][r].data();
      for (int64_t i = 0; i < n; ++i) acc[i] += g[i];
    }
    for (int64_t i = 0; i < n; ++i) {
      acc[i] /= dp;
      sum_squares += static_cast<double>(acc[i]) * acc[i];
    }
  }
  slot->sum_squares = sum_squares;
  slot->reduced = true;
}

namespace {

absl::Status NotInAsync(int shard, absl::string_view what) {
  return absl::FailedPreconditionError(absl::StrCat(
      what, " on shard ", shard,
      ": not used in train.mode ASYNC (pushes are applied as they arrive)"));
}

}  // namespace

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

bool ParameterShard::ShouldCheckpoint(int64_t step) const {
  if (options_.checkpoint_dir.empty()) return false;
  const TrainConfig& t = options_.spec.train();
  if (t.checkpoint_interval() > 0 && step % t.checkpoint_interval() == 0) {
    return true;
  }
  return step == t.steps() ||
         (t.stop_after_step() > 0 && step == t.stop_after_step());
}

void ParameterShard::OptimizerStepLocked(const std::vector<const float*>& grads,
                                         float scale, double lr,
                                         int64_t update) {
  const OptimizerConfig& opt = options_.spec.optimizer();
  for (size_t i = 0; i < chunks_.size(); ++i) {
    Chunk& c = chunks_[i];
    const absl::Span<const float> g(grads[i], c.size());
    // Negative values mean "disabled" (see lmps.proto).
    const double wd =
        c.tensor->weight_decay ? std::max(0.0f, opt.weight_decay()) : 0.0;
    if (opt.type() == SGD) {
      SgdHyper h;
      h.lr = lr;
      h.momentum = std::max(0.0f, opt.momentum());
      h.weight_decay = wd;
      SgdMomentumStep(h, scale, g, absl::MakeSpan(c.params),
                      absl::MakeSpan(c.state[0]));
    } else {
      AdamWHyper h;
      h.lr = lr;
      h.beta1 = opt.beta1();
      h.beta2 = opt.beta2();
      h.eps = opt.eps();
      h.weight_decay = wd;
      h.step = update;
      AdamWStep(h, scale, g, absl::MakeSpan(c.params),
                absl::MakeSpan(c.state[0]), absl::MakeSpan(c.state[1]));
    }
  }
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
      grads[c] = slot->grads[c][0].data();
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

// ---------------------------------------------------------------------------
// Checkpoints.
// ---------------------------------------------------------------------------

absl::Status ParameterShard::WriteCheckpoint() {
  absl::MutexLock lock(&mu_);
  return WriteCheckpointLocked();
}

absl::Status ParameterShard::WriteCheckpointLocked() {
  if (options_.checkpoint_dir.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("shard ", options_.shard, " has no checkpoint directory"));
  }
  const int64_t step = StepClockLocked();
  CheckpointHeader h;
  h.step = step;
  h.shard = options_.shard;
  h.num_shards = options_.spec.layout().num_shards();
  h.partition_version = options_.map.version();
  h.optimizer = options_.spec.optimizer().type();
  h.state_buffers = OptimizerStateBuffers(h.optimizer);
  h.spec = options_.spec;
  std::vector<ChunkView> views;
  views.reserve(chunks_.size());
  for (const Chunk& c : chunks_) {
    ChunkView v;
    v.desc = c.desc;
    v.params = c.params;
    for (const auto& s : c.state) v.state.push_back(s);
    views.push_back(std::move(v));
  }
  const absl::Time start = absl::Now();
  checkpoint_status_ = WriteShardCheckpoint(options_.checkpoint_dir, h, views);
  if (checkpoint_status_.ok()) {
    Log(absl::StrCat(
        "wrote checkpoint ",
        CheckpointPath(options_.checkpoint_dir, step, options_.shard),
        " in ", Seconds(absl::Now() - start)));
  } else {
    Log(absl::StrCat("checkpoint of step ", step,
                     " failed: ", checkpoint_status_.ToString()));
  }
  return checkpoint_status_;
}

ShardCheckpoint ParameterShard::Snapshot() const {
  absl::ReaderMutexLock lock(&mu_);
  ShardCheckpoint out;
  out.header.step = version_;
  out.header.shard = options_.shard;
  out.header.num_shards = options_.spec.layout().num_shards();
  out.header.partition_version = options_.map.version();
  out.header.optimizer = options_.spec.optimizer().type();
  out.header.state_buffers = OptimizerStateBuffers(out.header.optimizer);
  out.header.spec = options_.spec;
  out.header.num_chunks = static_cast<int32_t>(chunks_.size());
  for (const Chunk& c : chunks_) {
    out.chunks.push_back({c.desc, c.params, c.state});
  }
  return out;
}

std::map<int64_t, double> ParameterShard::AppliedSumSquares() const {
  absl::ReaderMutexLock lock(&mu_);
  return applied_sum_squares_;
}

bool ParameterShard::HasPendingGradients() const {
  absl::ReaderMutexLock lock(&mu_);
  for (const StepGrads& slot : step_slots_) {
    if (slot.step >= version_) return true;
  }
  for (const RankGrads& r : rank_grads_) {
    if (r.parts_received > 0) return true;
  }
  return false;
}

absl::Status ParameterShard::Restore(const ShardCheckpoint& snapshot,
                                     const std::map<int64_t, double>& applied,
                                     double last_grad_norm) {
  const int shard = options_.shard;
  if (mode_ == ASYNC) return NotInAsync(shard, "Restore");
  absl::MutexLock lock(&mu_);
  if (snapshot.header.shard != shard ||
      snapshot.header.partition_version != options_.map.version() ||
      snapshot.chunks.size() != chunks_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "snapshot of shard ", snapshot.header.shard, " (partition version ",
        snapshot.header.partition_version, ", ", snapshot.chunks.size(),
        " chunks) does not fit shard ", shard, " (partition version ",
        options_.map.version(), ", ", chunks_.size(), " chunks)"));
  }
  for (size_t i = 0; i < chunks_.size(); ++i) {
    const ChunkData& in = snapshot.chunks[i];
    const Chunk& c = chunks_[i];
    if (in.desc.tensor() != c.desc.tensor() ||
        in.desc.index() != c.desc.index() ||
        static_cast<int64_t>(in.params.size()) != c.size() ||
        in.state.size() != c.state.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "snapshot chunk ", i, " (", in.desc.tensor(), "#", in.desc.index(),
          ", ", in.params.size(), " elements, ", in.state.size(),
          " state buffers) does not match shard ", shard, "'s chunk ",
          c.desc.tensor(), "#", c.desc.index(), " (", c.size(), ", ",
          c.state.size(), ")"));
    }
    for (const std::vector<float>& b : in.state) {
      if (static_cast<int64_t>(b.size()) != c.size()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "snapshot chunk ", c.desc.tensor(), "#", c.desc.index(),
            " has a state buffer of ", b.size(), " elements, not ", c.size()));
      }
    }
  }
  for (size_t i = 0; i < chunks_.size(); ++i) {
    chunks_[i].params = snapshot.chunks[i].params;
    chunks_[i].state = snapshot.chunks[i].state;
  }
  version_ = snapshot.header.step;
  clocks_.assign(dp_, version_);
  for (StepGrads& slot : step_slots_) slot.step = -1;
  applied_sum_squares_ = applied;
  last_grad_norm_ = last_grad_norm;
  Log(absl::StrCat("restored shard ", shard, " from its primary's snapshot at "
                   "version ",
                   version_));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Pull and TensorInfo.
// ---------------------------------------------------------------------------

absl::StatusOr<std::vector<PullResponse>> ParameterShard::Pull(
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
    return ResizeStop(absl::StrCat(
        "the job stops at step ", stop_at_,
        " for a resize (elastic data parallelism): shard ", shard,
        " serves no later step; the job restarts from the checkpoint of step ",
        stop_at_));
  }
  const int64_t budget = options_.spec.max_message_bytes();
  const int elem = DTypeSize(dtype);
  std::vector<PullResponse> out;
  PullResponse current;
  current.set_version(version_);
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
          out.push_back(std::move(current));
          current = PullResponse();
          current.set_version(version_);
          payload = 0;
        }
        const int64_t n = std::min(r.end - offset, (budget - payload) / elem);
        ChunkSlice* s = current.add_slices();
        s->set_tensor(c.desc.tensor());
        s->set_chunk(c.desc.index());
        s->set_offset(offset);
        s->set_dtype(dtype);
        std::string* data = s->mutable_data();
        data->reserve(n * elem);
        EncodePayload(dtype, c.params.data() + offset, n, data);
        payload += n * elem;
        offset += n;
      }
    }
  }
  if (payload > 0 || out.empty()) out.push_back(std::move(current));
  return out;
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

namespace lmps {

double ParameterShard::last_grad_norm() const {
  absl::MutexLock lock(&mu_);
  return last_grad_norm_;
}

}  // namespace lmps

namespace lmps {

std::vector<int64_t> ParameterShard::replica_clocks() const {
  absl::ReaderMutexLock lock(&mu_);
  return clocks_;
}

int64_t ParameterShard::max_staleness_seen() const {
  absl::ReaderMutexLock lock(&mu_);
  return max_staleness_;
}

int64_t ParameterShard::step_clock() const {
  absl::ReaderMutexLock lock(&mu_);
  return StepClockLocked();
}

}  // namespace lmps
