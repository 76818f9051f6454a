#include "server/scheduler/start_step.h"

#include <algorithm>
#include <iterator>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace lmps {

int64_t ChooseStartStep(const std::vector<ShardCheckpoints>& shards,
                        uint64_t partition_version) {
  if (shards.empty()) return 0;
  std::set<int64_t> common;
  bool first = true;
  for (const ShardCheckpoints& shard : shards) {
    std::set<int64_t> steps;
    if (shard.partition_version == partition_version) {
      for (int64_t s : shard.steps) {
        if (s >= 0) steps.insert(s);
      }
    }
    for (int64_t s : shard.relayout_steps) {
      if (s >= 0) steps.insert(s);
    }
    if (first) {
      common = std::move(steps);
      first = false;
    } else {
      std::set<int64_t> both;
      std::set_intersection(common.begin(), common.end(), steps.begin(),
                            steps.end(), std::inserter(both, both.begin()));
      common = std::move(both);
    }
    if (common.empty()) return 0;
  }
  return *common.rbegin();
}

std::string ExplainStartStep(const std::vector<ShardCheckpoints>& shards,
                             uint64_t partition_version, int64_t step) {
  // Shards that load `step` from another layout's files (resharding), and
  // whether any shard holds checkpoints of another partition.
  std::vector<int> reshard;
  bool other_partition = false;
  for (size_t i = 0; i < shards.size(); ++i) {
    const ShardCheckpoints& c = shards[i];
    const bool own = c.partition_version == partition_version &&
                     std::count(c.steps.begin(), c.steps.end(), step) > 0;
    if (step > 0 && !own) reshard.push_back(static_cast<int>(i));
    other_partition |=
        !c.steps.empty() && c.partition_version != partition_version;
  }
  if (step > 0 && reshard.empty()) {
    return absl::StrCat(
        "latest checkpoint every shard holds, partition "
        "version ",
        partition_version);
  }
  if (step > 0) {
    return absl::StrCat(
        "latest checkpoint every shard can load; shards [",
        absl::StrJoin(reshard, ","),
        "] load it from the complete set of its shard files, rebuilding "
        "their chunks if another layout wrote it (partition version ",
        partition_version, " now)");
  }
  if (other_partition) {
    return absl::StrCat(
        "servers hold checkpoints of another partition (model, num_shards "
        "or max_chunk_bytes changed; this job's is ",
        partition_version,
        ") but no step has every old shard file reachable from every "
        "server: resuming under another layout needs every old shard file "
        "of the step reachable from every new shard (one --checkpoint_dir "
        "on a shared volume, or the files copied into each shard's "
        "--checkpoint_dir); starting from scratch");
  }
  return absl::StrCat(
      "no checkpoint step common to every shard with partition version ",
      partition_version);
}

}  // namespace lmps
