#include "worker/ps_client.h"

#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/bf16.h"
#include "common/model_spec.h"
#include "common/status_util.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<PsClient>> PsClient::Create(
    const ModelConfig& model, const PartitionMap& partition,
    std::vector<std::unique_ptr<ParameterServer::StubInterface>> stubs,
    std::vector<std::string> addresses, const PsClientOptions& options) {
  if (static_cast<int>(stubs.size()) != partition.num_shards() ||
      addresses.size() != stubs.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "partition has ", partition.num_shards(), " shards but ",
        stubs.size(), " stubs and ", addresses.size(), " addresses"));
  }
  if (options.push_dtype != F32 && options.push_dtype != BF16) {
    return absl::InvalidArgumentError("push dtype must be F32 or BF16");
  }
  std::unique_ptr<PsClient> c(new PsClient());
  c->options_ = options;
  c->partition_version_ = partition.version();
  c->stubs_ = std::move(stubs);
  c->addresses_ = std::move(addresses);
  std::map<std::string, int64_t> offsets;
  for (const TensorSpec& s : GptTensorSpecs(model)) {
    offsets[s.name] = c->num_parameters_;
    c->num_parameters_ += s.num_elements();
  }
  c->chunks_.resize(partition.num_shards());
  for (const ChunkDesc& d : partition.chunks()) {
    auto it = offsets.find(d.tensor());
    if (it == offsets.end() || d.shard() < 0 ||
        d.shard() >= partition.num_shards()) {
      return absl::InvalidArgumentError(
          absl::StrCat("partition names unknown tensor or shard: ",
                       d.ShortDebugString()));
    }
    c->chunks_[d.shard()].push_back({d, it->second + d.begin()});
  }
  c->index_.resize(partition.num_shards());
  for (int s = 0; s < partition.num_shards(); ++s) {
    for (const Chunk& ch : c->chunks_[s]) {
      c->index_[s][{ch.desc.tensor(), ch.desc.index()}] = &ch;
    }
  }
  return c;
}

absl::Status PsClient::ForEachShard(
    const std::function<absl::Status(int)>& fn) {
  const int n = static_cast<int>(stubs_.size());
  std::vector<absl::Status> results(n);
  std::vector<std::thread> threads;
  for (int s = 1; s < n; ++s) {
    threads.emplace_back([&, s] { results[s] = fn(s); });
  }
  results[0] = fn(0);
  for (std::thread& t : threads) t.join();
  for (int s = 0; s < n; ++s) {
    if (!results[s].ok()) return Annotate(s, results[s]);
  }
  return absl::OkStatus();
}

absl::Status PsClient::Annotate(int shard, const absl::Status& status) const {
  return absl::Status(status.code(),
                      absl::StrCat("parameter server shard ", shard, " (",
                                   addresses_[shard], "): ", status.message()));
}

std::unique_ptr<grpc::ClientContext> PsClient::Context() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
  return ctx;
}

absl::Status PsClient::Pull(int64_t step, float* params,
                            int64_t* min_version) {
  std::vector<int64_t> versions(stubs_.size(), 0);
  LMPS_RETURN_IF_ERROR(ForEachShard([&](int s) -> absl::Status {
    PullRequest req;
    req.set_step(step);
    req.set_partition_version(partition_version_);
    req.set_dtype(F32);
    auto ctx = Context();
    std::unique_ptr<grpc::ClientReaderInterface<PullResponse>> reader =
        stubs_[s]->Pull(ctx.get(), req);
    stats_.rpcs++;
    PullResponse resp;
    int64_t received = 0, expected = 0;
    for (const Chunk& ch : chunks_[s]) expected += ch.desc.end() - ch.desc.begin();
    absl::Status bad;
    while (reader->Read(&resp)) {
      versions[s] = resp.version();
      for (const ChunkSlice& slice : resp.slices()) {
        auto it = index_[s].find({slice.tensor(), slice.chunk()});
        const size_t width = slice.dtype() == BF16 ? 2 : 4;
        const int64_t n = static_cast<int64_t>(slice.data().size() / width);
        if (it == index_[s].end() || slice.offset() < 0 ||
            slice.data().size() % width != 0 ||
            slice.offset() + n > it->second->desc.end() - it->second->desc.begin()) {
          bad = absl::DataLossError(absl::StrCat(
              "pull returned a slice outside this shard's chunks: ",
              slice.tensor(), "#", slice.chunk()));
          continue;
        }
        float* dst = params + it->second->flat_offset + slice.offset();
        if (slice.dtype() == BF16) {
          Bf16ToFloat(slice.data().data(), n, dst);
        } else {
          std::memcpy(dst, slice.data().data(), n * 4);
        }
        received += n;
        stats_.bytes_pulled += static_cast<int64_t>(slice.data().size());
      }
    }
    LMPS_RETURN_IF_ERROR(FromGrpcStatus(reader->Finish()));
    LMPS_RETURN_IF_ERROR(bad);
    if (received != expected) {
      return absl::DataLossError(absl::StrCat("pull of step ", step, " returned ",
                                              received, " of ", expected,
                                              " elements"));
    }
    return absl::OkStatus();
  }));
  if (min_version != nullptr) {
    *min_version = *std::min_element(versions.begin(), versions.end());
  }
  return absl::OkStatus();
}

absl::Status PsClient::Push(int64_t step, const std::string& worker_id,
                            int dp_rank, const float* grads) {
  return ForEachShard([&](int s) -> absl::Status {
    if (options_.on_shard_push) options_.on_shard_push(s, step, false);
    PushResponse resp;
    auto ctx = Context();
    std::unique_ptr<grpc::ClientWriterInterface<PushRequest>> writer =
        stubs_[s]->Push(ctx.get(), &resp);
    stats_.rpcs++;
    const size_t width = options_.push_dtype == BF16 ? 2 : 4;
    const int64_t max_elems =
        std::max<int64_t>(1, options_.max_message_bytes / static_cast<int64_t>(width));
    PushRequest msg;
    int64_t in_msg = 0;
    auto reset = [&] {
      msg.Clear();
      msg.set_worker_id(worker_id);
      msg.set_dp_rank(dp_rank);
      msg.set_step(step);
      msg.set_partition_version(partition_version_);
      in_msg = 0;
    };
    bool ok = true;
    auto flush = [&] {
      if (msg.slices_size() == 0) return;
      stats_.bytes_pushed += in_msg * static_cast<int64_t>(width);
      ok = ok && writer->Write(msg);
      reset();
    };
    reset();
    for (const Chunk& ch : chunks_[s]) {
      const int64_t len = ch.desc.end() - ch.desc.begin();
      for (int64_t off = 0; off < len && ok;) {
        if (in_msg == max_elems) flush();
        const int64_t n = std::min(len - off, max_elems - in_msg);
        ChunkSlice* slice = msg.add_slices();
        slice->set_tensor(ch.desc.tensor());
        slice->set_chunk(ch.desc.index());
        slice->set_offset(off);
        slice->set_dtype(options_.push_dtype);
        const float* src = grads + ch.flat_offset + off;
        std::string* data = slice->mutable_data();
        data->resize(n * width);
        if (options_.push_dtype == BF16) {
          FloatToBf16(src, n, data->data());
        } else {
          std::memcpy(data->data(), src, n * 4);
        }
        in_msg += n;
        off += n;
      }
    }
    flush();
    writer->WritesDone();
    LMPS_RETURN_IF_ERROR(FromGrpcStatus(writer->Finish()));
    if (options_.on_shard_push) options_.on_shard_push(s, step, true);
    return absl::OkStatus();
  });
}

absl::StatusOr<double> PsClient::GradNorm(int64_t step) {
  std::vector<double> parts(stubs_.size(), 0.0);
  LMPS_RETURN_IF_ERROR(ForEachShard([&](int s) -> absl::Status {
    GradNormRequest req;
    req.set_step(step);
    GradNormResponse resp;
    auto ctx = Context();
    stats_.rpcs++;
    LMPS_RETURN_IF_ERROR(FromGrpcStatus(stubs_[s]->GradNorm(ctx.get(), req, &resp)));
    parts[s] = resp.sum_squares();
    return absl::OkStatus();
  }));
  double total = 0;
  for (double p : parts) total += p;  // in shard order: deterministic
  return total;
}

absl::StatusOr<int64_t> PsClient::Apply(int64_t step, double global_sum_squares) {
  std::vector<int64_t> versions(stubs_.size(), 0);
  LMPS_RETURN_IF_ERROR(ForEachShard([&](int s) -> absl::Status {
    ApplyRequest req;
    req.set_step(step);
    req.set_global_sum_squares(global_sum_squares);
    ApplyResponse resp;
    auto ctx = Context();
    stats_.rpcs++;
    LMPS_RETURN_IF_ERROR(FromGrpcStatus(stubs_[s]->Apply(ctx.get(), req, &resp)));
    versions[s] = resp.version();
    return absl::OkStatus();
  }));
  for (size_t s = 1; s < versions.size(); ++s) {
    if (versions[s] != versions[0]) {
      return absl::InternalError(absl::StrCat(
          "shards disagree on the version after step ", step, ": shard 0 at ",
          versions[0], ", shard ", s, " at ", versions[s]));
    }
  }
  return versions[0];
}

absl::StatusOr<int64_t> PsClient::ApplyBounded(int64_t step,
                                               double global_sum_squares) {
  std::vector<int64_t> versions(stubs_.size(), 0);
  LMPS_RETURN_IF_ERROR(ForEachShard([&](int s) -> absl::Status {
    ApplyRequest req;
    req.set_step(step);
    req.set_global_sum_squares(global_sum_squares);
    ApplyResponse resp;
    auto ctx = Context();
    stats_.rpcs++;
    LMPS_RETURN_IF_ERROR(FromGrpcStatus(stubs_[s]->Apply(ctx.get(), req, &resp)));
    if (resp.version() <= step) {
      return absl::InternalError(absl::StrCat("applied step ", step,
                                              " but the shard is at version ",
                                              resp.version()));
    }
    versions[s] = resp.version();
    return absl::OkStatus();
  }));
  return *std::min_element(versions.begin(), versions.end());
}

}  // namespace lmps

namespace lmps {

absl::StatusOr<std::vector<int64_t>> PsClient::Versions() {
  std::vector<int64_t> versions(stubs_.size(), 0);
  LMPS_RETURN_IF_ERROR(ForEachShard([&](int s) -> absl::Status {
    TensorInfoRequest req;
    req.set_tensor("wpe.weight");  // small; NotFound on shards without it
    TensorInfoResponse resp;
    auto ctx = Context();
    stats_.rpcs++;
    absl::Status st = FromGrpcStatus(stubs_[s]->GetTensorInfo(ctx.get(), req, &resp));
    if (st.code() == absl::StatusCode::kNotFound) {
      // This shard holds no part of wpe: ask for everything instead.
      grpc::ClientContext all;
      all.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
      req.clear_tensor();
      st = FromGrpcStatus(stubs_[s]->GetTensorInfo(&all, req, &resp));
    }
    LMPS_RETURN_IF_ERROR(st);
    versions[s] = resp.version();
    return absl::OkStatus();
  }));
  return versions;
}

}  // namespace lmps
