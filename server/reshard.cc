#include "server/reshard.h"

#include <dirent.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/model/partition.h"
#include "server/optimizer.h"

namespace lmps {
namespace {

std::string FileName(int shard) { return absl::StrCat("shard_", shard, ".ckpt"); }

// What to do when old shard files are not where the new shard looks.
std::string ReachHint(absl::string_view dir, int64_t step, int num_shards) {
  return absl::StrCat(
      "resuming under another layout (num_shards or max_chunk_bytes) needs "
      "every old shard file of the step reachable from every new shard: use "
      "one --checkpoint_dir on a volume shared by all shards, or copy ",
      CheckpointStepDir(dir, step), "/shard_*.ckpt",
      num_shards > 0 ? absl::StrCat(" of all ", num_shards, " old shards")
                     : std::string(),
      " into each new shard's --checkpoint_dir");
}

// Shard ids of the "shard_<n>.ckpt" files in `step_dir` (temporary files
// excluded), ascending. NotFound if the directory does not exist.
absl::StatusOr<std::vector<int>> ShardFilesIn(const std::string& step_dir) {
  DIR* handle = ::opendir(step_dir.c_str());
  if (handle == nullptr) {
    const int e = errno;
    std::string msg = absl::StrCat("cannot list ", step_dir, ": ", strerror(e));
    if (e == ENOENT) return absl::NotFoundError(msg);
    return absl::InternalError(msg);
  }
  std::vector<int> shards;
  while (struct dirent* e = ::readdir(handle)) {
    absl::string_view name(e->d_name);
    if (!absl::ConsumePrefix(&name, "shard_") ||
        !absl::ConsumeSuffix(&name, ".ckpt") || name.empty() ||
        !std::all_of(name.begin(), name.end(),
                     [](char c) { return c >= '0' && c <= '9'; })) {
      continue;
    }
    int shard = 0;
    if (absl::SimpleAtoi(name, &shard)) shards.push_back(shard);
  }
  ::closedir(handle);
  std::sort(shards.begin(), shards.end());
  return shards;
}

bool SameModel(const ModelConfig& a, const ModelConfig& b) {
  return a.n_layer() == b.n_layer() && a.n_head() == b.n_head() &&
         a.n_embd() == b.n_embd() && a.block_size() == b.block_size() &&
         a.vocab_size() == b.vocab_size();
}

// The first `limit` items of `items`, then "and N more".
std::string JoinSome(const std::vector<std::string>& items, size_t limit) {
  if (items.size() <= limit) return absl::StrJoin(items, "; ");
  std::vector<std::string> head(items.begin(), items.begin() + limit);
  return absl::StrCat(absl::StrJoin(head, "; "), "; and ",
                      items.size() - limit, " more");
}

}  // namespace

absl::StatusOr<CheckpointHeader> ReadCheckpointLayout(absl::string_view dir,
                                                      int64_t step) {
  const std::string step_dir = CheckpointStepDir(dir, step);
  // The layout is shard 0's; without it, any other shard file's (so the
  // error can say which files of that layout are missing).
  std::string anchor_path = CheckpointPath(dir, step, 0);
  absl::StatusOr<CheckpointHeader> anchor = ReadCheckpointHeader(anchor_path);
  if (!anchor.ok() && anchor.status().code() != absl::StatusCode::kNotFound) {
    return anchor.status();
  }
  if (!anchor.ok()) {
    absl::StatusOr<std::vector<int>> present = ShardFilesIn(step_dir);
    if (!present.ok() && present.status().code() != absl::StatusCode::kNotFound) {
      return present.status();
    }
    if (present.ok()) {
      for (int s : *present) {
        anchor_path = CheckpointPath(dir, step, s);
        anchor = ReadCheckpointHeader(anchor_path);
        if (anchor.ok()) break;
      }
    }
    if (!anchor.ok()) {
      return absl::NotFoundError(absl::StrCat(
          "no checkpoint of step ", step, " under ", dir, ": ", step_dir,
          present.ok() ? " holds no readable shard file" : " does not exist",
          "; ", ReachHint(dir, step, 0)));
    }
  }
  const CheckpointHeader& h = *anchor;
  if (h.step != step) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint ", anchor_path, " holds step ", h.step, ", not ", step));
  }
  if (h.num_shards < 1 || h.shard < 0 || h.shard >= h.num_shards) {
    return absl::DataLossError(absl::StrCat("checkpoint ", anchor_path,
                                            ": bad shard ", h.shard, " of ",
                                            h.num_shards));
  }
  std::vector<std::string> missing, foreign;
  for (int s = 0; s < h.num_shards; ++s) {
    if (s == h.shard) continue;
    const std::string path = CheckpointPath(dir, step, s);
    absl::StatusOr<CheckpointHeader> other = ReadCheckpointHeader(path);
    if (!other.ok()) {
      if (other.status().code() != absl::StatusCode::kNotFound) {
        return other.status();
      }
      missing.push_back(FileName(s));
    } else if (other->step != step || other->shard != s ||
               other->num_shards != h.num_shards ||
               other->partition_version != h.partition_version) {
      foreign.push_back(absl::StrCat(
          FileName(s), " (step ", other->step, ", shard ", other->shard,
          " of ", other->num_shards, ", partition version ",
          other->partition_version, ")"));
    }
  }
  if (!missing.empty() || !foreign.empty()) {
    std::string what;
    if (!missing.empty()) {
      absl::StrAppend(&what, "missing ", absl::StrJoin(missing, ", "));
    }
    if (!foreign.empty()) {
      absl::StrAppend(&what, missing.empty() ? "" : "; ",
                      "of another step or layout: ",
                      absl::StrJoin(foreign, ", "));
    }
    return absl::Status(
        missing.empty() ? absl::StatusCode::kFailedPrecondition
                        : absl::StatusCode::kNotFound,
        absl::StrCat("checkpoint step ", step, " under ", dir,
                     " was written by ", h.num_shards,
                     " shards (partition version ", h.partition_version,
                     ", per ", anchor_path, ") but its shard files are not "
                     "all here: ",
                     what, "; ", ReachHint(dir, step, h.num_shards)));
  }
  return h;
}

absl::StatusOr<ReshardResult> ReadCheckpointRanges(
    const ReshardRequest& request) {
  const std::string& dir = request.dir;
  const int64_t step = request.step;
  std::map<std::string, std::vector<size_t>> by_tensor;
  for (size_t i = 0; i < request.ranges.size(); ++i) {
    const ReshardRange& r = request.ranges[i];
    if (r.begin < 0 || r.end <= r.begin) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad range of tensor '", r.tensor, "': [", r.begin,
                       ", ", r.end, ")"));
    }
    by_tensor[r.tensor].push_back(i);
  }
  absl::StatusOr<CheckpointHeader> layout = ReadCheckpointLayout(dir, step);
  if (!layout.ok()) return layout.status();
  ReshardResult result;
  result.source = *std::move(layout);
  const CheckpointHeader& src = result.source;
  const int n_old = src.num_shards;
  const std::string where = absl::StrCat("checkpoint step ", step, " under ",
                                         dir, " (", n_old, " shards)");
  if (request.model.has_value() &&
      !SameModel(*request.model, src.spec.model())) {
    return absl::FailedPreconditionError(absl::StrCat(
        where, " was written for model {", src.spec.model().ShortDebugString(),
        "}, the job's is {", request.model->ShortDebugString(), "}"));
  }
  if (request.optimizer.has_value()) {
    const int want = OptimizerStateBuffers(*request.optimizer);
    if (src.state_buffers != want ||
        OptimizerStateBuffers(src.optimizer) != want) {
      return absl::FailedPreconditionError(absl::StrCat(
          where, " holds state of optimizer ", OptimizerType_Name(src.optimizer),
          ", the job uses ", OptimizerType_Name(*request.optimizer)));
    }
  }

  // Which old files hold wanted elements: from the old partition map when it
  // reproduces the recorded version (it is a pure function of the spec),
  // else all of them.
  std::vector<char> needed(n_old, 1);
  std::set<std::string> old_tensors;
  bool old_tensors_known = false;
  absl::StatusOr<PartitionMap> old_map =
      ComputePartition(src.spec.model(), n_old, src.spec.max_chunk_bytes());
  if (old_map.ok() && old_map->version() == src.partition_version) {
    std::fill(needed.begin(), needed.end(), 0);
    for (const ChunkDesc& c : old_map->chunks()) {
      old_tensors.insert(c.tensor());
      auto it = by_tensor.find(c.tensor());
      if (it == by_tensor.end() || c.shard() < 0 || c.shard() >= n_old) {
        continue;
      }
      for (size_t i : it->second) {
        const ReshardRange& r = request.ranges[i];
        if (std::max(r.begin, c.begin()) < std::min(r.end, c.end())) {
          needed[c.shard()] = 1;
        }
      }
    }
    old_tensors_known = true;
  }

  result.ranges.resize(request.ranges.size());
  for (size_t i = 0; i < request.ranges.size(); ++i) {
    const int64_t n = request.ranges[i].end - request.ranges[i].begin;
    result.ranges[i].params.assign(n, 0.0f);
    result.ranges[i].state.assign(src.state_buffers,
                                  std::vector<float>(n, 0.0f));
  }
  // Element intervals copied into each range (to check they tile it).
  std::vector<std::vector<std::pair<int64_t, int64_t>>> covered(
      request.ranges.size());
  for (int s = 0; s < n_old; ++s) {
    if (!needed[s]) continue;
    const std::string path = CheckpointPath(dir, step, s);
    absl::StatusOr<ShardCheckpoint> ckpt = ReadShardCheckpoint(path);
    if (!ckpt.ok()) {
      if (ckpt.status().code() == absl::StatusCode::kNotFound) {
        return absl::NotFoundError(absl::StrCat(
            ckpt.status().message(), "; ", ReachHint(dir, step, n_old)));
      }
      return ckpt.status();
    }
    const CheckpointHeader& h = ckpt->header;
    if (h.step != step || h.shard != s || h.num_shards != n_old ||
        h.partition_version != src.partition_version ||
        h.state_buffers != src.state_buffers) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, " changed while resharding: it holds step ", h.step, " of shard ",
          h.shard, " of ", h.num_shards, " (partition version ",
          h.partition_version, ")"));
    }
    result.shards_read.push_back(s);
    for (const ChunkData& c : ckpt->chunks) {
      if (!old_tensors_known) old_tensors.insert(c.desc.tensor());
      auto it = by_tensor.find(c.desc.tensor());
      if (it == by_tensor.end()) continue;
      const int64_t cb = c.desc.begin();
      for (size_t i : it->second) {
        const ReshardRange& r = request.ranges[i];
        const int64_t lo = std::max(r.begin, cb);
        const int64_t hi = std::min(r.end, c.desc.end());
        if (lo >= hi) continue;
        RangeData& out = result.ranges[i];
        std::copy(c.params.begin() + (lo - cb), c.params.begin() + (hi - cb),
                  out.params.begin() + (lo - r.begin));
        for (int k = 0; k < src.state_buffers; ++k) {
          std::copy(c.state[k].begin() + (lo - cb),
                    c.state[k].begin() + (hi - cb),
                    out.state[k].begin() + (lo - r.begin));
        }
        covered[i].push_back({lo, hi});
      }
    }
  }

  std::vector<std::string> problems;
  std::set<std::string> absent;
  for (size_t i = 0; i < request.ranges.size(); ++i) {
    const ReshardRange& r = request.ranges[i];
    if (old_tensors.count(r.tensor) == 0) {
      if (absent.insert(r.tensor).second) {
        problems.push_back(
            absl::StrCat("tensor '", r.tensor, "' (not in the checkpoint)"));
      }
      continue;
    }
    auto& c = covered[i];
    std::sort(c.begin(), c.end());
    int64_t next = r.begin;
    for (auto [b, e] : c) {
      if (b < next) {
        return absl::DataLossError(absl::StrCat(
            where, ": chunks of tensor '", r.tensor, "' overlap at element ",
            b));
      }
      if (b > next) {
        problems.push_back(absl::StrCat("tensor '", r.tensor, "' elements [",
                                        next, ", ", b, ")"));
      }
      next = e;
    }
    if (next < r.end) {
      problems.push_back(absl::StrCat("tensor '", r.tensor, "' elements [",
                                      next, ", ", r.end, ")"));
    }
  }
  if (!problems.empty()) {
    std::vector<std::string> read;
    for (int s : result.shards_read) read.push_back(FileName(s));
    return absl::DataLossError(absl::StrCat(
        where, ", files read: [", absl::StrJoin(read, ", "),
        "], does not hold: ", JoinSome(problems, 10)));
  }
  return result;
}

absl::StatusOr<std::vector<int64_t>> ListRelayoutCheckpointSteps(
    absl::string_view dir) {
  absl::StatusOr<std::vector<int64_t>> steps = ListCheckpointStepDirs(dir);
  if (!steps.ok()) return steps.status();
  std::vector<int64_t> complete;
  for (int64_t step : *steps) {
    absl::StatusOr<CheckpointHeader> first =
        VerifyShardCheckpoint(CheckpointPath(dir, step, 0));
    if (!first.ok() || first->step != step || first->shard != 0 ||
        first->num_shards < 1) {
      continue;
    }
    bool ok = true;
    for (int s = 1; s < first->num_shards && ok; ++s) {
      absl::StatusOr<CheckpointHeader> h =
          VerifyShardCheckpoint(CheckpointPath(dir, step, s));
      ok = h.ok() && h->step == step && h->shard == s &&
           h->num_shards == first->num_shards &&
           h->partition_version == first->partition_version;
    }
    if (ok) complete.push_back(step);
  }
  return complete;
}

bool CheckpointNeedsReshard(const std::string& path, const PartitionMap& map) {
  absl::StatusOr<CheckpointHeader> own = ReadCheckpointHeader(path);
  if (!own.ok()) return own.status().code() == absl::StatusCode::kNotFound;
  return own->partition_version != map.version() ||
         own->num_shards != map.num_shards();
}

absl::StatusOr<std::vector<RangeData>> LoadShardRanges(
    const std::string& dir, int64_t step, const JobSpec& spec,
    std::vector<ReshardRange> ranges, int shard,
    const std::function<void(const std::string&)>& log) {
  ReshardRequest request;
  request.dir = dir;
  request.step = step;
  request.ranges = std::move(ranges);
  request.model = spec.model();
  request.optimizer = spec.optimizer().type();
  absl::StatusOr<ReshardResult> result = ReadCheckpointRanges(request);
  if (!result.ok()) {
    return absl::Status(
        result.status().code(),
        absl::StrCat("shard ", shard, ": cannot resume from step ", step, ": ",
                     result.status().message()));
  }
  if (log) {
    std::vector<std::string> read;
    for (int s : result->shards_read) read.push_back(FileName(s));
    log(absl::StrCat("resumed from step ", step, " written by ",
                     result->source.num_shards, " shards (partition version ",
                     result->source.partition_version, ", max_chunk_bytes ",
                     result->source.spec.max_chunk_bytes(), "): resharded ",
                     request.ranges.size(), " chunks from ",
                     CheckpointStepDir(dir, step), "/{",
                     absl::StrJoin(read, ","), "}"));
  }
  return std::move(result->ranges);
}

}  // namespace lmps
