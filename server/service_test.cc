// Starts the real gRPC server in-process on 127.0.0.1:0 and drives it with a
// ParameterServer stub.
#include "server/service.h"

#include <grpcpp/health_check_service_interface.h>

#include <cstring>
#include <limits>
#include <thread>

#include "common/model/job_spec.h"
#include "common/model/partition.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/status_util.h"
#include "common/shm/shared_region.h"
#include "gtest/gtest.h"
#include "server/tensor_codec.h"

namespace lmps {
namespace {

JobSpec Spec() {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(1);
  m->set_n_head(2);
  m->set_n_embd(16);
  m->set_block_size(8);
  m->set_vocab_size(32);
  spec.mutable_layout()->set_dp(2);
  spec.mutable_layout()->set_num_shards(1);
  spec.mutable_train()->set_batch_size(4);
  spec.mutable_optimizer()->set_type(SGD);
  spec.set_max_chunk_bytes(1024);
  spec.set_max_message_bytes(1024);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spec_ = Spec();
    ShardOptions o;
    o.spec = spec_;
    o.map = *ComputePartition(spec_.model(), 1, spec_.max_chunk_bytes());
    o.wait_timeout = absl::Seconds(5);
    auto shard = ParameterShard::Create(o);
    ASSERT_TRUE(shard.ok()) << shard.status();
    shard_ = std::move(*shard);
    ServiceOptions so;
    so.wait_threads = 2;
    so.work_threads = 1;
    so.max_push_bytes = 3 * 4 * shard_->num_elements();
    service_ = std::make_unique<ParameterServerService>(so);
    GrpcServerOptions go;
    go.listen_address = "127.0.0.1:0";
    auto started = StartGrpcServer(go, {service_.get()});
    ASSERT_TRUE(started.ok()) << started.status();
    server_ = std::move(started->server);
    channel_ = MakeChannel(absl::StrCat("127.0.0.1:", started->port));
    stub_ = ParameterServer::NewStub(channel_);
  }

  void TearDown() override {
    if (shard_) shard_->Shutdown();
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    service_.reset();
    server_.reset();
    shard_.reset();
  }

  void Ready() {
    service_->SetShard(shard_.get());
    SetServing(server_.get(), true);
  }

  std::unique_ptr<grpc::ClientContext> Ctx(int seconds = 10) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::seconds(seconds));
    return ctx;
  }

  // Every chunk of the shard, two slices per message.
  std::vector<PushRequest> Stream(int rank, int64_t step, float value) {
    std::vector<PushRequest> out;
    for (const ChunkDesc& c : ChunksOfShard(shard_->partition(), 0)) {
      if (out.empty() || out.back().slices_size() == 2) {
        out.emplace_back();
        out.back().set_dp_rank(rank);
        out.back().set_step(step);
        out.back().set_worker_id(absl::StrCat("worker-", rank));
        out.back().set_partition_version(shard_->partition().version());
      }
      ChunkSlice* s = out.back().add_slices();
      s->set_tensor(c.tensor());
      s->set_chunk(c.index());
      s->set_dtype(F32);
      std::vector<float> v(c.end() - c.begin(), value);
      EncodePayload(F32, v.data(), v.size(), s->mutable_data());
    }
    return out;
  }

  grpc::Status Push(const std::vector<PushRequest>& stream,
                    PushResponse* response) {
    auto ctx = Ctx();
    auto writer = stub_->Push(ctx.get(), response);
    for (const PushRequest& m : stream) {
      if (!writer->Write(m)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  }

  JobSpec spec_;
  std::unique_ptr<ParameterShard> shard_;
  std::unique_ptr<ParameterServerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<ParameterServer::Stub> stub_;
};

TEST_F(ServiceTest, UnavailableUntilShardIsSet) {
  GradNormRequest req;
  GradNormResponse resp;
  auto ctx = Ctx();
  EXPECT_EQ(stub_->GradNorm(ctx.get(), req, &resp).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  PushResponse pr;
  EXPECT_EQ(Push(Stream(0, 0, 1.0f), &pr).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  auto pctx = Ctx();
  PullRequest pull;
  auto reader = stub_->Pull(pctx.get(), pull);
  PullResponse msg;
  while (reader->Read(&msg)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(ServiceTest, FullStepOverTheNetwork) {
  Ready();
  const int n = static_cast<int>(ChunksOfShard(shard_->partition(), 0).size());
  ASSERT_GT(n, 4);  // the stream really is several messages

  // GradNorm blocks (on the adapter's pool) until both ranks pushed; the
  // pushes still get through.
  GradNormResponse gn;
  grpc::Status gn_status;
  std::thread waiter([&] {
    GradNormRequest req;
    req.set_step(0);
    auto ctx = Ctx();
    gn_status = stub_->GradNorm(ctx.get(), req, &gn);
  });
  PushResponse r0, r1, dup;
  ASSERT_TRUE(Push(Stream(0, 0, 1.0f), &r0).ok());
  EXPECT_EQ(r0.chunks_accepted(), n);
  ASSERT_TRUE(Push(Stream(0, 0, 1.0f), &dup).ok());
  EXPECT_EQ(dup.chunks_duplicate(), n);
  ASSERT_TRUE(Push(Stream(1, 0, 3.0f), &r1).ok());
  waiter.join();
  ASSERT_TRUE(gn_status.ok()) << gn_status.error_message();
  // Averaged gradient 2.0 everywhere.
  EXPECT_DOUBLE_EQ(gn.sum_squares(), 4.0 * shard_->num_elements());

  ApplyRequest apply;
  apply.set_step(0);
  apply.set_global_sum_squares(gn.sum_squares());
  ApplyResponse applied;
  auto actx = Ctx();
  ASSERT_TRUE(stub_->Apply(actx.get(), apply, &applied).ok());
  EXPECT_EQ(applied.version(), 1);

  PullRequest pull;
  pull.set_step(1);
  pull.set_partition_version(shard_->partition().version());
  auto pctx = Ctx();
  auto reader = stub_->Pull(pctx.get(), pull);
  PullResponse msg;
  int messages = 0;
  std::map<std::pair<std::string, int>, std::vector<float>> got;
  while (reader->Read(&msg)) {
    ++messages;
    EXPECT_EQ(msg.version(), 1);
    int64_t payload = 0;
    for (const ChunkSlice& s : msg.slices()) {
      payload += s.data().size();
      auto& v = got[{s.tensor(), s.chunk()}];
      ASSERT_EQ(static_cast<int64_t>(v.size()), s.offset());
      v.resize(v.size() + s.data().size() / 4);
      DecodePayload(F32, s.data(), v.data() + s.offset());
    }
    EXPECT_LE(payload, spec_.max_message_bytes());
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_GT(messages, 1);
  for (const ChunkData& c : shard_->Snapshot().chunks) {
    EXPECT_EQ((got[{c.desc.tensor(), c.desc.index()}]), c.params);
  }

  TensorInfoRequest ireq;
  ireq.set_tensor("wte.weight");
  TensorInfoResponse info;
  auto ictx = Ctx();
  ASSERT_TRUE(stub_->GetTensorInfo(ictx.get(), ireq, &info).ok());
  EXPECT_EQ(info.version(), 1);
  ASSERT_EQ(info.tensors_size(), 1);
  EXPECT_GT(info.tensors(0).l2_norm(), 0);
}

// PushRequest.then: PUSH_THEN_APPLY (one shard) answers once every rank
// pushed, with GradNorm's sum and Apply's version; the rank pushing first
// waits for the other. PUSH_THEN_NORM answers the sum only. Bad follow-ups
// are refused before anything is taken.
TEST_F(ServiceTest, PushThenNormAndApplyAnswerOnceTheStepIsComplete) {
  Ready();
  auto with_then = [&](int rank, int64_t step, float value, PushThen then) {
    std::vector<PushRequest> stream = Stream(rank, step, value);
    for (PushRequest& m : stream) m.set_then(then);
    return stream;
  };
  // Refused, nothing taken: unknown value; the shard keeps no gradient of
  // rank 0 (the step below still waits for it).
  PushResponse bad;
  grpc::Status refused =
      Push(with_then(0, 0, 1.0f, static_cast<PushThen>(7)), &bad);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(refused.error_message().find("unknown follow-up 7"),
            std::string::npos)
      << refused.error_message();
  // then_pull: only a shared-memory pull of the next step after
  // PUSH_THEN_APPLY; refused before anything is taken otherwise.
  PullRequest then_pull;
  then_pull.set_step(1);
  then_pull.mutable_shm()->set_path("/proc/1/fd/999");
  then_pull.mutable_shm()->set_size(1 << 20);
  then_pull.set_shm_bytes(1 << 20);
  PullRequest wrong_step = then_pull, no_shm = then_pull;
  wrong_step.set_step(2);
  no_shm.clear_shm();
  for (const auto& [pull, then] :
       {std::pair{then_pull, PUSH_THEN_NORM}, {wrong_step, PUSH_THEN_APPLY},
        {no_shm, PUSH_THEN_APPLY}}) {
    std::vector<PushRequest> stream = with_then(0, 0, 1.0f, then);
    *stream[0].mutable_then_pull() = pull;
    refused = Push(stream, &bad);
    EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(refused.error_message().find("then_pull"), std::string::npos)
        << refused.error_message();
  }

  // Rank 0 asks for the next step's pull too, in a region this shard cannot
  // map: the step is applied all the same, the answer has no `pulled`.
  PushResponse r0, r1;
  grpc::Status s0;
  std::thread first([&] {
    std::vector<PushRequest> stream = with_then(0, 0, 1.0f, PUSH_THEN_APPLY);
    *stream[0].mutable_then_pull() = then_pull;
    s0 = Push(stream, &r0);
  });
  ASSERT_TRUE(Push(with_then(1, 0, 3.0f, PUSH_THEN_APPLY), &r1).ok());
  first.join();
  ASSERT_TRUE(s0.ok()) << s0.error_message();
  for (const PushResponse* r : {&r0, &r1}) {
    EXPECT_EQ(r->chunks_accepted(), static_cast<int>(ChunksOfShard(
                                        shard_->partition(), 0).size()));
    // Averaged gradient 2.0 everywhere; applied once, version 1.
    EXPECT_DOUBLE_EQ(r->sum_squares(), 4.0 * shard_->num_elements());
    EXPECT_EQ(r->version(), 1);
    EXPECT_TRUE(r->pulled().empty());
  }
  EXPECT_EQ(shard_->version(), 1);

  // PUSH_THEN_NORM: the sum, nothing applied.
  PushResponse n0, n1;
  grpc::Status sn;
  std::thread norm([&] {
    sn = Push(with_then(0, 1, 2.0f, PUSH_THEN_NORM), &n0);
  });
  ASSERT_TRUE(Push(Stream(1, 1, 2.0f), &n1).ok());
  norm.join();
  ASSERT_TRUE(sn.ok()) << sn.error_message();
  EXPECT_DOUBLE_EQ(n0.sum_squares(), 4.0 * shard_->num_elements());
  EXPECT_EQ(n0.version(), 0);
  EXPECT_EQ(shard_->version(), 1);
}

// Pulls stream message by message: a client that leaves after one message
// (many times, so some leave while the next is being encoded) ends only its
// own call; the shard shutting down ends a pull with Unavailable.
TEST_F(ServiceTest, StreamedPullsSurviveClientsThatLeave) {
  Ready();
  PullRequest pull;
  pull.set_partition_version(shard_->partition().version());
  for (int i = 0; i < 20; ++i) {
    auto ctx = Ctx();
    auto reader = stub_->Pull(ctx.get(), pull);
    PullResponse msg;
    ASSERT_TRUE(reader->Read(&msg));
    ctx->TryCancel();
    while (reader->Read(&msg)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  // A whole pull still works, and holds every parameter once.
  auto ctx = Ctx();
  auto reader = stub_->Pull(ctx.get(), pull);
  PullResponse msg;
  int64_t bytes = 0;
  while (reader->Read(&msg)) {
    for (const ChunkSlice& s : msg.slices()) bytes += s.data().size();
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(bytes, 4 * shard_->num_elements());
  // The plan, then a shutdown before a message is encoded.
  auto plan = shard_->StartPull(pull, absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_GT(plan->messages.size(), 1u);
  grpc::ByteBuffer first;
  ASSERT_TRUE(shard_->EncodePull(*plan, 0, &first).ok());
  shard_->Shutdown();
  EXPECT_EQ(shard_->EncodePull(*plan, 1, &first).code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(ServiceTest, BadRequestsGiveErrorsAndTheServerKeepsServing) {
  Ready();
  PushResponse resp;
  auto nan = Stream(0, 0, 1.0f);
  const float bad = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(nan[1].mutable_slices(0)->mutable_data()->data(), &bad, 4);
  grpc::Status s = Push(nan, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("non-finite"), std::string::npos);

  auto unknown = Stream(0, 0, 1.0f);
  unknown[0].mutable_slices(0)->set_tensor("no.such.tensor");
  s = Push(unknown, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  auto wrong_version = Stream(0, 0, 1.0f);
  for (auto& m : wrong_version) m.set_partition_version(1);
  EXPECT_EQ(Push(wrong_version, &resp).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Push({}, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // Over the size cap: the same stream five times over.
  std::vector<PushRequest> huge;
  for (int i = 0; i < 5; ++i) {
    for (const auto& m : Stream(0, 0, 1.0f)) huge.push_back(m);
  }
  EXPECT_EQ(Push(huge, &resp).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);

  GradNormRequest greq;
  greq.set_step(0);
  GradNormResponse gresp;
  auto gctx = std::make_unique<grpc::ClientContext>();
  gctx->set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(200));
  EXPECT_EQ(stub_->GradNorm(gctx.get(), greq, &gresp).error_code(),
            grpc::StatusCode::DEADLINE_EXCEEDED);

  TensorInfoRequest ireq;
  ireq.set_tensor("nope");
  TensorInfoResponse info;
  auto ictx = Ctx();
  EXPECT_EQ(stub_->GetTensorInfo(ictx.get(), ireq, &info).error_code(),
            grpc::StatusCode::NOT_FOUND);

  // Still serving: health, metadata, and nothing was accumulated.
  ireq.clear_tensor();
  auto ictx2 = Ctx();
  ASSERT_TRUE(stub_->GetTensorInfo(ictx2.get(), ireq, &info).ok());
  EXPECT_EQ(info.version(), 0);
  EXPECT_EQ(info.rejected_nonfinite_pushes(), 1);
  PushResponse ok;
  ASSERT_TRUE(Push(Stream(0, 0, 1.0f), &ok).ok());
  EXPECT_EQ(ok.chunks_duplicate(), 0);
}

// Shared memory (docs/parameter-shard.md): a push whose payloads lie in the
// worker's region is taken like one that carries them; a region the shard
// cannot map, a payload outside it, a slice naming shared memory without a
// region and a pull window too small for a message are refused with clear
// errors, nothing is accumulated, and the shard keeps serving.
TEST_F(ServiceTest, SharedMemoryRequestsAndBadOnes) {
  Ready();
  auto region = SharedRegion::Create(1 << 20);
  ASSERT_TRUE(region.ok()) << region.status();
  // The stream's payloads moved into the region.
  auto shared = [&](std::vector<PushRequest> stream) {
    int64_t at = SharedRegion::kHeaderBytes;
    for (PushRequest& m : stream) {
      *m.mutable_shm() = (*region)->desc();
      for (ChunkSlice& c : *m.mutable_slices()) {
        std::memcpy((*region)->data() + at, c.data().data(), c.data().size());
        c.set_shm_offset(at);
        c.set_shm_bytes(static_cast<int64_t>(c.data().size()));
        at += static_cast<int64_t>(c.data().size());
        c.clear_data();
      }
    }
    return stream;
  };
  PushResponse resp;
  auto foreign = shared(Stream(0, 0, 1.0f));
  for (auto& m : foreign) m.mutable_shm()->set_token(std::string(16, 'x'));
  grpc::Status s = Push(foreign, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find(std::string(kSharedMemoryRefused)),
            std::string::npos)
      << s.error_message();

  auto outside = shared(Stream(0, 0, 1.0f));
  outside.back().mutable_slices(0)->set_shm_offset((*region)->size() - 4);
  EXPECT_EQ(Push(outside, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  auto no_region = shared(Stream(0, 0, 1.0f));
  no_region[0].clear_shm();
  EXPECT_EQ(Push(no_region, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);

  // Nothing of those was taken: both ranks' good pushes make step 0, one
  // through shared memory, and the sum is what they pushed.
  ASSERT_TRUE(Push(shared(Stream(0, 0, 1.0f)), &resp).ok());
  EXPECT_EQ(resp.chunks_duplicate(), 0);
  ASSERT_TRUE(Push(Stream(1, 0, 3.0f), &resp).ok());
  GradNormRequest greq;
  greq.set_step(0);
  GradNormResponse gresp;
  auto gctx = Ctx();
  ASSERT_TRUE(stub_->GradNorm(gctx.get(), greq, &gresp).ok());
  EXPECT_DOUBLE_EQ(gresp.sum_squares(), 4.0 * shard_->num_elements());

  // Pulls: the shard writes the payloads into the window and the answer
  // names them; a window that holds no message is refused.
  PullRequest preq;
  preq.set_step(0);
  *preq.mutable_shm() = (*region)->desc();
  preq.set_shm_offset(SharedRegion::kHeaderBytes + 4096);
  preq.set_shm_bytes(1 << 16);
  auto pctx = Ctx();
  auto reader = stub_->Pull(pctx.get(), preq);
  PullResponse pulled;
  int64_t elements = 0;
  while (reader->Read(&pulled)) {
    EXPECT_EQ(pulled.next_message(), 0);
    for (const ChunkSlice& c : pulled.slices()) {
      EXPECT_TRUE(c.data().empty());
      ASSERT_GT(c.shm_bytes(), 0);
      ASSERT_GE(c.shm_offset(), preq.shm_offset());
      ASSERT_LE(c.shm_offset() + c.shm_bytes(),
                preq.shm_offset() + preq.shm_bytes());
      elements += c.shm_bytes() / 4;
    }
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(elements, shard_->num_elements());
  preq.set_shm_bytes(64);
  auto sctx = Ctx();
  auto small = stub_->Pull(sctx.get(), preq);
  while (small->Read(&pulled)) {
  }
  s = small->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(s.error_message().find("does not hold message 0"),
            std::string::npos)
      << s.error_message();
  preq.set_shm_bytes(1 << 16);
  preq.set_first_message(99);
  auto fctx = Ctx();
  auto far = stub_->Pull(fctx.get(), preq);
  while (far->Read(&pulled)) {
  }
  EXPECT_EQ(far->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace lmps
