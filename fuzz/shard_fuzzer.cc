// Fuzzes ParameterShard (server/shard.h), a parameter server's request
// handling without the network. Each input picks a layout (dp replicas,
// shards, which shard this is) and a consistency mode (SYNC,
// BOUNDED_STALENESS with s = 1 or 2, ASYNC), then runs a sequence of
// operations: Push streams -- arbitrary protobuf bytes as a hostile client
// could send, or well-formed pushes of this shard's chunks with fuzzed
// values (NaN/Inf included), steps and ranks, optionally with one field
// corrupted -- GradNorm, Apply, Pull and TensorInfo with fuzzed arguments.
//
// In SYNC a second shard serves as a synchronous backup (server/
// replication.h) and gets Replicate streams: forwarded well-formed pushes,
// applies and stops with fuzzed arguments, snapshots of the first shard
// with one field sometimes corrupted, and arbitrary protobuf bytes; a
// rejected one changes none of its parameters, and an accepted snapshot
// makes it a bit-exact copy.
//
// Properties: no crash or undefined behaviour; the version never goes back;
// a rejected Push changes no parameter; a successful Pull returns slices of
// this shard's chunks, inside them, whole elements of the asked dtype, with
// a version >= the step asked minus the staleness bound (SYNC/SSP), and the
// staleness seen never exceeds the bound (SYNC/SSP).
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <google/protobuf/stubs/logging.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "fuzz/fuzz_check.h"
#include "proto/lmps.pb.h"
#include "server/replication.h"
#include "server/shard.h"

namespace lmps {
namespace {

constexpr int kMaxOps = 48;

struct Mode {
  const char* text;
  int staleness;
  bool async;
};
constexpr Mode kModes[] = {{"", 0, false},
                           {"mode: BOUNDED_STALENESS staleness: 1", 1, false},
                           {"mode: BOUNDED_STALENESS staleness: 2", 2, false},
                           {"mode: ASYNC", 0, true}};

std::vector<float> Params(const ParameterShard& shard) {
  std::vector<float> out;
  for (const ChunkData& c : shard.Snapshot().chunks) {
    out.insert(out.end(), c.params.begin(), c.params.end());
  }
  return out;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// A value for a gradient element: mostly small numbers, sometimes NaN, Inf
// or huge ones.
float Value(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 15)) {
    case 0:
      return NAN;
    case 1:
      return INFINITY;
    case 2:
      return in.ConsumeFloatingPoint<float>();
    default:
      return static_cast<float>(in.ConsumeIntegralInRange<int>(-1000, 1000)) /
             256.0f;
  }
}

std::string Encode(const std::vector<float>& values, DType dtype) {
  std::string out;
  for (float v : values) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    if (dtype == BF16) {
      const uint16_t half = static_cast<uint16_t>(bits >> 16);
      out.append(reinterpret_cast<const char*>(&half), 2);
    } else {
      out.append(reinterpret_cast<const char*>(&bits), 4);
    }
  }
  return out;
}

class Harness {
 public:
  // Null if the fuzzed layout is not a valid job (never, by construction).
  static std::unique_ptr<Harness> Create(FuzzedDataProvider& in) {
    auto h = std::unique_ptr<Harness>(new Harness);
    h->dp_ = in.ConsumeIntegralInRange<int>(1, 2);
    const int num_shards = in.ConsumeIntegralInRange<int>(1, 2);
    const int shard = in.ConsumeIntegralInRange<int>(0, num_shards - 1);
    const Mode& mode =
        kModes[in.ConsumeIntegralInRange<size_t>(0, std::size(kModes) - 1)];
    absl::StatusOr<JobSpec> spec = ParseJobSpec(absl::StrCat(
        "model { n_layer: 1 n_head: 1 n_embd: 4 block_size: 4 }\n"
        "max_chunk_bytes: 256\nmax_message_bytes: 1024\n"
        "optimizer { type: ",
        in.ConsumeBool() ? "ADAMW" : "SGD",
        " }\n"
        "train { batch_size: 4 steps: 6 checkpoint_interval: 2 ",
        mode.text, " }\nlayout { dp: ", h->dp_, " num_shards: ", num_shards,
        " }\n"));
    if (!spec.ok()) {
      // A mode this build does not know (or rejects): plain SYNC.
      spec = ParseJobSpec(absl::StrCat(
          "model { n_layer: 1 n_head: 1 n_embd: 4 block_size: 4 }\n"
          "max_chunk_bytes: 256\nmax_message_bytes: 1024\n"
          "train { batch_size: 4 steps: 6 }\nlayout { dp: ",
          h->dp_, " num_shards: ", num_shards, " }\n"));
      LMPS_FUZZ_CHECK(spec.ok(), spec.status().ToString());
      h->staleness_ = 0;
      h->async_ = false;
    } else {
      h->staleness_ = mode.staleness;
      h->async_ = mode.async;
    }
    absl::StatusOr<PartitionMap> map = ComputePartition(
        spec->model(), num_shards, spec->max_chunk_bytes());
    LMPS_FUZZ_CHECK(map.ok(), map.status().ToString());
    ShardOptions options;
    options.shard = shard;
    options.spec = *spec;
    options.map = *map;
    options.wait_timeout = absl::Milliseconds(1);
    absl::StatusOr<std::unique_ptr<ParameterShard>> created =
        ParameterShard::Create(std::move(options));
    LMPS_FUZZ_CHECK(created.ok(), created.status().ToString());
    h->shard_ = std::move(*created);
    h->chunks_ = ChunksOfShard(*map, shard);
    for (const ChunkDesc& c : map->chunks()) h->all_chunks_[{c.tensor(), c.index()}] = c;
    for (const ChunkDesc& c : h->chunks_) h->tensors_.push_back(c.tensor());
    h->partition_version_ = map->version();
    if (!h->async_ && h->staleness_ == 0) {
      ShardOptions backup;
      backup.shard = shard;
      backup.spec = *spec;
      backup.map = *map;
      backup.wait_timeout = absl::Milliseconds(1);
      absl::StatusOr<std::unique_ptr<ParameterShard>> b =
          ParameterShard::Create(std::move(backup));
      LMPS_FUZZ_CHECK(b.ok(), b.status().ToString());
      h->backup_ = std::move(*b);
      ReplicationOptions ro;
      ro.node_id = "backup";
      ro.backup = true;
      ro.awaiting_snapshot = in.ConsumeBool();
      ro.max_message_bytes = in.ConsumeIntegralInRange<int>(1, 300);
      absl::StatusOr<std::unique_ptr<ReplicatedShard>> r =
          ReplicatedShard::Create(h->backup_.get(), ro);
      LMPS_FUZZ_CHECK(r.ok(), r.status().ToString());
      h->replica_ = std::move(*r);
    }
    return h;
  }

  void Step(FuzzedDataProvider& in) {
    const int64_t before = shard_->version();
    switch (in.ConsumeIntegralInRange<int>(0, 7)) {
      case 0:
      case 1:
        Push(in, WellFormedPush(in));
        break;
      case 2:
        Push(in, RawPush(in));
        break;
      case 3:
        (void)shard_->GradNorm(FuzzedStep(in), absl::Now());
        break;
      case 4: {
        const int64_t step = FuzzedStep(in);
        const double gss = in.ConsumeBool()
                               ? in.ConsumeFloatingPoint<double>()
                               : in.ConsumeIntegralInRange<int>(0, 100) / 10.0;
        absl::StatusOr<int64_t> v = shard_->Apply(step, gss);
        if (v.ok()) {
          LMPS_FUZZ_CHECK(*v >= before,
                          absl::StrCat("Apply returned ", *v, " < ", before));
        }
        break;
      }
      case 5:
        Pull(in);
        break;
      case 6: {
        const std::string name =
            in.ConsumeBool() && !tensors_.empty()
                ? tensors_[in.ConsumeIntegralInRange<size_t>(0, tensors_.size() - 1)]
                : in.ConsumeRandomLengthString(24);
        absl::StatusOr<TensorInfoResponse> info = shard_->TensorInfo(name);
        (void)info;
        break;
      }
      case 7:
        if (replica_ != nullptr) Replicate(in);
        break;
    }
    const int64_t after = shard_->version();
    LMPS_FUZZ_CHECK(after >= before,
                    absl::StrCat("version went back from ", before, " to ", after));
    if (!async_) {
      LMPS_FUZZ_CHECK(shard_->max_staleness_seen() <= staleness_,
                      absl::StrCat("staleness ", shard_->max_staleness_seen(),
                                   " > bound ", staleness_));
    }
  }

  void Shutdown() {
    shard_->Shutdown();
    if (backup_ != nullptr) backup_->Shutdown();
  }

 private:
  Harness() = default;

  int64_t FuzzedStep(FuzzedDataProvider& in) {
    if (in.ConsumeIntegralInRange<int>(0, 15) == 0) {
      return in.ConsumeIntegral<int64_t>();
    }
    return shard_->version() + in.ConsumeIntegralInRange<int>(-1, 3);
  }

  // Pushes for every (or nearly every) chunk of this shard, each chunk
  // cut into one or two slices, in a stream of one to three messages;
  // sometimes one field is corrupted.
  std::vector<PushRequest> WellFormedPush(FuzzedDataProvider& in) {
    const int rank = in.ConsumeIntegralInRange<int>(0, 15) == 0
                         ? in.ConsumeIntegralInRange<int>(-1, dp_ + 1)
                         : in.ConsumeIntegralInRange<int>(0, dp_ - 1);
    const int64_t step = FuzzedStep(in);
    const DType dtype = in.ConsumeIntegralInRange<int>(0, 3) == 0 ? BF16 : F32;
    std::vector<ChunkSlice> slices;
    for (const ChunkDesc& c : chunks_) {
      if (in.ConsumeIntegralInRange<int>(0, 31) == 0) continue;  // a gap
      const int64_t n = c.end() - c.begin();
      const int64_t cut = in.ConsumeBool() ? n : in.ConsumeIntegralInRange<int64_t>(0, n);
      for (const auto& [from, to] : {std::pair<int64_t, int64_t>{0, cut},
                                     std::pair<int64_t, int64_t>{cut, n}}) {
        if (from == to) continue;
        std::vector<float> values(to - from);
        // Mostly one fuzzed value per slice, repeated, so that inputs stay
        // short; sometimes every element fuzzed.
        if (in.ConsumeIntegralInRange<int>(0, 7) == 0) {
          for (float& v : values) v = Value(in);
        } else {
          const float v = Value(in);
          for (size_t i = 0; i < values.size(); ++i) {
            values[i] = std::isfinite(v) ? v + static_cast<float>(i) / 64 : v;
          }
        }
        ChunkSlice s;
        s.set_tensor(c.tensor());
        s.set_chunk(c.index());
        s.set_offset(from);
        s.set_dtype(dtype);
        s.set_data(Encode(values, dtype));
        slices.push_back(std::move(s));
      }
    }
    if (!slices.empty() && in.ConsumeIntegralInRange<int>(0, 3) == 0) {
      ChunkSlice& s = slices[in.ConsumeIntegralInRange<size_t>(0, slices.size() - 1)];
      switch (in.ConsumeIntegralInRange<int>(0, 6)) {
        case 0: s.set_offset(s.offset() + in.ConsumeIntegralInRange<int>(-2, 2)); break;
        case 1: s.set_offset(in.ConsumeIntegral<int64_t>()); break;
        case 2: s.set_chunk(s.chunk() + in.ConsumeIntegralInRange<int>(-1, 1)); break;
        case 3: s.set_tensor(in.ConsumeRandomLengthString(16)); break;
        case 4: s.set_dtype(static_cast<DType>(in.ConsumeIntegralInRange<int>(0, 3))); break;
        case 5: s.mutable_data()->resize(in.ConsumeIntegralInRange<size_t>(0, s.data().size() + 3)); break;
        case 6: slices.push_back(s); break;  // the same slice twice
      }
    }
    const int messages = in.ConsumeIntegralInRange<int>(1, 3);
    std::vector<PushRequest> stream(messages);
    for (int m = 0; m < messages; ++m) {
      PushRequest& r = stream[m];
      r.set_worker_id(absl::StrCat("worker-", rank));
      r.set_dp_rank(rank);
      r.set_step(step);
      r.set_partition_version(in.ConsumeIntegralInRange<int>(0, 31) == 0
                                  ? partition_version_ + 1
                                  : partition_version_);
      if (m > 0 && in.ConsumeIntegralInRange<int>(0, 15) == 0) {
        r.set_step(step == INT64_MAX ? 0 : step + 1);  // mixed headers
      }
    }
    for (size_t i = 0; i < slices.size(); ++i) {
      *stream[i % messages].add_slices() = std::move(slices[i]);
    }
    return stream;
  }

  // A snapshot of the first shard as its primary would send it.
  std::vector<ReplicateRequest> Snapshot(FuzzedDataProvider& in) {
    std::vector<ReplicateRequest> out;
    const ShardCheckpoint cp = shard_->Snapshot();
    const size_t per = in.ConsumeIntegralInRange<size_t>(1, 64);
    for (const ChunkData& c : cp.chunks) {
      for (size_t off = 0; off < c.params.size(); off += per) {
        const size_t n = std::min(per, c.params.size() - off);
        ReplicateRequest& m = out.emplace_back();
        m.set_shard(shard_->shard());
        ShardSnapshot* s = m.mutable_snapshot();
        s->set_version(cp.header.step);
        s->set_tensor(c.desc.tensor());
        s->set_chunk(c.desc.index());
        s->set_offset(static_cast<int64_t>(off));
        s->set_params(reinterpret_cast<const char*>(c.params.data() + off), 4 * n);
        for (const auto& b : c.state) {
          s->add_state(reinterpret_cast<const char*>(b.data() + off), 4 * n);
        }
      }
    }
    if (!out.empty() && in.ConsumeIntegralInRange<int>(0, 2) == 0) {
      ShardSnapshot* s =
          out[in.ConsumeIntegralInRange<size_t>(0, out.size() - 1)].mutable_snapshot();
      switch (in.ConsumeIntegralInRange<int>(0, 5)) {
        case 0: s->set_offset(in.ConsumeIntegral<int64_t>()); break;
        case 1: s->set_tensor(in.ConsumeRandomLengthString(16)); break;
        case 2: s->mutable_params()->resize(in.ConsumeIntegralInRange<size_t>(0, s->params().size() + 5)); break;
        case 3: s->clear_state(); break;
        case 4: s->set_version(in.ConsumeIntegral<int64_t>()); break;
        case 5: out.pop_back(); break;
      }
    }
    return out;
  }

  void Replicate(FuzzedDataProvider& in) {
    std::vector<ReplicateRequest> stream;
    bool snapshot = false;
    switch (in.ConsumeIntegralInRange<int>(0, 4)) {
      case 0:
        for (PushRequest& p : WellFormedPush(in)) {
          stream.emplace_back().set_shard(shard_->shard());
          *stream.back().mutable_push() = std::move(p);
        }
        break;
      case 1: {
        stream.emplace_back().set_shard(shard_->shard());
        ApplyRequest* a = stream.back().mutable_apply();
        a->set_step(FuzzedStep(in));
        a->set_global_sum_squares(in.ConsumeIntegralInRange<int>(-1, 100) / 10.0);
        break;
      }
      case 2:
        stream = Snapshot(in);
        snapshot = true;
        break;
      case 3:
        stream.resize(in.ConsumeIntegralInRange<int>(0, 3));
        for (ReplicateRequest& r : stream) {
          (void)r.ParseFromString(in.ConsumeRandomLengthString(512));
        }
        break;
      case 4:
        stream.emplace_back().set_shard(shard_->shard());
        stream.back().mutable_stop_at()->set_step(FuzzedStep(in));
        break;
    }
    const std::vector<float> before = Params(*backup_);
    const int64_t version = backup_->version();
    absl::StatusOr<ReplicateResponse> r = replica_->Replicate(stream);
    if (!r.ok()) {
      LMPS_FUZZ_CHECK(backup_->version() == version,
                      "a rejected Replicate changed the version: " + r.status().ToString());
      LMPS_FUZZ_CHECK(SameBits(before, Params(*backup_)),
                      "a rejected Replicate changed parameters: " + r.status().ToString());
    } else if (snapshot) {
      LMPS_FUZZ_CHECK(SameBits(Params(*shard_), Params(*backup_)),
                      "an accepted snapshot is not an exact copy");
      LMPS_FUZZ_CHECK(backup_->version() == shard_->version(),
                      "an accepted snapshot has another version");
    }
    (void)replica_->CheckServing();  // no probe: it stays a backup
  }

  std::vector<PushRequest> RawPush(FuzzedDataProvider& in) {
    std::vector<PushRequest> stream(in.ConsumeIntegralInRange<int>(0, 3));
    for (PushRequest& r : stream) {
      (void)r.ParseFromString(in.ConsumeRandomLengthString(512));
    }
    return stream;
  }

  void Push(FuzzedDataProvider& in, const std::vector<PushRequest>& stream) {
    (void)in;
    const std::vector<float> before = Params(*shard_);
    const int64_t version = shard_->version();
    absl::StatusOr<PushResponse> r = shard_->Push(stream);
    if (!r.ok()) {
      LMPS_FUZZ_CHECK(shard_->version() == version,
                      "a rejected push changed the version: " + r.status().ToString());
      LMPS_FUZZ_CHECK(SameBits(before, Params(*shard_)),
                      "a rejected push changed parameters: " + r.status().ToString());
    } else if (!async_) {
      LMPS_FUZZ_CHECK(SameBits(before, Params(*shard_)),
                      "a SYNC/SSP push changed parameters before Apply");
    }
  }

  void Pull(FuzzedDataProvider& in) {
    PullRequest req;
    if (in.ConsumeIntegralInRange<int>(0, 7) == 0) {
      (void)req.ParseFromString(in.ConsumeRandomLengthString(128));
    } else {
      req.set_step(FuzzedStep(in));
      req.set_partition_version(in.ConsumeBool() ? partition_version_ : 0);
      req.set_dtype(in.ConsumeBool() ? BF16 : F32);
      const int n = in.ConsumeIntegralInRange<int>(0, 2);
      for (int i = 0; i < n && !tensors_.empty(); ++i) {
        req.add_tensors(tensors_[in.ConsumeIntegralInRange<size_t>(0, tensors_.size() - 1)]);
      }
    }
    absl::StatusOr<std::vector<PullResponse>> r = shard_->Pull(req, absl::Now());
    if (!r.ok()) return;
    const int size = req.dtype() == BF16 ? 2 : 4;
    for (const PullResponse& p : *r) {
      if (!async_) {
        LMPS_FUZZ_CHECK(p.version() + staleness_ >= req.step(),
                        absl::StrCat("pulled version ", p.version(), " for step ",
                                     req.step(), " with staleness ", staleness_));
      }
      for (const ChunkSlice& s : p.slices()) {
        auto it = all_chunks_.find({s.tensor(), s.chunk()});
        LMPS_FUZZ_CHECK(it != all_chunks_.end(), s.tensor());
        LMPS_FUZZ_CHECK(it->second.shard() == shard_->shard(), s.tensor());
        LMPS_FUZZ_CHECK(s.data().size() % size == 0, s.tensor());
        const int64_t n = static_cast<int64_t>(s.data().size()) / size;
        LMPS_FUZZ_CHECK(s.offset() >= 0 &&
                            s.offset() + n <= it->second.end() - it->second.begin(),
                        absl::StrCat(s.tensor(), " offset ", s.offset(), " n ", n));
      }
    }
  }

  int dp_ = 1;
  int staleness_ = 0;
  bool async_ = false;
  uint64_t partition_version_ = 0;
  std::unique_ptr<ParameterShard> shard_;
  std::unique_ptr<ParameterShard> backup_;     // SYNC: a backup of shard_
  std::unique_ptr<ReplicatedShard> replica_;  // its replication (backup)
  std::vector<ChunkDesc> chunks_;
  std::map<std::pair<std::string, int>, ChunkDesc> all_chunks_;
  std::vector<std::string> tensors_;
};

}  // namespace
}  // namespace lmps

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  // Parsing hostile bytes makes protobuf log every invalid UTF-8 string.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  std::unique_ptr<lmps::Harness> h = lmps::Harness::Create(in);
  for (int op = 0; op < lmps::kMaxOps && in.remaining_bytes() > 0; ++op) {
    h->Step(in);
  }
  h->Shutdown();
  return 0;
}
