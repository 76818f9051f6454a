// Helpers of the ParameterShard tests (shard_test.cc, shard_modes_test.cc,
// shard_parts_test.cc): small jobs, shards, deterministic gradients and
// push streams, snapshots as bytes, the SYNC protocol step. Test-only.
#ifndef LMPS_SERVER_SHARD_TEST_UTIL_H_
#define LMPS_SERVER_SHARD_TEST_UTIL_H_

#include "server/shard.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <thread>

#include "absl/synchronization/notification.h"
#include "common/formats/safetensors.h"
#include "common/model/bf16.h"
#include "common/model/init.h"
#include "common/model/job_spec.h"
#include "common/model/parallel_layout.h"
#include "common/model/partition.h"
#include "common/rpc/status_util.h"
#include "gtest/gtest.h"
#include "server/checkpoint.h"
#include "server/tensor_codec.h"

namespace lmps {
namespace shard_test {

// A tiny model: 1 layer, width 8, vocabulary 16; chunks of <= 64 elements.
inline JobSpec Spec(int dp, int num_shards, OptimizerType type) {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(1);
  m->set_n_head(2);
  m->set_n_embd(8);
  m->set_block_size(4);
  m->set_vocab_size(16);
  spec.mutable_layout()->set_dp(dp);
  spec.mutable_layout()->set_num_shards(num_shards);
  spec.mutable_train()->set_batch_size(2 * dp);
  spec.mutable_train()->set_steps(10);
  spec.mutable_train()->set_checkpoint_interval(1000);
  OptimizerConfig* o = spec.mutable_optimizer();
  o->set_type(type);
  o->set_lr(0.1f);
  o->set_min_lr(0.1f);      // constant learning rate
  o->set_weight_decay(-1);  // none
  o->set_grad_clip(-1);     // no clipping
  spec.set_max_chunk_bytes(256);
  spec.set_max_message_bytes(1024);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

inline std::string TestDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(tmp ? tmp : "/tmp") + "/" + name;
  EXPECT_EQ(std::system(("rm -rf '" + dir + "'").c_str()), 0);
  return dir;
}

inline ShardOptions Options(const JobSpec& spec, int shard) {
  ShardOptions o;
  o.shard = shard;
  o.spec = spec;
  o.map = *ComputePartition(spec.model(), spec.layout().num_shards(),
                            spec.max_chunk_bytes());
  o.wait_timeout = absl::Seconds(10);
  return o;
}

inline std::unique_ptr<ParameterShard> MakeShard(ShardOptions o) {
  auto shard = ParameterShard::Create(std::move(o));
  EXPECT_TRUE(shard.ok()) << shard.status();
  return shard.ok() ? std::move(*shard) : nullptr;
}

// The gradient a rank pushes for element i of a chunk.
inline float Grad(int rank, int64_t step, const ChunkDesc& c, int64_t i) {
  return 0.01f * static_cast<float>((c.begin() + i + 3 * rank + step) % 7) -
         0.02f * static_cast<float>(rank);
}

inline void AppendValues(DType dtype, const std::vector<float>& v,
                         int64_t begin, int64_t n, std::string* out) {
  EncodePayload(dtype, v.data() + begin, n, out);
}

// A push stream of `rank` for `step` covering every chunk of the shard, each
// chunk cut into 2 slices and the slices spread over several messages.
inline std::vector<PushRequest> Stream(const ParameterShard& shard, int rank,
                                       int64_t step, DType dtype = F32) {
  std::vector<PushRequest> stream;
  int slices_in_message = 0;
  for (const ChunkDesc& c : ChunksOfShard(shard.partition(), shard.shard())) {
    const int64_t n = c.end() - c.begin();
    std::vector<float> g(n);
    for (int64_t i = 0; i < n; ++i) g[i] = Grad(rank, step, c, i);
    const int64_t half = n / 2;
    for (auto [b, e] : {std::pair<int64_t, int64_t>{half, n}, {0, half}}) {
      if (stream.empty() || slices_in_message == 3) {
        stream.emplace_back();
        stream.back().set_worker_id("w");
        stream.back().set_dp_rank(rank);
        stream.back().set_step(step);
        stream.back().set_partition_version(shard.partition().version());
        slices_in_message = 0;
      }
      ChunkSlice* s = stream.back().add_slices();
      s->set_tensor(c.tensor());
      s->set_chunk(c.index());
      s->set_offset(b);
      s->set_dtype(dtype);
      AppendValues(dtype, g, b, e - b, s->mutable_data());
      ++slices_in_message;
    }
  }
  return stream;
}

inline absl::Time Soon() { return absl::Now() + absl::Milliseconds(100); }

inline std::string Bytes(const ShardCheckpoint& c) {
  std::string out;
  for (const ChunkData& chunk : c.chunks) {
    out.append(reinterpret_cast<const char*>(chunk.params.data()),
               4 * chunk.params.size());
    for (const auto& s : chunk.state) {
      out.append(reinterpret_cast<const char*>(s.data()), 4 * s.size());
    }
  }
  return out;
}

// Reassembles pulled messages into per-chunk values.
inline std::map<std::pair<std::string, int>, std::vector<float>> Values(
    const std::vector<PullResponse>& msgs, int64_t max_payload = 1 << 30) {
  std::map<std::pair<std::string, int>, std::vector<float>> out;
  for (const PullResponse& m : msgs) {
    int64_t payload = 0;
    for (const ChunkSlice& s : m.slices()) {
      const int64_t n = s.data().size() / DTypeSize(s.dtype());
      payload += s.data().size();
      auto& v = out[{s.tensor(), s.chunk()}];
      EXPECT_EQ(static_cast<int64_t>(v.size()), s.offset());
      v.resize(s.offset() + n);
      DecodePayload(s.dtype(), s.data(), v.data() + s.offset());
    }
    EXPECT_LE(payload, max_payload);
  }
  return out;
}


inline void ExpectRejected(ParameterShard* shard,
                           std::vector<PushRequest> stream,
                           absl::StatusCode code, const std::string& needle) {
  const std::string before = Bytes(shard->Snapshot());
  auto r = shard->Push(stream);
  ASSERT_FALSE(r.ok()) << "expected: " << needle;
  EXPECT_EQ(r.status().code(), code) << r.status();
  EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
  EXPECT_EQ(Bytes(shard->Snapshot()), before);
}

inline JobSpec WithMode(JobSpec spec, ConsistencyMode mode,
                        int staleness = 0) {
  spec.mutable_train()->set_mode(mode);
  spec.mutable_train()->set_staleness(staleness);
  return spec;
}

inline PullRequest PullFor(int64_t step) {
  PullRequest p;
  p.set_step(step);
  return p;
}

// One SYNC-protocol step on `s` with every rank's push: GradNorm and Apply.
inline void SyncStep(ParameterShard* s, int64_t t) {
  const double ss = *s->GradNorm(t, Soon());
  ASSERT_EQ(*s->Apply(t, ss), t + 1);
}

}  // namespace shard_test
}  // namespace lmps

#endif  // LMPS_SERVER_SHARD_TEST_UTIL_H_
