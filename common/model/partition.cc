#include "common/model/partition.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/model/model_spec.h"
#include "common/model/rng.h"

namespace lmps {

absl::StatusOr<PartitionMap> ComputePartition(const ModelConfig& model,
                                              int num_shards,
                                              int64_t max_chunk_bytes) {
  if (absl::Status s = ValidateModelConfig(model); !s.ok()) return s;
  if (num_shards <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_shards must be positive, got ", num_shards));
  }
  if (max_chunk_bytes < 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_chunk_bytes must be at least 4, got ", max_chunk_bytes));
  }
  const int64_t max_elems = max_chunk_bytes / 4;
  PartitionMap map;
  map.set_num_shards(num_shards);
  for (const TensorSpec& spec : GptTensorSpecs(model)) {
    const int64_t n = spec.num_elements();
    const int64_t k = (n + max_elems - 1) / max_elems;
    for (int64_t i = 0; i < k; ++i) {
      ChunkDesc* c = map.add_chunks();
      c->set_tensor(spec.name);
      c->set_index(static_cast<int32_t>(i));
      c->set_begin(n * i / k);
      c->set_end(n * (i + 1) / k);
    }
  }
  // Longest-processing-time greedy placement.
  std::vector<int> order(map.chunks_size());
  std::iota(order.begin(), order.end(), 0);
  auto size = [&](int i) {
    return map.chunks(i).end() - map.chunks(i).begin();
  };
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return size(a) > size(b); });
  std::vector<int64_t> bytes(num_shards, 0);
  for (int i : order) {
    int best = static_cast<int>(
        std::min_element(bytes.begin(), bytes.end()) - bytes.begin());
    map.mutable_chunks(i)->set_shard(best);
    bytes[best] += 4 * size(i);
  }
  int64_t total = 0, most = 0;
  for (int64_t b : bytes) {
    map.add_shard_bytes(b);
    total += b;
    most = std::max(most, b);
  }
  map.set_imbalance(total == 0 ? 1.0
                               : static_cast<double>(most) * num_shards /
                                     static_cast<double>(total));
  uint64_t v = StableKey(static_cast<uint64_t>(max_chunk_bytes),
                         model.SerializeAsString());
  map.set_version(Mix64(v ^ static_cast<uint64_t>(num_shards)));
  return map;
}

std::vector<ChunkDesc> ChunksOfShard(const PartitionMap& map, int shard) {
  std::vector<ChunkDesc> out;
  for (const ChunkDesc& c : map.chunks()) {
    if (c.shard() == shard) out.push_back(c);
  }
  return out;
}

}  // namespace lmps
