#include "server/service.h"

#include <chrono>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/rpc/status_util.h"
#include "common/shm/payloads.h"
#include "common/wire/chunk_wire.h"

namespace lmps {
namespace {

#define LMPS_RETURN_GRPC_IF_ERROR(expr)              \
  do {                                                \
    const absl::Status lmps_status_ = (expr);         \
    if (!lmps_status_.ok()) return ToGrpcStatus(lmps_status_); \
  } while (0)

grpc::Status NotReady() {
  return ToGrpcStatus(absl::UnavailableError(
      "parameter server has no shard assignment yet; retry shortly"));
}

}  // namespace

absl::Time CallDeadline(const grpc::CallbackServerContext& context) {
  const auto deadline = context.deadline();
  if (deadline >=
      std::chrono::system_clock::now() + std::chrono::hours(24 * 365)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(deadline);
}

// ---------------------------------------------------------------------------
// Push: read the whole stream, then hand it to the shard on the work pool.
// The messages stay in gRPC's buffers: the shard reads them in place
// (common/wire/chunk_wire.h) and decodes each payload once into its
// gradient accumulator. A replicated shard forwards the stream to its
// backup as generated messages (parsed here).
// ---------------------------------------------------------------------------

class ParameterServerService::PushReactor
    : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  PushReactor(ParameterServerService* service, Target target,
              grpc::CallbackServerContext* context, grpc::ByteBuffer* response)
      : service_(service),
        target_(target),
        shard_(target.shard),
        context_(context),
        response_(response),
        max_bytes_(service->MaxPushBytes(*target.shard)) {
    StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed its side (or the call broke)
      if (context_->IsCancelled()) {
        Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                            "push cancelled before the end of the stream"));
        return;
      }
      service_->work_pool_->Schedule([this] { Run(); });
      return;
    }
    bytes_ += static_cast<int64_t>(incoming_.Length());
    if (bytes_ > max_bytes_) {
      const std::string msg =
          absl::StrCat("push stream exceeds ", max_bytes_, " bytes (shard ",
                       shard_->shard(), " holds ", 4 * shard_->num_elements(),
                       " bytes of parameters); nothing was accumulated");
      service_->Log(msg);
      Finish(ToGrpcStatus(absl::ResourceExhaustedError(msg)));
      return;
    }
    stream_.push_back(std::move(incoming_));
    incoming_ = grpc::ByteBuffer();
    StartRead(&incoming_);
  }

  void OnDone() override { delete this; }

 private:
  // The worker's region a message names (PushRequest.shm), if any.
  absl::StatusOr<std::shared_ptr<const SharedRegion>> MessageRegion(
      const std::string& serialized) {
    if (serialized.empty()) return nullptr;
    SharedRegionDesc desc;
    if (!desc.ParseFromString(serialized)) {
      return absl::InvalidArgumentError("push names a malformed shm region");
    }
    return service_->Region(desc);
  }

  // What the stream asks for after the push (PushRequest.then and
  // then_pull; the first message's), checked before anything is taken.
  absl::Status SetThen(PushThen then, int64_t step,
                       const std::string& then_pull) {
    then_ = then;
    step_ = step;
    then_pull_ = !then_pull.empty();
    return service_->CheckPushThen(*shard_, step, then, then_pull, &pull_);
  }

  absl::StatusOr<PushResponse> Push() {
    if (target_.replicated != nullptr) {
      // Forwarded to the backup as generated messages: shared-memory
      // payloads are copied in.
      std::vector<PushRequest> messages(stream_.size());
      for (size_t m = 0; m < stream_.size(); ++m) {
        LMPS_RETURN_IF_ERROR(ParseProto(stream_[m], &messages[m]));
        if (m == 0) {
          LMPS_RETURN_IF_ERROR(SetThen(
              messages[0].then(), messages[0].step(),
              messages[0].has_then_pull()
                  ? messages[0].then_pull().SerializeAsString()
                  : std::string()));
        }
        if (!messages[m].has_shm()) continue;
        absl::StatusOr<std::shared_ptr<const SharedRegion>> region =
            MessageRegion(messages[m].shm().SerializeAsString());
        if (!region.ok()) return region.status();
        for (ChunkSlice& slice : *messages[m].mutable_slices()) {
          LMPS_RETURN_IF_ERROR(InlineSharedPayloads(**region, &slice));
        }
        messages[m].clear_shm();
      }
      return target_.replicated->Push(messages);
    }
    std::vector<PushRequestView> views(stream_.size());
    // Regions stay mapped until the stream is taken.
    std::vector<std::shared_ptr<const SharedRegion>> held;
    for (size_t m = 0; m < stream_.size(); ++m) {
      LMPS_RETURN_IF_ERROR(ParsePushRequest(stream_[m], &views[m]));
      if (m == 0) {
        LMPS_RETURN_IF_ERROR(SetThen(views[0].header.then,
                                     views[0].header.step,
                                     views[0].header.then_pull));
      }
      if (!HasSharedPayloads(views[m].slices)) continue;
      absl::StatusOr<std::shared_ptr<const SharedRegion>> region =
          MessageRegion(views[m].header.shm);
      if (!region.ok()) return region.status();
      if (*region == nullptr) {
        return absl::InvalidArgumentError(
            "push slices name shared memory but the message names no region");
      }
      LMPS_RETURN_IF_ERROR(AttachSharedPayloads(**region, &views[m].slices));
      held.push_back(*std::move(region));
    }
    return shard_->Push(views);
  }

  void Run() {
    absl::StatusOr<PushResponse> result = Push();
    stream_.clear();
    stream_.shrink_to_fit();
    if (!result.ok()) {
      service_->Log(
          absl::StrCat("push rejected: ", result.status().ToString()));
      Finish(ToGrpcStatus(result.status()));
      return;
    }
    if (then_ == PUSH_THEN_NOTHING) {
      *response_ = SerializeProto(*result);
      Finish(grpc::Status::OK);
      return;
    }
    // The wait for the other ranks' pushes blocks: on the wait pool, as
    // GradNorm's.
    service_->wait_pool_->Schedule([this, pushed = *std::move(result)] {
      Finish(ToGrpcStatus(Then(pushed)));
    });
  }

  // GradNorm (and Apply) of the pushed step, as their RPCs would.
  absl::Status Then(PushResponse response) {
    LMPS_ASSIGN_OR_RETURN(
        const double sum_squares,
        shard_->GradNorm(step_, CallDeadline(*context_)));
    response.set_sum_squares(sum_squares);
    if (then_ == PUSH_THEN_APPLY) {
      LMPS_ASSIGN_OR_RETURN(const int64_t version,
                            service_->ApplyStep(target_, step_, sum_squares));
      response.set_version(version);
    }
    if (then_pull_) {
      // The step is applied whatever happens here: a pull that cannot be
      // served now is left to the worker's own Pull (which reports why).
      absl::StatusOr<std::string> pulled = ThenPull();
      if (pulled.ok()) {
        response.set_pulled(*std::move(pulled));
      } else {
        service_->Log(absl::StrCat("push of step ", step_,
                                   ": its then_pull is left to the worker: ",
                                   pulled.status().ToString()));
      }
    }
    *response_ = SerializeProto(response);
    return absl::OkStatus();
  }

  // PushRequest.then_pull: the first answer of that shared-memory pull
  // (the new version exists: no wait), serialized.
  absl::StatusOr<std::string> ThenPull() {
    std::shared_ptr<const SharedRegion> region;
    LMPS_ASSIGN_OR_RETURN(
        const ParameterShard::PullPlan plan,
        service_->PlanPull(target_, pull_, CallDeadline(*context_), &region));
    grpc::ByteBuffer message;
    LMPS_RETURN_IF_ERROR(shard_->EncodePull(plan, 0, &message));
    return BufferBytes(message);
  }

  ParameterServerService* const service_;
  const Target target_;
  ParameterShard* const shard_;
  grpc::CallbackServerContext* const context_;
  grpc::ByteBuffer* const response_;
  const int64_t max_bytes_;
  int64_t bytes_ = 0;
  grpc::ByteBuffer incoming_;
  std::vector<grpc::ByteBuffer> stream_;
  PushThen then_ = PUSH_THEN_NOTHING;
  int64_t step_ = 0;
  bool then_pull_ = false;
  PullRequest pull_;  // then_pull, when then_pull_
};

// ---------------------------------------------------------------------------
// Pull: wait for the version on the wait pool, then stream the messages,
// each encoded from the parameters on the work pool while the one before it
// is being written (two buffers), so a pull holds at most two messages.
// ---------------------------------------------------------------------------

class ParameterServerService::PullReactor
    : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  PullReactor(ParameterServerService* service, Target target,
              grpc::CallbackServerContext* context, PullRequest request)
      : service_(service),
        target_(target),
        request_(std::move(request)),
        deadline_(CallDeadline(*context)) {
    service->wait_pool_->Schedule([this] { Start(); });
  }

  void OnWriteDone(bool ok) override {
    Actions next;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      ++written_;
      if (!ok && error_.ok()) {
        error_ = grpc::Status(grpc::StatusCode::CANCELLED,
                              "pull stream broken by the client");
      }
      next = PumpLocked();
    }
    Run(next);
  }

  void OnDone() override { delete this; }

 private:
  // What to start once mu_ is released (gRPC may run a reaction inline, and
  // OnDone deletes this).
  struct Actions {
    grpc::ByteBuffer* write = nullptr;
    int64_t encode = -1;
    std::optional<grpc::Status> finish;
  };

  // On the wait pool: the read rule's wait, then the plan.
  void Start() {
    absl::StatusOr<ParameterShard::PullPlan> plan =
        service_->PlanPull(target_, request_, deadline_, &region_);
    Actions next;
    {
      absl::MutexLock lock(&mu_);
      if (!plan.ok()) {
        error_ = ToGrpcStatus(plan.status());
      } else {
        plan_ = *std::move(plan);
        planned_ = true;
      }
      next = PumpLocked();
    }
    Run(next);
  }

  // On the work pool: message e into its buffer.
  void Encode(size_t e) {
    const absl::Status s =
        target_.shard->EncodePull(plan_, e, &buffers_[e % 2]);
    Actions next;
    {
      absl::MutexLock lock(&mu_);
      encoding_ = false;
      if (!s.ok() && error_.ok()) error_ = ToGrpcStatus(s);
      if (s.ok()) ++encoded_;
      next = PumpLocked();
    }
    Run(next);
  }

  // What can start now: the next write of an encoded message, the next
  // encoding into a free buffer (message e's buffer held message e - 2),
  // or the end once nothing is in flight after an error or the last write.
  Actions PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Actions next;
    if (finished_) return next;
    const size_t n = planned_ ? plan_.messages.size() : 0;
    const bool failed = !error_.ok();
    if (!failed && planned_) {
      if (!writing_ && written_ < encoded_) {
        writing_ = true;
        next.write = &buffers_[written_ % 2];
      }
      if (!encoding_ && encoded_ < n && encoded_ < written_ + 2) {
        encoding_ = true;
        next.encode = static_cast<int64_t>(encoded_);
      }
    }
    if (!writing_ && !encoding_ && (failed || (planned_ && written_ == n))) {
      finished_ = true;
      next.finish = failed ? error_ : grpc::Status::OK;
    }
    return next;
  }

  void Run(const Actions& next) {
    if (next.encode >= 0) {
      const size_t e = static_cast<size_t>(next.encode);
      service_->work_pool_->Schedule([this, e] { Encode(e); });
    }
    if (next.write != nullptr) StartWrite(next.write);
    if (next.finish.has_value()) Finish(*next.finish);
  }

  ParameterServerService* const service_;
  const Target target_;
  const PullRequest request_;
  const absl::Time deadline_;
  // The worker's region of a shared-memory pull (set by Start).
  std::shared_ptr<const SharedRegion> region_;
  absl::Mutex mu_;
  // Set once by Start (under mu_) before any encoding or write reads it.
  ParameterShard::PullPlan plan_;
  bool planned_ ABSL_GUARDED_BY(mu_) = false;
  // Message e in buffers_[e % 2]: serialized PullResponses whose payloads
  // were encoded once from the parameters (ParameterShard::EncodePull).
  grpc::ByteBuffer buffers_[2];
  size_t encoded_ ABSL_GUARDED_BY(mu_) = 0;
  size_t written_ ABSL_GUARDED_BY(mu_) = 0;
  bool encoding_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status error_ ABSL_GUARDED_BY(mu_);
};

// ---------------------------------------------------------------------------
// Replicate: read the primary's whole stream, then run it on the work pool.
// ---------------------------------------------------------------------------

class ParameterServerService::ReplicateReactor
    : public grpc::ServerReadReactor<ReplicateRequest> {
 public:
  ReplicateReactor(ParameterServerService* service, Target target,
                   ReplicateResponse* response)
      : service_(service),
        target_(target),
        response_(response),
        max_bytes_(service->MaxPushBytes(*target.shard) +
                   8 * target.shard->num_elements()) {
    StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      service_->work_pool_->Schedule([this] { Run(); });
      return;
    }
    bytes_ += static_cast<int64_t>(incoming_.ByteSizeLong());
    if (bytes_ > max_bytes_) {
      Finish(ToGrpcStatus(absl::ResourceExhaustedError(absl::StrCat(
          "Replicate stream exceeds ", max_bytes_, " bytes; nothing changed"))));
      return;
    }
    stream_.push_back(std::move(incoming_));
    incoming_ = ReplicateRequest();
    StartRead(&incoming_);
  }

  void OnDone() override { delete this; }

 private:
  void Run() {
    absl::StatusOr<ReplicateResponse> result =
        target_.replicated->Replicate(stream_);
    stream_.clear();
    if (result.ok()) *response_ = std::move(*result);
    Finish(ToGrpcStatus(result.status()));
  }

  ParameterServerService* const service_;
  const Target target_;
  ReplicateResponse* const response_;
  const int64_t max_bytes_;
  int64_t bytes_ = 0;
  ReplicateRequest incoming_;
  std::vector<ReplicateRequest> stream_;
};

// ---------------------------------------------------------------------------
// The service.
// ---------------------------------------------------------------------------

absl::Status ParameterServerService::Target::Serving() const {
  return replicated != nullptr ? replicated->CheckServing() : absl::OkStatus();
}

ParameterServerService::ParameterServerService(ServiceOptions options)
    : options_(std::move(options)),
      work_pool_(std::make_unique<RpcWorkPool>(options_.work_threads)),
      wait_pool_(std::make_unique<RpcWorkPool>(options_.wait_threads)) {}

ParameterServerService::~ParameterServerService() {
  wait_pool_.reset();
  work_pool_.reset();
}

void ParameterServerService::SetShard(ParameterShard* shard,
                                      ReplicatedShard* replicated) {
  absl::MutexLock lock(&mu_);
  target_ = Target{shard, replicated};
}

ParameterServerService::Target ParameterServerService::target() const {
  absl::MutexLock lock(&mu_);
  return target_;
}

void ParameterServerService::Log(const std::string& line) const {
  if (options_.log) options_.log(line);
}

absl::StatusOr<std::shared_ptr<const SharedRegion>>
ParameterServerService::Region(const SharedRegionDesc& desc) {
  if (!options_.shared_memory) {
    return SharedMemoryRefusal(
        "this shard maps no worker memory (lmps_server --shared_memory=false)");
  }
  absl::StatusOr<std::shared_ptr<const SharedRegion>> region =
      regions_.Get(desc);
  if (!region.ok()) Log(region.status().ToString());
  return region;
}

int64_t ParameterServerService::MaxPushBytes(
    const ParameterShard& shard) const {
  if (options_.max_push_bytes > 0) return options_.max_push_bytes;
  return 2 * 4 * shard.num_elements() + (4 << 20);
}

grpc::ServerReadReactor<grpc::ByteBuffer>* ParameterServerService::Push(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  const Target t = target();
  if (t.shard == nullptr) {
    class Refuse : public grpc::ServerReadReactor<grpc::ByteBuffer> {
     public:
      Refuse() { Finish(NotReady()); }
      void OnDone() override { delete this; }
    };
    return new Refuse();
  }
  return new PushReactor(this, t, context, response);
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* ParameterServerService::Pull(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  class Refuse : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
   public:
    explicit Refuse(const grpc::Status& status) { Finish(status); }
    void OnDone() override { delete this; }
  };
  const Target t = target();
  if (t.shard == nullptr) return new Refuse(NotReady());
  PullRequest parsed;
  if (absl::Status s = ParseProto(*request, &parsed); !s.ok()) {
    return new Refuse(ToGrpcStatus(s));
  }
  return new PullReactor(this, t, context, std::move(parsed));
}

grpc::ServerUnaryReactor* ParameterServerService::OnPool(
    grpc::CallbackServerContext* context, RpcWorkPool* pool,
    std::function<grpc::Status(const Target&)> fn) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const Target t = target();
  if (t.shard == nullptr) {
    reactor->Finish(NotReady());
    return reactor;
  }
  pool->Schedule([t, reactor, fn = std::move(fn)] { reactor->Finish(fn(t)); });
  return reactor;
}

grpc::ServerUnaryReactor* ParameterServerService::GradNorm(
    grpc::CallbackServerContext* context, const GradNormRequest* request,
    GradNormResponse* response) {
  const absl::Time deadline = CallDeadline(*context);
  return OnPool(context, wait_pool_.get(),
                [request, response, deadline](const Target& t) {
                  LMPS_RETURN_GRPC_IF_ERROR(t.Serving());
                  absl::StatusOr<double> result =
                      t.shard->GradNorm(request->step(), deadline);
                  if (result.ok()) response->set_sum_squares(*result);
                  return ToGrpcStatus(result.status());
                });
}

grpc::ServerUnaryReactor* ParameterServerService::Apply(
    grpc::CallbackServerContext* context, const ApplyRequest* request,
    ApplyResponse* response) {
  return OnPool(context, work_pool_.get(),
                [this, request, response](const Target& t) {
                  absl::StatusOr<int64_t> result = ApplyStep(
                      t, request->step(), request->global_sum_squares());
                  if (result.ok()) response->set_version(*result);
                  return ToGrpcStatus(result.status());
                });
}

absl::StatusOr<int64_t> ParameterServerService::ApplyStep(
    const Target& t, int64_t step, double global_sum_squares) {
  absl::StatusOr<int64_t> result =
      t.replicated != nullptr ? t.replicated->Apply(step, global_sum_squares)
                              : t.shard->Apply(step, global_sum_squares);
  if (!result.ok()) {
    Log(absl::StrCat("apply failed: ", result.status().ToString()));
  }
  return result;
}

absl::StatusOr<ParameterShard::PullPlan> ParameterServerService::PlanPull(
    const Target& t, const PullRequest& request, absl::Time deadline,
    std::shared_ptr<const SharedRegion>* region) {
  LMPS_RETURN_IF_ERROR(t.Serving());
  LMPS_ASSIGN_OR_RETURN(ParameterShard::PullPlan plan,
                        t.shard->StartPull(request, deadline));
  if (!request.has_shm()) return plan;
  // The plan's part that fits the worker's window, written there as one
  // message.
  if (request.with_optimizer_state()) {
    return absl::InvalidArgumentError(
        "pulls with the optimizer state do not use shared memory");
  }
  LMPS_ASSIGN_OR_RETURN(*region, Region(request.shm()));
  LMPS_RETURN_IF_ERROR(
      (*region)->CheckRange(request.shm_offset(), request.shm_bytes()));
  LMPS_RETURN_IF_ERROR(ParameterShard::FitSharedWindow(
      request.first_message(), (*region)->data(), request.shm_offset(),
      request.shm_bytes(), &plan));
  return plan;
}

absl::Status ParameterServerService::CheckPushThen(
    const ParameterShard& shard, int64_t step, PushThen then,
    const std::string& then_pull, PullRequest* pull) const {
  if (!then_pull.empty()) {
    if (!pull->ParseFromString(then_pull)) {
      return absl::InvalidArgumentError(
          "push carries a malformed then_pull; nothing was accumulated");
    }
    if (then != PUSH_THEN_APPLY || !pull->has_shm() ||
        pull->first_message() != 0 || pull->streams() > 1 ||
        pull->with_optimizer_state() || pull->step() != step + 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "push of step ", step, " asks for then_pull of step ",
          pull->step(), " with then ", PushThen_Name(then),
          "; only a shared-memory pull of step ", step + 1,
          " from its first message, in one stream, without optimizer state, "
          "after PUSH_THEN_APPLY; nothing was accumulated"));
    }
  }
  if (then == PUSH_THEN_NOTHING) return absl::OkStatus();
  if (then != PUSH_THEN_NORM && then != PUSH_THEN_APPLY) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push asks for unknown follow-up ", static_cast<int>(then),
        " (PushRequest.then); nothing was accumulated"));
  }
  if (shard.mode() != SYNC) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push asks for ", PushThen_Name(then), " but the job's mode is ",
        ConsistencyMode_Name(shard.mode()),
        " (only SYNC); nothing was accumulated"));
  }
  if (then == PUSH_THEN_APPLY && shard.partition().num_shards() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "push asks for PUSH_THEN_APPLY but the job has ",
        shard.partition().num_shards(),
        " shards (the global norm needs all of theirs); nothing was "
        "accumulated"));
  }
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* ParameterServerService::GetTensorInfo(
    grpc::CallbackServerContext* context, const TensorInfoRequest* request,
    TensorInfoResponse* response) {
  return OnPool(context, work_pool_.get(),
                [request, response](const Target& t) {
                  LMPS_RETURN_GRPC_IF_ERROR(t.Serving());
                  absl::StatusOr<TensorInfoResponse> result =
                      t.shard->TensorInfo(request->tensor());
                  if (result.ok()) *response = std::move(*result);
                  return ToGrpcStatus(result.status());
                });
}

grpc::ServerUnaryReactor* ParameterServerService::StopAt(
    grpc::CallbackServerContext* context, const StopAtRequest* request,
    StopAtResponse* response) {
  return OnPool(context, work_pool_.get(),
                [request, response](const Target& t) {
                  absl::StatusOr<int64_t> result =
                      t.replicated != nullptr
                          ? t.replicated->StopAt(request->step())
                          : t.shard->StopAt(request->step());
                  if (result.ok()) response->set_version(*result);
                  return ToGrpcStatus(result.status());
                });
}

grpc::ServerReadReactor<ReplicateRequest>* ParameterServerService::Replicate(
    grpc::CallbackServerContext* context, ReplicateResponse* response) {
  const Target t = target();
  if (t.shard == nullptr || t.replicated == nullptr) {
    class Refuse : public grpc::ServerReadReactor<ReplicateRequest> {
     public:
      explicit Refuse(grpc::Status s) { Finish(s); }
      void OnDone() override { delete this; }
    };
    return new Refuse(
        t.shard == nullptr
            ? NotReady()
            : ToGrpcStatus(absl::FailedPreconditionError(
                  "this parameter server does not replicate its shard "
                  "(layout.shard_backups = 0)")));
  }
  return new ReplicateReactor(this, t, response);
}

}  // namespace lmps
