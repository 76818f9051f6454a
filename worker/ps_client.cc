#include "worker/ps_client.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "common/clients/shard_info.h"
#include "common/model/bf16.h"
#include "common/model/job_spec.h"
#include "common/model/model_spec.h"
#include "common/model/parallel_layout.h"
#include "common/rpc/status_util.h"
#include "common/shm/payloads.h"
#include "common/wire/raw_call.h"
#include "server/optimizer.h"
#include "worker/compression.h"

namespace lmps {

namespace {

// The raw push method (ParameterServer in proto/lmps.proto).
const char kPushMethod[] = "/lmps.ParameterServer/Push";

// Elements [begin, end) of a tensor; `local`: where `begin` sits in the
// local buffer (-1: not known).
struct Run {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t local = -1;
};

// Appends the pieces (PsClient::LocalPiece) of chunk `d` covered by `ranges`
// (sorted), placed at their offsets in the local buffer given by `held`
// (sorted, containing every range), merging a piece with the previous one
// when both are contiguous.
template <typename LocalPiece>
absl::Status AddPieces(const ChunkDesc& d, const std::vector<Run>& ranges,
                       const std::vector<Run>& held, std::vector<LocalPiece>* out) {
  for (const Run& r : ranges) {
    const int64_t b = std::max(r.begin, d.begin());
    const int64_t e = std::min(r.end, d.end());
    if (b >= e) continue;
    auto h = std::upper_bound(
        held.begin(), held.end(), b,
        [](int64_t v, const Run& x) { return v < x.begin; });
    if (h == held.begin() || std::prev(h)->end < e) {
      return absl::InternalError(absl::StrCat(
          "layout: pushed elements [", b, ", ", e, ") of tensor '",
          d.tensor(), "' are not held"));
    }
    --h;
    const int64_t local = h->local + (b - h->begin);
    if (!out->empty()) {
      LocalPiece& last = out->back();
      if (last.tensor == d.tensor() && last.chunk == d.index() &&
          last.chunk_offset + last.n == b - d.begin() &&
          last.local_offset + last.n == local) {
        last.n += e - b;
        continue;
      }
    }
    out->push_back({d.tensor(), d.index(), b - d.begin(), e - b, local});
  }
  return absl::OkStatus();
}

}  // namespace

bool IsCudaBackendName(const std::string& backend) {
  return backend == "cuda" || backend.rfind("cuda:", 0) == 0;
}

DType ResolvePullDtype(DType configured, const std::string& backend) {
  if (configured != DTYPE_UNSPECIFIED) return configured;
  return IsCudaBackendName(backend) ? BF16 : F32;
}

bool ResolveLayerwisePull(LayerwisePullMode configured,
                          const std::string& backend) {
  if (configured != LAYERWISE_PULL_DEFAULT) {
    return configured == LAYERWISE_PULL_ON;
  }
  return IsCudaBackendName(backend);
}

absl::StatusOr<std::unique_ptr<PsClient>> PsClient::Create(
    const ModelConfig& model, const PartitionMap& partition,
    std::vector<std::shared_ptr<grpc::Channel>> channels,
    std::vector<std::string> addresses, const PsClientOptions& options,
    const PsClientView& view) {
  if (static_cast<int>(channels.size()) != partition.num_shards() ||
      addresses.size() != channels.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "partition has ", partition.num_shards(), " shards but ",
        channels.size(), " channels and ", addresses.size(), " addresses"));
  }
  if (options.push_dtype != F32 && options.push_dtype != BF16) {
    return absl::InvalidArgumentError("push dtype must be F32 or BF16");
  }
  if (options.pull_dtype != F32 && options.pull_dtype != BF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pull dtype must be F32 or BF16, got ",
        DType_IsValid(options.pull_dtype) ? DType_Name(options.pull_dtype)
                                          : std::to_string(options.pull_dtype)));
  }
  if (absl::Status s = ValidateCompression(options.compression); !s.ok()) {
    return s;
  }
  if (options.compression.kind() != COMPRESSION_NONE &&
      options.push_dtype != F32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "train.compression ", CompressionKind_Name(options.compression.kind()),
        " sends its own encoding; the push dtype must be F32 (not bf16)"));
  }
  const std::vector<TensorSpec> specs = GptTensorSpecs(model);
  const ParallelLayout* layout = view.layout;
  if (layout != nullptr) {
    if (view.pp_rank < 0 || view.pp_rank >= layout->pp() ||
        view.tp_rank < 0 || view.tp_rank >= layout->tp()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "view pp_rank ", view.pp_rank, " tp_rank ", view.tp_rank,
          " is outside the layout (pp=", layout->pp(), " tp=", layout->tp(),
          ")"));
    }
    bool same = layout->tensors().size() == specs.size();
    for (size_t t = 0; same && t < specs.size(); ++t) {
      same = layout->tensors()[t].name == specs[t].name &&
             layout->tensors()[t].shape == specs[t].shape;
    }
    if (!same) {
      return absl::InvalidArgumentError(
          "the view's layout is of another model than the client's");
    }
  }
  std::unique_ptr<PsClient> c(new PsClient());
  c->options_ = options;
  c->partition_version_ = partition.version();
  for (std::shared_ptr<grpc::Channel>& channel : channels) {
    c->stubs_.push_back(std::make_unique<NodeStubs>(std::move(channel)));
  }
  c->shm_ = std::make_unique<PeerWindowPools>(c->stubs_.size(),
                                              options.shared_memory);
  c->addresses_ = std::move(addresses);
  c->has_view_ = layout != nullptr;
  c->pp_rank_ = view.pp_rank;
  c->tp_rank_ = view.tp_rank;

  // Per tensor: the held ranges with their local offsets (the whole tensor
  // without a view) and the pushed ones.
  std::map<std::string, int> tensor_of;
  std::vector<std::vector<Run>> held(specs.size()), pushed(specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    tensor_of[specs[t].name] = static_cast<int>(t);
    if (layout == nullptr) {
      held[t].push_back({0, specs[t].num_elements(), c->num_parameters_});
      c->num_parameters_ += specs[t].num_elements();
      pushed[t] = held[t];
      continue;
    }
    for (const auto& r : layout->Held(t, view.pp_rank, view.tp_rank)) {
      held[t].push_back({r.begin, r.end, c->num_parameters_});
      c->num_parameters_ += r.end - r.begin;
    }
    for (const auto& r : layout->Pushed(t, view.pp_rank, view.tp_rank)) {
      pushed[t].push_back({r.begin, r.end, -1});
    }
  }

  const int num_shards = partition.num_shards();
  c->pull_pieces_.resize(num_shards);
  c->push_pieces_.resize(num_shards);
  for (const ChunkDesc& d : partition.chunks()) {
    auto it = tensor_of.find(d.tensor());
    if (it == tensor_of.end() || d.shard() < 0 || d.shard() >= num_shards ||
        d.begin() < 0 || d.end() <= d.begin() ||
        d.end() > specs[it->second].num_elements()) {
      return absl::InvalidArgumentError(
          absl::StrCat("partition names unknown tensor or shard, or elements "
                       "outside the tensor: ",
                       d.ShortDebugString()));
    }
    const int t = it->second;
    LMPS_RETURN_IF_ERROR(
        AddPieces(d, held[t], held[t], &c->pull_pieces_[d.shard()]));
    LMPS_RETURN_IF_ERROR(
        AddPieces(d, pushed[t], held[t], &c->push_pieces_[d.shard()]));
  }
  c->index_.resize(num_shards);
  for (int s = 0; s < num_shards; ++s) {
    for (const LocalPiece& p : c->pull_pieces_[s]) {
      c->index_[s][{p.tensor, p.chunk}].push_back(&p);  // by chunk_offset
    }
    // Without a view every shard is pulled, as a version source.
    if (!c->pull_pieces_[s].empty() || layout == nullptr) {
      c->pull_shards_.push_back(s);
    }
    if (!c->push_pieces_[s].empty()) c->push_shards_.push_back(s);
  }
  c->compress_ = options.compression.kind() != COMPRESSION_NONE;
  if (c->compress_) {
    c->residual_[0].assign(c->num_parameters_, 0.0f);
    c->residual_[1].assign(c->num_parameters_, 0.0f);
  }
  return c;
}

absl::Status PsClient::ForEachShard(
    const std::function<absl::Status(int)>& fn) {
  std::vector<int> all(stubs_.size());
  for (size_t s = 0; s < all.size(); ++s) all[s] = static_cast<int>(s);
  return ForEachShard(all, fn);
}

absl::Status PsClient::ForEachShard(
    const std::vector<int>& shards,
    const std::function<absl::Status(int)>& fn) {
  const size_t n = shards.size();
  if (n == 0) return absl::OkStatus();
  std::vector<absl::Status> results(n);
  std::vector<std::thread> threads;
  for (size_t i = 1; i < n; ++i) {
    threads.emplace_back(
        [&, i] { results[i] = CallWithFailover(shards[i], fn); });
  }
  results[0] = CallWithFailover(shards[0], fn);
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < n; ++i) {
    if (!results[i].ok()) return Annotate(shards[i], results[i]);
  }
  return absl::OkStatus();
}

void PsClient::SetBackups(
    std::vector<std::string> backups, ChannelFactory make_channel,
    std::function<absl::StatusOr<ShardNodes>(int shard)> resolve) {
  backups.resize(stubs_.size());
  failover_.clear();
  node_stubs_.clear();
  node_stubs_.resize(stubs_.size());
  for (size_t s = 0; s < stubs_.size(); ++s) {
    failover_.emplace_back(static_cast<int>(s),
                           ShardFailover::Nodes{addresses_[s], backups[s]},
                           options_.failover_timeout);
  }
  make_channel_ = std::move(make_channel);
  resolve_ = std::move(resolve);
}

PsClient::NodeStubs::NodeStubs(std::shared_ptr<grpc::Channel> channel)
    : rpc(ParameterServer::NewStub(channel)),
      raw(std::make_unique<grpc::GenericStub>(channel)) {}

PsClient::NodeStubs* PsClient::Stub(int shard) {
  if (failover_.empty()) return stubs_[shard].get();
  const std::string& address = failover_[shard].current();
  if (address == addresses_[shard]) return stubs_[shard].get();
  std::unique_ptr<NodeStubs>& stub = node_stubs_[shard][address];
  if (stub == nullptr) {
    stub = std::make_unique<NodeStubs>(make_channel_(address));
  }
  return stub.get();
}

absl::Status PsClient::CallWithFailover(
    int shard, const std::function<absl::Status(int)>& fn) {
  // Not replicated (SetBackups never called).
  if (failover_.empty()) return fn(shard);
  ShardFailover& f = failover_[shard];
  f.Begin(absl::Now());
  ShardFailover::Resolver resolve;
  if (resolve_) {
    resolve = [&]() -> absl::StatusOr<ShardFailover::Nodes> {
      absl::StatusOr<ShardNodes> n = resolve_(shard);
      if (!n.ok()) return n.status();
      return ShardFailover::Nodes{n->primary, n->backup};
    };
  }
  absl::Status st = fn(shard);
  while (st.code() == absl::StatusCode::kUnavailable) {
    absl::StatusOr<absl::Duration> pause = f.Failed(st, absl::Now(), resolve);
    if (!pause.ok()) return pause.status();
    stats_.failovers++;
    absl::SleepFor(*pause);
    st = fn(shard);
  }
  return st;
}

std::string PsClient::Address(int shard) const {
  return failover_.empty() ? addresses_[shard] : failover_[shard].current();
}

absl::Status PsClient::Annotate(int shard, const absl::Status& status) const {
  return WithMessage(status, absl::StrCat("parameter server shard ", shard, " (",
                                          Address(shard), "): ", status.message()));
}

std::unique_ptr<grpc::ClientContext> PsClient::Context() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
  return ctx;
}

absl::Status PsClient::Push(int64_t step, const std::string& worker_id,
                            int dp_rank, const float* grads) {
  return PushChunks(step, worker_id, dp_rank, grads, {0, num_parameters_});
}

absl::Status PsClient::PushChunks(int64_t step, const std::string& worker_id,
                                  int dp_rank, const float* grads,
                                  ElementRange range, ElementRange done) {
  return PushChunksThen(step, worker_id, dp_rank, grads, range, done,
                        PUSH_THEN_NOTHING, "", nullptr);
}

absl::StatusOr<PsClient::PushedStep> PsClient::PushAndReduce(
    int64_t step, const std::string& worker_id, int dp_rank,
    const float* grads, float* next_params) {
  if (!pushes_to_every_shard()) {
    return absl::FailedPreconditionError(
        "PushAndReduce: this worker pushes to only some of the shards");
  }
  const PushThen then = num_shards() == 1 ? PUSH_THEN_APPLY : PUSH_THEN_NORM;
  // The next step's pull, answered with the push (one shard, through a
  // shared-memory window held until its answer is read).
  WindowPool* windows = next_params != nullptr && then == PUSH_THEN_APPLY &&
                                !replicated() && pull_shards_.size() == 1
                            ? SharedWindows(0)
                            : nullptr;
  std::optional<int64_t> window;
  if (windows != nullptr) window = windows->Acquire();
  absl::Cleanup release = [&] {
    if (window.has_value()) windows->Release(*window);
  };
  PullRequest pull;
  if (window.has_value()) {
    pull = MakePullRequest(step + 1, nullptr, false, 0, 1);
    SetPullWindow(windows, *window, &pull);
  }
  std::vector<PushResponse> answers(stubs_.size());
  LMPS_RETURN_IF_ERROR(PushChunksThen(
      step, worker_id, dp_rank, grads, {0, num_parameters_}, {}, then,
      window.has_value() ? pull.SerializeAsString() : "", &answers));
  PushedStep out;
  // In shard order, from 0: GradNorm's sum, bitwise.
  for (const PushResponse& a : answers) out.sum_squares += a.sum_squares();
  if (then == PUSH_THEN_APPLY) out.version = answers[0].version();
  if (window.has_value() && !answers[0].pulled().empty()) {
    int64_t received = 0;
    PullSink sink{.shard = 0,
                  .params = next_params,
                  .version = &out.pulled_version,
                  .received = &received};
    const grpc::ByteBuffer answered = BufferOf(answers[0].pulled());
    absl::Status got = PullThroughWindow(&pull, windows, &sink, &answered);
    if (got.ok() && received != num_parameters_) {
      got = absl::DataLossError(absl::StrCat("it returned ", received, " of ",
                                             num_parameters_, " elements"));
    }
    // The step is applied either way: a pull that could not be finished
    // here (its later requests failed) is the caller's ordinary Pull.
    out.pulled = got.ok();
    if (!got.ok() && options_.log) {
      options_.log(absl::StrCat("the pull of step ", step + 1,
                                " answered with the push failed (",
                                got.ToString(), "): pulling it again"));
    }
  }
  return out;
}

absl::Status PsClient::PushChunksThen(int64_t step,
                                      const std::string& worker_id,
                                      int dp_rank, const float* grads,
                                      ElementRange range, ElementRange done,
                                      PushThen then,
                                      const std::string& then_pull,
                                      std::vector<PushResponse>* answers) {
  // Per shard, the pieces of the chunks to push: a chunk's pieces are
  // adjacent in push_pieces_ (added chunk by chunk), and a chunk is taken
  // when all of them are inside `range` and not all inside `done`.
  auto inside = [](const LocalPiece& p, ElementRange r) {
    return r.begin <= p.local_offset && p.local_offset + p.n <= r.end;
  };
  std::vector<std::vector<const LocalPiece*>> selected(stubs_.size());
  std::vector<int> shards;
  for (int s : push_shards_) {
    const std::vector<LocalPiece>& pieces = push_pieces_[s];
    for (size_t i = 0; i < pieces.size();) {
      size_t j = i;
      bool in_range = true, in_done = true;
      for (; j < pieces.size() && pieces[j].tensor == pieces[i].tensor &&
             pieces[j].chunk == pieces[i].chunk;
           ++j) {
        in_range = in_range && inside(pieces[j], range);
        in_done = in_done && inside(pieces[j], done);
      }
      if (in_range && !in_done) {
        for (size_t k = i; k < j; ++k) selected[s].push_back(&pieces[k]);
      }
      i = j;
    }
    if (!selected[s].empty()) shards.push_back(s);
  }
  if (compress_ && step != residual_step_) {
    // A new step: the residual it starts from is the last step's result.
    // (The same step again -- a retry -- starts from the same one.)
    if (residual_step_ >= 0) prev_ = 1 - prev_;
    residual_step_ = step;
  }
  // Slices are cut by elements, the same with or without compression (a
  // compressed slice is smaller than the dense one).
  const int64_t width = options_.push_dtype == BF16 && !compress_ ? 2 : 4;
  const int64_t max_elems =
      std::max<int64_t>(1, options_.max_message_bytes / width);
  // Each shard's chunks go in streams of at most max_stream_bytes (whole
  // chunks, at least one), one after another: a shard holds a stream whole
  // before it takes it, so this bounds its memory per pusher.
  const int64_t stream_elems =
      options_.max_push_stream_bytes > 0
          ? std::max<int64_t>(1, options_.max_push_stream_bytes / width)
          : std::numeric_limits<int64_t>::max();
  return ForEachShard(shards, [&](int s) -> absl::Status {
    const std::vector<const LocalPiece*>& pieces = selected[s];
    // The shard's streams: [begin, end) ranges of `pieces`.
    std::vector<std::pair<size_t, size_t>> groups;
    for (size_t i = 0; i < pieces.size();) {
      // [i, j): whole chunks, together at most stream_elems (or one chunk).
      size_t j = i;
      int64_t elems = 0;
      while (j < pieces.size()) {
        size_t k = j;
        int64_t chunk_elems = 0;
        for (; k < pieces.size() && pieces[k]->tensor == pieces[j]->tensor &&
               pieces[k]->chunk == pieces[j]->chunk;
             ++k) {
          chunk_elems += pieces[k]->n;
        }
        if (j > i && elems + chunk_elems > stream_elems) break;
        elems += chunk_elems;
        j = k;
      }
      groups.push_back({i, j});
      i = j;
    }
    // streams_per_shard at once, each taking every K-th stream in turn.
    const size_t lanes =
        std::min<size_t>(groups.size(), StreamsPerShard());
    auto lane = [&](size_t k) -> absl::Status {
      for (size_t g = k; g < groups.size(); g += lanes) {
        const auto [begin, end] = groups[g];
        // `then` goes with the shard's last stream, the last of its lane:
        // the shard waits there for the streams of the other lanes.
        const bool last = g + 1 == groups.size();
        LMPS_RETURN_IF_ERROR(PushStream(
            step, worker_id, dp_rank, grads, s,
            absl::MakeConstSpan(pieces.data() + begin, end - begin),
            max_elems, last ? then : PUSH_THEN_NOTHING,
            last ? then_pull : "",
            last && answers != nullptr ? &(*answers)[s] : nullptr));
      }
      return absl::OkStatus();
    };
    std::vector<absl::Status> results(lanes);
    std::vector<std::thread> threads;
    for (size_t k = 1; k < lanes; ++k) {
      threads.emplace_back([&, k] { results[k] = lane(k); });
    }
    if (lanes > 0) results[0] = lane(0);
    for (std::thread& t : threads) t.join();
    for (const absl::Status& r : results) LMPS_RETURN_IF_ERROR(r);
    return absl::OkStatus();
  });
}

absl::Status PsClient::PushStream(int64_t step, const std::string& worker_id,
                                  int dp_rank, const float* grads, int s,
                                  absl::Span<const LocalPiece* const> pieces,
                                  int64_t max_elems, PushThen then,
                                  const std::string& then_pull,
                                  PushResponse* answer) {
  if (options_.on_shard_push) options_.on_shard_push(s, step, false);
  PushHeader header;
  header.worker_id = worker_id;
  header.dp_rank = dp_rank;
  header.step = step;
  header.partition_version = partition_version_;
  header.pp_rank = pp_rank_;
  header.tp_rank = tp_rank_;
  header.then = then;
  header.then_pull = then_pull;
  // Shared memory: the stream's dense payloads in one window, if they fit
  // (each piece aligned), named by one message (the payloads are not in it).
  WindowPool* windows = compress_ ? nullptr : SharedWindows(s);
  std::optional<int64_t> window;
  if (windows != nullptr) {
    const int width = options_.push_dtype == BF16 ? 2 : 4;
    int64_t need = 0;
    for (const LocalPiece* p : pieces) need += SharedPayloadSpan(p->n * width);
    if (need <= windows->window_bytes()) window = windows->Acquire();
  }
  const int64_t msg_elems =
      window.has_value() ? std::numeric_limits<int64_t>::max() : max_elems;
  absl::Cleanup release = [&] {
    if (window.has_value()) windows->Release(*window);
  };
  char* shm = window.has_value() ? windows->region().data() : nullptr;
  if (shm != nullptr) {
    header.shm = windows->region().desc().SerializeAsString();
  }
  // Builds the next message (at most msg_elems elements) into `out`: the
  // gradient encoded once into the slices gRPC sends (or the window),
  // while the message before it is being written (ClientStreamingCall).
  size_t piece = 0;
  int64_t off = 0;
  int64_t shm_at = window.value_or(0);
  int64_t stream_bytes = 0;  // as CompressedWireBytes counts
  auto next = [&](grpc::ByteBuffer* out) -> absl::StatusOr<bool> {
    std::vector<ChunkSliceOut> slices;
    int64_t in_msg = 0, msg_bytes = 0;
    while (piece < pieces.size() && in_msg < msg_elems) {
      const LocalPiece& p = *pieces[piece];
      const int64_t n = std::min(p.n - off, msg_elems - in_msg);
      ChunkSliceOut& slice = slices.emplace_back();
      LMPS_RETURN_IF_ERROR(EncodePushSlice(step, dp_rank, p, off, n, grads,
                                           &slice, shm, &shm_at));
      // As CompressedWireBytes counts: payload, indices, INT8's scale.
      msg_bytes += static_cast<int64_t>(slice.data.size() +
                                        slice.indices.size()) +
                   slice.shm_bytes + (slice.dtype == INT8 ? 4 : 0);
      in_msg += n;
      off += n;
      if (off == p.n) {
        ++piece;
        off = 0;
      }
    }
    if (slices.empty()) return false;
    stream_bytes += msg_bytes;
    *out = SerializePushRequest(header, slices);
    return true;
  };
  auto ctx = Context();
  stats_.rpcs++;
  grpc::ByteBuffer response;
  // An encoding error cancels the stream before it ends, so nothing of it
  // counts on the shard.
  const absl::Status sent = ClientStreamingCall(
      Stub(s)->raw.get(), kPushMethod, ctx.get(), next, &response);
  if (shm != nullptr && SharedMemoryRefused(s, sent)) {
    // Refused before anything was taken: the same stream over the socket.
    std::move(release).Invoke();
    window.reset();
    return PushStream(step, worker_id, dp_rank, grads, s, pieces, max_elems,
                      then, then_pull, answer);
  }
  stats_.bytes_pushed += stream_bytes;
  if (shm != nullptr) stats_.bytes_shared += stream_bytes;
  LMPS_RETURN_IF_ERROR(sent);
  PushResponse resp;
  LMPS_RETURN_IF_ERROR(ParseProto(response, &resp));
  if (options_.on_shard_push) options_.on_shard_push(s, step, true);
  if (answer != nullptr) *answer = std::move(resp);
  return absl::OkStatus();
}

absl::Status PsClient::EncodePushSlice(int64_t step, int dp_rank,
                                       const LocalPiece& p, int64_t off,
                                       int64_t n, const float* grads,
                                       ChunkSliceOut* slice, char* shm,
                                       int64_t* shm_at) {
  slice->tensor = p.tensor;
  slice->chunk = p.chunk;
  slice->offset = p.chunk_offset + off;
  const int64_t at = p.local_offset + off;
  const float* src = grads + at;
  if (compress_) {
    SliceKey key;
    key.seed = options_.seed;
    key.step = step;
    key.dp_rank = dp_rank;
    key.pp_rank = pp_rank_;
    key.tp_rank = tp_rank_;
    key.tensor = p.tensor;
    key.chunk = p.chunk;
    key.offset = p.chunk_offset + off;
    // Compressed slices are small: built as a ChunkSlice, then copied.
    ChunkSlice compressed;
    LMPS_RETURN_IF_ERROR(CompressSlice(options_.compression, key, src,
                                       residual_[prev_].data() + at, n,
                                       residual_[1 - prev_].data() + at,
                                       &compressed));
    slice->dtype = compressed.dtype();
    slice->data = grpc::Slice(compressed.data());
    slice->sparse = compressed.sparse();
    slice->num_elements = compressed.num_elements();
    slice->indices = grpc::Slice(compressed.indices());
    slice->scale = compressed.scale();
    return absl::OkStatus();
  }
  slice->dtype = options_.push_dtype;
  const int width = options_.push_dtype == BF16 ? 2 : 4;
  char* data;
  if (shm != nullptr) {
    slice->shm_offset = *shm_at;
    slice->shm_bytes = n * width;
    data = shm + *shm_at;
    *shm_at += SharedPayloadSpan(n * width);
  } else {
    slice->data = NewPayloadSlice(n * width);
    data = MutableBytes(&slice->data);
  }
  if (options_.push_dtype == BF16) {
    FloatToBf16(src, n, data);
  } else {
    std::memcpy(data, src, n * 4);
  }
  return absl::OkStatus();
}

int64_t PsClient::WindowBytes() const {
  if (options_.shared_window_bytes > 0) return options_.shared_window_bytes;
  // Two pull messages (or a push stream) and their slices' alignment.
  return std::max<int64_t>(options_.max_push_stream_bytes,
                           2 * options_.max_message_bytes) +
         (256 << 10);
}

WindowPool* PsClient::SharedWindows(int s) {
  // Per concurrent stream a pull's and a push's window, and two for
  // layer-wise pulls; a request that finds none free uses the socket.
  absl::Status failure;
  WindowPool* pool =
      shm_->Get(s, 2 * StreamsPerShard() + 2, WindowBytes(), &failure);
  if (!failure.ok() && options_.log) {
    options_.log(absl::StrCat("no shared memory for shard ", s, " (",
                              failure.ToString(),
                              "): payloads go through the socket"));
  }
  return pool;
}

bool PsClient::SharedMemoryRefused(int s, const absl::Status& status) {
  if (!IsSharedMemoryRefusal(status)) return false;
  if (shm_->Disable(s) && options_.log) {
    options_.log(absl::StrCat("shard ", s, " (", Address(s),
                              ") cannot map this worker's shared memory (",
                              status.message(),
                              "): its payloads go through the socket"));
  }
  return true;
}

absl::StatusOr<double> PsClient::GradNorm(int64_t step) {
  std::vector<double> parts(stubs_.size(), 0.0);
  LMPS_RETURN_IF_ERROR(ForEachShard([&](int s) -> absl::Status {
    GradNormRequest req;
    req.set_step(step);
    GradNormResponse resp;
    auto ctx = Context();
    stats_.rpcs++;
    LMPS_RETURN_IF_ERROR(FromGrpcStatus(Stub(s)->rpc->GradNorm(ctx.get(), req, &resp)));
    parts[s] = resp.sum_squares();
    return absl::OkStatus();
  }));
  double total = 0;
  for (double p : parts) total += p;  // in shard order: deterministic
  return total;
}

double PsClient::MeanAndSumSquares(float replicas, float* grads) const {
  double sum_squares = 0;
  for (const std::vector<LocalPiece>& pieces : push_pieces_) {
    std::vector<absl::Span<float>> chunks;
    for (const LocalPiece& p : pieces) {
      chunks.push_back(absl::MakeSpan(grads + p.local_offset, p.n));
    }
    sum_squares += ShardMeanAndSumSquares(replicas, chunks, /*pool=*/nullptr);
  }
  return sum_squares;
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
    LMPS_RETURN_IF_ERROR(FromGrpcStatus(Stub(s)->rpc->Apply(ctx.get(), req, &resp)));
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
    LMPS_RETURN_IF_ERROR(FromGrpcStatus(Stub(s)->rpc->Apply(ctx.get(), req, &resp)));
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
  LMPS_RETURN_IF_ERROR(ForEachShardInfo(
      [&](int s, const TensorInfoResponse& r) { versions[s] = r.version(); }));
  return versions;
}

absl::StatusOr<int64_t> PsClient::ReplicaClock(int dp_rank) {
  std::vector<int64_t> clocks(stubs_.size(), 0);
  absl::Status bad;
  absl::Mutex mu;
  LMPS_RETURN_IF_ERROR(ForEachShardInfo([&](int s, const TensorInfoResponse& r) {
    if (dp_rank < 0 || dp_rank >= r.replica_clocks_size()) {
      absl::MutexLock lock(&mu);
      bad = absl::InvalidArgumentError(absl::StrCat(
          "shard ", s, " reports ", r.replica_clocks_size(),
          " replica clocks; no dp rank ", dp_rank));
      return;
    }
    clocks[s] = r.replica_clocks(dp_rank);
  }));
  LMPS_RETURN_IF_ERROR(bad);
  return clocks.empty() ? 0 : *std::min_element(clocks.begin(), clocks.end());
}

absl::Status PsClient::ForEachShardInfo(
    const std::function<void(int, const TensorInfoResponse&)>& fn) {
  return ForEachShard([&](int s) -> absl::Status {
    stats_.rpcs++;
    LMPS_ASSIGN_OR_RETURN(TensorInfoResponse resp,
                          SmallShardInfo(Stub(s)->rpc.get(), options_.rpc_timeout));
    fn(s, resp);
    return absl::OkStatus();
  });
}

}  // namespace lmps
