// ParameterShard initialisation: the chunks of this shard and who pushes
// which part of them (the parallel layout), then the initial parameters: a
// fresh deterministic initialisation, a checkpoint (resume, also one written
// under another layout) or a safetensors file (lmps's or Hugging Face's
// layout).
#include "server/shard.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/formats/gpt2_weights.h"
#include "common/model/init.h"
#include "common/model/job_spec.h"
#include "common/model/parallel_layout.h"
#include "server/optimizer.h"
#include "server/reshard.h"
#include "server/shard_internal.h"

namespace lmps {

using shard_internal::ChunkName;

absl::Status ParameterShard::Init() {
  dp_ = PushingReplicas(options_.spec);
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
  // lmps's or Hugging Face's layout (common/formats/gpt2_weights.h); only
  // this shard's element ranges are copied (and transposed where the file
  // holds Conv1D weights).
  absl::StatusOr<Gpt2Weights> weights = Gpt2Weights::Load(
      options_.init_from_safetensors, &options_.spec.model());
  if (!weights.ok()) {
    return absl::Status(weights.status().code(),
                        absl::StrCat("initial weights: ",
                                     weights.status().message()));
  }
  if (options_.log && !weights->adaptations().empty()) {
    options_.log(absl::StrCat("initial weights ", weights->path(), ": ",
                              absl::StrJoin(weights->adaptations(), "; ")));
  }
  for (Chunk& c : chunks_) {
    weights->CopyRange(tensor_index_.at(c.desc.tensor()), c.desc.begin(),
                       c.desc.end(), c.params.data());
    for (int64_t i = 0; i < c.size(); ++i) {
      if (!std::isfinite(c.params[i])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "initial weights ", weights->path(), ": tensor '",
            c.desc.tensor(), "' element ", c.desc.begin() + i,
            " is not finite"));
      }
    }
  }
  Log(absl::StrCat("initial weights from ", weights->path(), " (",
                   Gpt2LayoutName(weights->layout()), " layout)"));
  return absl::OkStatus();
}

}  // namespace lmps
