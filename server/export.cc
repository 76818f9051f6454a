#include "server/export.h"

#include <algorithm>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/model/model_spec.h"
#include "common/model/partition.h"
#include "server/checkpoint.h"

namespace lmps {

absl::StatusOr<int64_t> LatestCompleteStep(absl::string_view dir) {
  absl::StatusOr<std::vector<int64_t>> steps = ListCheckpointStepDirs(dir);
  if (!steps.ok()) return steps.status();
  for (auto it = steps->rbegin(); it != steps->rend(); ++it) {
    const int64_t step = *it;
    absl::StatusOr<CheckpointHeader> first =
        VerifyShardCheckpoint(CheckpointPath(dir, step, 0));
    if (!first.ok() || first->step != step || first->shard != 0) continue;
    bool complete = true;
    for (int s = 1; s < first->num_shards && complete; ++s) {
      absl::StatusOr<CheckpointHeader> h =
          VerifyShardCheckpoint(CheckpointPath(dir, step, s));
      complete = h.ok() && h->step == step && h->shard == s &&
                 h->partition_version == first->partition_version;
    }
    if (complete) return step;
  }
  return absl::NotFoundError(
      absl::StrCat("no complete checkpoint (every shard's file of one step) "
                   "under ",
                   dir));
}

absl::StatusOr<AssembledModel> AssembleCheckpoint(absl::string_view dir,
                                                  int64_t step) {
  AssembledModel model;
  model.step = step;
  std::map<std::string, size_t> index;
  // Element ranges filled, per tensor, to check the chunks tile it.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> filled;
  CheckpointHeader first;
  int num_shards = 1;
  for (int s = 0; s < num_shards; ++s) {
    const std::string path = CheckpointPath(dir, step, s);
    absl::StatusOr<ShardCheckpoint> ckpt = ReadShardCheckpoint(path);
    if (!ckpt.ok()) return ckpt.status();
    const CheckpointHeader& h = ckpt->header;
    if (h.step != step || h.shard != s) {
      return absl::DataLossError(
          absl::StrCat(path, " holds step ", h.step, " of shard ", h.shard));
    }
    if (s == 0) {
      first = h;
      num_shards = h.num_shards;
      model.spec = h.spec;
      if (num_shards < 1) {
        return absl::DataLossError(
            absl::StrCat(path, ": bad shard count ", num_shards));
      }
      for (TensorSpec& t : GptTensorSpecs(h.spec.model())) {
        index[t.name] = model.tensors.size();
        model.tensors.push_back(
            {t.name, t.shape, std::vector<float>(t.num_elements(), 0.0f)});
      }
      filled.resize(model.tensors.size());
    } else if (h.num_shards != first.num_shards ||
               h.partition_version != first.partition_version) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, " belongs to another job or partition (", h.num_shards,
          " shards, partition version ", h.partition_version, ") than ",
          CheckpointPath(dir, step, 0), " (", first.num_shards,
          " shards, partition version ", first.partition_version, ")"));
    }
    for (const ChunkData& c : ckpt->chunks) {
      auto it = index.find(c.desc.tensor());
      if (it == index.end()) {
        return absl::DataLossError(absl::StrCat(
            path, ": chunk of unknown tensor '", c.desc.tensor(), "'"));
      }
      SafeTensor& t = model.tensors[it->second];
      if (c.desc.begin() < 0 ||
          c.desc.end() > static_cast<int64_t>(t.data.size()) ||
          c.desc.end() - c.desc.begin() !=
              static_cast<int64_t>(c.params.size())) {
        return absl::DataLossError(
            absl::StrCat(path, ": chunk ", c.desc.ShortDebugString(),
                         " does not fit tensor '", t.name, "' of ",
                         t.data.size(), " elements"));
      }
      std::copy(c.params.begin(), c.params.end(),
                t.data.begin() + c.desc.begin());
      filled[it->second].push_back({c.desc.begin(), c.desc.end()});
    }
  }
  for (size_t i = 0; i < model.tensors.size(); ++i) {
    auto& ranges = filled[i];
    std::sort(ranges.begin(), ranges.end());
    int64_t next = 0;
    for (auto [b, e] : ranges) {
      if (b != next) break;
      next = e;
    }
    if (next != static_cast<int64_t>(model.tensors[i].data.size())) {
      return absl::DataLossError(
          absl::StrCat("checkpoint step ", step, " under ", dir,
                       ": the shards' chunks of '", model.tensors[i].name,
                       "' do not cover it exactly (covered up to "
                       "element ",
                       next, " of ", model.tensors[i].data.size(), ")"));
    }
  }
  return model;
}

absl::StatusOr<AssembledModel> ExportCheckpoint(absl::string_view dir,
                                                int64_t step,
                                                const std::string& out_path) {
  if (step < 0) {
    absl::StatusOr<int64_t> latest = LatestCompleteStep(dir);
    if (!latest.ok()) return latest.status();
    step = *latest;
  }
  absl::StatusOr<AssembledModel> model = AssembleCheckpoint(dir, step);
  if (!model.ok()) return model.status();
  std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"lmps.step", absl::StrCat(step)},
      {"lmps.job", model->spec.name()},
      {"lmps.model", model->spec.model().ShortDebugString()},
  };
  if (absl::Status s = WriteSafetensorsFile(out_path, model->tensors, metadata);
      !s.ok()) {
    return s;
  }
  return model;
}

}  // namespace lmps
