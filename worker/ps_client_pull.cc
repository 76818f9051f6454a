// PsClient's pulls (worker/ps_client.h): per shard one or several
// concurrent raw server-streaming calls whose messages are parsed in place
// and decoded straight into the caller's buffers.
#include <algorithm>
#include <cstring>
#include <iterator>
#include <optional>
#include <set>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "common/model/bf16.h"
#include "common/rpc/status_util.h"
#include "common/shm/payloads.h"
#include "common/wire/chunk_wire.h"
#include "common/wire/raw_call.h"
#include "worker/ps_client.h"

namespace lmps {
namespace {

// The raw pull method (ParameterServer in proto/lmps.proto).
const char kPullMethod[] = "/lmps.ParameterServer/Pull";

}  // namespace

absl::Status PsClient::PullShard(int64_t step, int s,
                                 const std::set<std::string>* tensors,
                                 float* params, int64_t* version,
                                 absl::Span<float* const> state) {
  int64_t expected = 0;
  for (const LocalPiece& p : pull_pieces_[s]) {
    if (tensors == nullptr || tensors->count(p.tensor) > 0) expected += p.n;
  }
  const int streams = StreamsPerShard();
  std::vector<int64_t> received(streams, 0), versions(streams, 0);
  std::vector<absl::Status> results(streams);
  std::vector<std::thread> threads;
  for (int k = 1; k < streams; ++k) {
    threads.emplace_back([&, k] {
      results[k] = PullStream(step, s, tensors, params, &versions[k], state,
                              k, streams, &received[k]);
    });
  }
  results[0] = PullStream(step, s, tensors, params, &versions[0], state, 0,
                          streams, &received[0]);
  for (std::thread& t : threads) t.join();
  int64_t total = 0;
  for (int k = 0; k < streams; ++k) {
    LMPS_RETURN_IF_ERROR(results[k]);
    total += received[k];
  }
  *version = *std::min_element(versions.begin(), versions.end());
  if (total != expected) {
    return absl::DataLossError(absl::StrCat("pull of step ", step, " returned ",
                                            total, " of ", expected,
                                            " elements"));
  }
  return absl::OkStatus();
}

PullRequest PsClient::MakePullRequest(int64_t step,
                                      const std::set<std::string>* tensors,
                                      bool with_state, int stream,
                                      int streams) const {
  PullRequest req;
  if (streams > 1) {
    req.set_stream(stream);
    req.set_streams(streams);
  }
  req.set_step(step);
  req.set_with_optimizer_state(with_state);
  if (tensors != nullptr) {
    for (const std::string& t : *tensors) req.add_tensors(t);
  }
  req.set_partition_version(partition_version_);
  req.set_dtype(options_.pull_dtype);
  if (has_view_) {
    req.set_owned_only(true);
    req.set_pp_rank(pp_rank_);
    req.set_tp_rank(tp_rank_);
  }
  return req;
}

void PsClient::SetPullWindow(WindowPool* windows, int64_t window,
                             PullRequest* req) const {
  *req->mutable_shm() = windows->region().desc();
  req->set_shm_offset(window);
  req->set_shm_bytes(windows->window_bytes());
  req->set_first_message(0);
}

// Each message is parsed in place (common/wire/chunk_wire.h) and its
// payloads decoded straight from the received slices (or the window) into
// the sink's buffers.
absl::Status PsClient::ReceivePullMessage(const grpc::ByteBuffer& message,
                                          PullSink* sink) {
  PullResponseView& resp = sink->resp;
  LMPS_RETURN_IF_ERROR(ParsePullResponse(message, &resp));
  if (sink->region != nullptr) {
    LMPS_RETURN_IF_ERROR(AttachSharedPayloads(*sink->region, &resp.slices));
  } else if (HasSharedPayloads(resp.slices)) {
    return absl::DataLossError(
        "a pull answer names shared memory this worker did not offer");
  }
  // A shared-memory pull's later requests may see newer versions (not in
  // SYNC): the first one's is the pull's.
  if (sink->first_answer) *sink->version = resp.version;
  sink->first_answer = false;
  for (const ChunkSliceView& slice : resp.slices) {
    absl::Status got = ReceivePulledSlice(sink->shard, slice, sink->params,
                                          sink->state, sink->received);
    if (!got.ok()) sink->bad = got;
  }
  return absl::OkStatus();
}

absl::Status PsClient::PullThroughWindow(PullRequest* req, WindowPool* windows,
                                         PullSink* sink,
                                         const grpc::ByteBuffer* answered) {
  // The shard writes as many of the pull's messages as fit into the window
  // per request.
  sink->region = &windows->region();
  int32_t first = req->first_message();
  bool have = answered != nullptr;
  while (true) {
    req->set_first_message(first);
    sink->resp.next_message = 0;  // an answer without messages ends the pull
    absl::Status st;
    if (have) {
      st = ReceivePullMessage(*answered, sink);
      have = false;
    } else {
      st = RawPull(*req, sink);
    }
    if (!st.ok()) return st;
    if (!sink->bad.ok() || sink->resp.next_message == 0) return sink->bad;
    if (sink->resp.next_message <= first) {
      return absl::DataLossError(absl::StrCat(
          "shard ", sink->shard, " answered a pull from message ", first,
          " with next_message ", sink->resp.next_message));
    }
    first = sink->resp.next_message;
  }
}

absl::Status PsClient::RawPull(const PullRequest& req, PullSink* sink) {
  auto ctx = Context();
  stats_.rpcs++;
  return ServerStreamingCall(
      Stub(sink->shard)->raw.get(), kPullMethod, ctx.get(), SerializeProto(req),
      [&](const grpc::ByteBuffer& m) { return ReceivePullMessage(m, sink); });
}

absl::Status PsClient::PullStream(int64_t step, int s,
                                  const std::set<std::string>* tensors,
                                  float* params, int64_t* version,
                                  absl::Span<float* const> state, int stream,
                                  int streams, int64_t* received) {
  PullRequest req =
      MakePullRequest(step, tensors, !state.empty(), stream, streams);
  const PullSink fresh{.shard = s,
                       .params = params,
                       .state = state,
                       .version = version,
                       .received = received};
  PullSink sink = fresh;
  WindowPool* windows = state.empty() ? SharedWindows(s) : nullptr;
  std::optional<int64_t> window;
  if (windows != nullptr) window = windows->Acquire();
  if (window.has_value()) {
    // Through shared memory.
    absl::Status st;
    {
      absl::Cleanup release = [&] { windows->Release(*window); };
      SetPullWindow(windows, *window, &req);
      st = PullThroughWindow(&req, windows, &sink, nullptr);
    }
    if (!SharedMemoryRefused(s, st)) return st;
    // Refused at the first request: the whole pull over the socket.
    req = MakePullRequest(step, tensors, !state.empty(), stream, streams);
    sink = fresh;
    *received = 0;
  }
  LMPS_RETURN_IF_ERROR(RawPull(req, &sink));
  return sink.bad;
}

absl::Status PsClient::ReceivePulledSlice(int s, const ChunkSliceView& slice,
                                          float* params,
                                          absl::Span<float* const> state,
                                          int64_t* received) {
  const DType got = slice.dtype == BF16 ? BF16 : F32;
  if (got != options_.pull_dtype ||
      (slice.dtype != F32 && slice.dtype != BF16 &&
       slice.dtype != DTYPE_UNSPECIFIED)) {
    return absl::DataLossError(absl::StrCat(
        "pull asked for ", DType_Name(options_.pull_dtype), " but a slice of ",
        slice.tensor, "#", slice.chunk, " came as dtype ",
        static_cast<int>(slice.dtype)));
  }
  const int width = got == BF16 ? 2 : 4;
  const int64_t n = static_cast<int64_t>(slice.data.size() / width);
  // The piece holding the slice's first element.
  const LocalPiece* piece = nullptr;
  auto it = index_[s].find({slice.tensor, slice.chunk});
  if (it != index_[s].end()) {
    auto next = std::upper_bound(
        it->second.begin(), it->second.end(), slice.offset,
        [](int64_t v, const LocalPiece* p) { return v < p->chunk_offset; });
    if (next != it->second.begin()) piece = *std::prev(next);
  }
  if (piece == nullptr || slice.data.size() % width != 0 ||
      slice.offset + n > piece->chunk_offset + piece->n) {
    return absl::DataLossError(absl::StrCat(
        "pull returned a slice outside the parts of this shard's chunks "
        "this worker holds: ",
        slice.tensor, "#", slice.chunk, " elements [", slice.offset, ", ",
        slice.offset + n, ")"));
  }
  const int64_t local =
      piece->local_offset + (slice.offset - piece->chunk_offset);
  if (slice.state.size() != state.size()) {
    return absl::DataLossError(absl::StrCat(
        "pull asked for ", state.size(),
        " optimizer state buffers but a slice of ", slice.tensor, "#",
        slice.chunk, " came with ", slice.state.size(),
        " (the shards run another optimizer?)"));
  }
  for (const ByteSpans& buffer : slice.state) {
    if (buffer.size() != static_cast<size_t>(n) * 4) {
      return absl::DataLossError(absl::StrCat(
          "a slice of ", slice.tensor, "#", slice.chunk,
          " has optimizer state of another length than its ", n,
          " parameters"));
    }
  }
  float* dst = params + local;
  slice.data.ForEachElements(
      width, [&](const char* bytes, int64_t first, int64_t count) {
        if (got == BF16) {
          Bf16ToFloat(bytes, count, dst + first);
        } else {
          std::memcpy(dst + first, bytes, count * 4);
        }
      });
  for (size_t k = 0; k < state.size(); ++k) {
    float* out = state[k] + local;
    slice.state[k].ForEachElements(
        4, [&](const char* bytes, int64_t first, int64_t count) {
          std::memcpy(out + first, bytes, count * 4);
        });
    stats_.bytes_pulled += static_cast<int64_t>(slice.state[k].size());
  }
  *received += n;
  stats_.bytes_pulled += static_cast<int64_t>(slice.data.size());
  if (slice.shm_bytes > 0) stats_.bytes_shared += slice.shm_bytes;
  return absl::OkStatus();
}

absl::Status PsClient::Pull(int64_t step, float* params,
                            int64_t* min_version) {
  return PullAll(step, params, {}, min_version);
}

absl::Status PsClient::PullWithOptimizerState(
    int64_t step, float* params, absl::Span<float* const> state,
    int64_t* min_version) {
  if (options_.pull_dtype != F32) {
    return absl::FailedPreconditionError(
        "pulling the optimizer state needs fp32 pulls (train.pull_dtype F32)");
  }
  return PullAll(step, params, state, min_version);
}

absl::Status PsClient::PullAll(int64_t step, float* params,
                               absl::Span<float* const> state,
                               int64_t* min_version) {
  std::vector<int64_t> versions(stubs_.size(), 0);
  LMPS_RETURN_IF_ERROR(ForEachShard(pull_shards_, [&](int s) -> absl::Status {
    return PullShard(step, s, nullptr, params, &versions[s], state);
  }));
  if (min_version != nullptr && !pull_shards_.empty()) {
    int64_t v = versions[pull_shards_[0]];
    for (int s : pull_shards_) v = std::min(v, versions[s]);
    *min_version = v;
  }
  return absl::OkStatus();
}

absl::Status PsClient::PullTensors(int64_t step, int shard,
                                   const std::set<std::string>& tensors,
                                   float* params, int64_t* version) {
  int64_t v = 0;
  const absl::Status st = CallWithFailover(shard, [&](int s) {
    return PullShard(step, s, &tensors, params, &v);
  });
  if (!st.ok()) return Annotate(shard, st);
  if (version != nullptr) *version = v;
  return absl::OkStatus();
}

int64_t PsClient::HeldElements(int shard,
                               const std::set<std::string>& tensors) const {
  int64_t n = 0;
  for (const LocalPiece& p : pull_pieces_[shard]) {
    if (tensors.count(p.tensor) > 0) n += p.n;
  }
  return n;
}

}  // namespace lmps
