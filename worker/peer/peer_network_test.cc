// PeerNetwork, WorkerPeerService and RingAllReduce over real gRPC servers on
// loopback, one per simulated worker.
#include "worker/peer/peer_network.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/rpc/grpc_server.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "worker/backend/cpu_backend.h"
#include "worker/backend/cpu_reference.h"
#include "worker/peer/mailbox.h"
#include "worker/peer/peer_service.h"
#include "worker/peer/ring_allreduce.h"

namespace lmps {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// One simulated worker: its mailbox served by its WorkerPeerService.
struct Node {
  std::unique_ptr<PeerMailbox> mailbox;
  std::unique_ptr<WorkerPeerService> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  void Stop() {
    if (mailbox) mailbox->Shutdown();
    if (server) server->Shutdown(std::chrono::system_clock::now());
    server.reset();
    service.reset();
  }
  ~Node() { Stop(); }
};

std::unique_ptr<Node> StartNode(WorkerPeerServiceOptions options = {}) {
  auto node = std::make_unique<Node>();
  auto mailbox = PeerMailbox::Create(PeerMailboxOptions());
  EXPECT_TRUE(mailbox.ok()) << mailbox.status();
  node->mailbox = std::move(*mailbox);
  auto service = WorkerPeerService::Create(node->mailbox.get(), options);
  EXPECT_TRUE(service.ok()) << service.status();
  node->service = std::move(*service);
  GrpcServerOptions go;
  go.listen_address = "127.0.0.1:0";
  auto started = StartGrpcServer(go, {node->service.get()});
  EXPECT_TRUE(started.ok()) << started.status();
  node->server = std::move(started->server);
  node->port = started->port;
  return node;
}

// The networks' channels (their sends are raw, common/wire).
std::shared_ptr<grpc::Channel> NewChannel(const std::string& address) {
  return MakeChannel(address);
}

// A generated stub: what an older worker (or grpcurl) sends.
std::unique_ptr<WorkerPeer::StubInterface> NewStub(const std::string& address) {
  return WorkerPeer::NewStub(MakeChannel(address));
}

TransferKey Activation(int64_t step, int32_t micro_batch) {
  TransferKey key;
  key.kind = ACTIVATION;
  key.step = step;
  key.micro_batch = micro_batch;
  return key;
}

class PeerNetworkTest : public ::testing::Test {
 protected:
  static constexpr int kWorkers = 3;

  void SetUp() override {
    for (int r = 0; r < kWorkers; ++r) {
      nodes_.push_back(StartNode());
      PeerInfo info;
      info.set_node_id(absl::StrCat("worker-", r));
      info.set_address(absl::StrCat("127.0.0.1:", nodes_.back()->port));
      info.set_dp_rank(0);
      info.set_pp_rank(0);
      info.set_tp_rank(r);
      workers_.push_back(info);
    }
  }

  // shared_window > 0: shared memory on, windows of that many bytes.
  std::unique_ptr<PeerNetwork> Network(
      int rank, int64_t max_message_bytes = 1024,
      absl::Duration timeout = absl::Seconds(30), int64_t shared_window = 0) {
    PeerNetworkOptions options;
    options.self_id = workers_[rank].node_id();
    options.self_rank = rank;
    options.max_message_bytes = max_message_bytes;
    options.timeout = timeout;
    options.shared_memory = shared_window > 0;
    options.shared_window_bytes = shared_window;
    options.log = [this](const std::string& line) { logged_.push_back(line); };
    auto network = PeerNetwork::Create(options, workers_,
                                       nodes_[rank]->mailbox.get(), NewChannel);
    EXPECT_TRUE(network.ok()) << network.status();
    return std::move(*network);
  }

  std::vector<std::unique_ptr<Node>> nodes_;
  std::vector<PeerInfo> workers_;
  std::vector<std::string> logged_;
};

TEST_F(PeerNetworkTest, CreateValidates) {
  PeerNetworkOptions options;
  options.self_id = "worker-1";
  options.self_rank = 0;  // is worker-0
  auto network = PeerNetwork::Create(options, workers_,
                                     nodes_[0]->mailbox.get(), NewChannel);
  EXPECT_EQ(network.status().code(), absl::StatusCode::kInvalidArgument);
  options.self_id = "worker-0";
  options.max_message_bytes = 3;
  network = PeerNetwork::Create(options, workers_, nodes_[0]->mailbox.get(),
                                NewChannel);
  EXPECT_EQ(network.status().code(), absl::StatusCode::kInvalidArgument);
  options.max_message_bytes = 1024;
  network = PeerNetwork::Create(options, workers_, nullptr, NewChannel);
  EXPECT_EQ(network.status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<PeerInfo> twice = {workers_[0], workers_[0]};
  network =
      PeerNetwork::Create(options, twice, nodes_[0]->mailbox.get(), NewChannel);
  EXPECT_EQ(network.status().code(), absl::StatusCode::kInvalidArgument);
  network = PeerNetwork::Create(options, workers_, nodes_[0]->mailbox.get(),
                                NewChannel);
  ASSERT_TRUE(network.ok()) << network.status();
  EXPECT_EQ((*network)->Describe(2),
            absl::StrCat("worker-2 (dp 0, pp 0, tp 2) at 127.0.0.1:",
                         nodes_[2]->port));
}

TEST_F(PeerNetworkTest, LargeActivationInManyMessages) {
  auto net0 = Network(0, /*max_message_bytes=*/1024);
  auto net1 = Network(1);
  std::vector<float> sent(100003);
  for (size_t i = 0; i < sent.size(); ++i) {
    sent[i] = std::sin(static_cast<float>(i)) * 1000.0f;
  }
  // The receiver waits before the sender starts.
  absl::StatusOr<std::vector<float>> received;
  std::thread receiver([&] { received = net1->Receive(0, Activation(3, 1)); });
  absl::SleepFor(absl::Milliseconds(50));
  ASSERT_TRUE(net0->Send(1, Activation(3, 1), sent.data(), sent.size()).ok());
  receiver.join();
  ASSERT_TRUE(received.ok()) << received.status();
  ASSERT_EQ(received->size(), sent.size());
  EXPECT_EQ(std::memcmp(received->data(), sent.data(), 4 * sent.size()), 0);
  EXPECT_EQ(net0->bytes_sent(), 4 * static_cast<int64_t>(sent.size()));
  EXPECT_EQ(nodes_[1]->mailbox->bytes_received(),
            4 * static_cast<int64_t>(sent.size()));
  EXPECT_EQ(nodes_[1]->mailbox->transfers_completed(), 1);
  EXPECT_EQ(nodes_[1]->mailbox->pending_bytes(), 0);

  // An empty transfer, and gradients going back.
  ASSERT_TRUE(net0->Send(1, Activation(3, 2), nullptr, 0).ok());
  auto empty = net1->Receive(0, Activation(3, 2));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->empty());
  TransferKey grad = Activation(3, 1);
  grad.kind = ACTIVATION_GRAD;
  ASSERT_TRUE(net1->Send(0, grad, sent.data(), 10).ok());
  auto back = net0->Receive(1, grad);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, std::vector<float>(sent.begin(), sent.begin() + 10));
}

// Shared memory (PeerNetworkOptions::shared_memory): a transfer that fits
// a window goes through it, a larger one through the socket, both arrive
// whole; a peer that refuses the region (WorkerPeerServiceOptions::
// shared_memory false, as on another host) gets the same transfer over the
// socket, nothing stored twice, and the sender says so once.
TEST_F(PeerNetworkTest, SharedMemorySendsAndFallsBack) {
  nodes_[2] = nullptr;
  WorkerPeerServiceOptions refusing;
  refusing.shared_memory = false;
  nodes_[2] = StartNode(refusing);
  workers_[2].set_address(absl::StrCat("127.0.0.1:", nodes_[2]->port));
  auto net0 = Network(0, 1024, absl::Seconds(30), /*shared_window=*/8192);
  auto net1 = Network(1);
  auto net2 = Network(2);
  std::vector<float> big(5000), small(1500);
  for (size_t i = 0; i < big.size(); ++i) big[i] = std::cos(1.0f * i);
  for (size_t i = 0; i < small.size(); ++i) small[i] = std::sin(1.0f * i);
  ASSERT_TRUE(net0->Send(1, Activation(1, 0), small.data(), small.size()).ok());
  EXPECT_EQ(net0->bytes_shared(), 4 * 1500);
  ASSERT_TRUE(net0->Send(1, Activation(1, 1), big.data(), big.size()).ok());
  EXPECT_EQ(net0->bytes_shared(), 4 * 1500);  // 20 kB > the window
  auto got_small = net1->Receive(0, Activation(1, 0));
  auto got_big = net1->Receive(0, Activation(1, 1));
  ASSERT_TRUE(got_small.ok() && got_big.ok());
  EXPECT_EQ(*got_small, small);
  EXPECT_EQ(*got_big, big);
  EXPECT_TRUE(logged_.empty());
  for (int k = 0; k < 2; ++k) {
    ASSERT_TRUE(
        net0->Send(2, Activation(2, k), small.data(), small.size()).ok());
    auto got = net2->Receive(0, Activation(2, k));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, small);
  }
  EXPECT_EQ(nodes_[2]->mailbox->transfers_completed(), 2);
  EXPECT_EQ(net0->bytes_shared(), 4 * 1500);
  ASSERT_EQ(logged_.size(), 1u);
  EXPECT_THAT(logged_[0], HasSubstr("cannot map this worker's shared memory"));
}

TEST_F(PeerNetworkTest, SendToSelfIsLocal) {
  auto net0 = Network(0);
  const std::vector<float> data = {1, 2, 3, 4, 5};
  ASSERT_TRUE(net0->Send(0, Activation(1, 0), data.data(), data.size()).ok());
  auto got = net0->Receive(0, Activation(1, 0));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, data);
}

TEST_F(PeerNetworkTest, DeadPeerFailsQuicklyNamingIt) {
  auto net0 = Network(0, 1024, absl::Seconds(30));
  nodes_[2]->Stop();
  const std::vector<float> data(1000, 1.0f);
  const absl::Time start = absl::Now();
  absl::Status status =
      net0->Send(2, Activation(3, 1), data.data(), data.size());
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_THAT(std::string(status.message()),
              StartsWith(absl::StrCat("sending ACTIVATION of step 3 "
                                      "micro-batch 1 to worker-2 (dp 0, pp 0, "
                                      "tp 2) at 127.0.0.1:",
                                      nodes_[2]->port, ": UNAVAILABLE: ")));
  EXPECT_EQ(net0->bytes_sent(), 0);
  // The other peers are still reachable.
  EXPECT_TRUE(net0->Send(1, Activation(3, 1), data.data(), data.size()).ok());
}

TEST_F(PeerNetworkTest, SilentPeerTimesOutNamingIt) {
  auto net0 = Network(0, 1024, absl::Seconds(1));
  const absl::Time start = absl::Now();
  auto got = net0->Receive(2, Activation(3, 1));
  const absl::Duration elapsed = absl::Now() - start;
  EXPECT_EQ(got.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(got.status().message(),
            absl::StrCat("timed out after 1s waiting for ACTIVATION of step 3 "
                         "micro-batch 1 from worker-2 (dp 0, pp 0, tp 2) at "
                         "127.0.0.1:",
                         nodes_[2]->port, " (nothing arrived)"));
  EXPECT_GE(elapsed, absl::Seconds(1));
  EXPECT_LT(elapsed, absl::Seconds(3));
}

TEST_F(PeerNetworkTest, ServiceRejectsMalformedStreamAndKeepsServing) {
  auto stub = NewStub(workers_[1].address());
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::seconds(10));
    PeerAck ack;
    auto writer = stub->Send(&context, &ack);
    PeerMessage good;
    good.set_kind(ACTIVATION);
    good.set_sender("worker-0");
    good.set_total_elements(2);
    good.set_data(std::string(8, '\0'));
    PeerMessage bad = good;
    bad.set_micro_batch(1);
    bad.set_data("abc");  // not whole floats
    writer->Write(good);
    writer->Write(bad);
    writer->WritesDone();
    grpc::Status status = writer->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("not a multiple of 4"));
  }
  {
    grpc::ClientContext context;
    PeerAck ack;
    auto writer = stub->Send(&context, &ack);
    PeerMessage unknown;
    unknown.set_kind(static_cast<PeerKind>(99));
    unknown.set_sender("worker-0");
    writer->Write(unknown);
    writer->WritesDone();
    EXPECT_EQ(writer->Finish().error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }
  EXPECT_EQ(nodes_[1]->mailbox->pending_transfers(), 0);
  auto net0 = Network(0);
  auto net1 = Network(1);
  const std::vector<float> data = {1.5f, -2.5f};
  ASSERT_TRUE(net0->Send(1, Activation(0, 0), data.data(), 2).ok());
  auto got = net1->Receive(0, Activation(0, 0));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, data);
}

// A client that is not one of the job's workers cannot store anything
// in a worker's mailbox once that worker's network exists.
TEST_F(PeerNetworkTest, ServiceRefusesSendersOutsideTheJob) {
  auto net0 = Network(0);
  auto net1 = Network(1);
  auto stub = NewStub(workers_[1].address());
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::seconds(10));
  PeerAck ack;
  auto writer = stub->Send(&context, &ack);
  PeerMessage m;
  m.set_kind(ACTIVATION);
  m.set_sender("intruder");
  m.set_total_elements(1 << 20);  // would reserve 4 MiB
  m.set_data(std::string(8, '\0'));
  writer->Write(m);
  writer->WritesDone();
  grpc::Status status = writer->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_THAT(status.error_message(), HasSubstr("not a worker of this job"));
  EXPECT_EQ(nodes_[1]->mailbox->pending_transfers(), 0);
  EXPECT_EQ(nodes_[1]->mailbox->pending_bytes(), 0);
  const std::vector<float> data = {1.5f, -2.5f};
  ASSERT_TRUE(net0->Send(1, Activation(0, 0), data.data(), 2).ok());
  auto got = net1->Receive(0, Activation(0, 0));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, data);
}

TEST_F(PeerNetworkTest, StreamAboveTheServiceCapIsRefused) {
  WorkerPeerServiceOptions options;
  options.max_stream_bytes = 2000;
  std::vector<std::string> log;
  options.log = [&log](const std::string& line) { log.push_back(line); };
  nodes_[1]->Stop();
  nodes_[1] = StartNode(options);
  workers_[1].set_address(absl::StrCat("127.0.0.1:", nodes_[1]->port));
  auto net0 = Network(0, 1024);
  const std::vector<float> data(1000, 2.0f);  // 4000 bytes in 4 messages
  absl::Status status =
      net0->Send(1, Activation(0, 0), data.data(), data.size());
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("worker-1"));
  EXPECT_EQ(nodes_[1]->mailbox->pending_transfers(), 0);
  EXPECT_EQ(nodes_[1]->mailbox->bytes_received(), 0);
  EXPECT_EQ(log.size(), 1u);
  // Smaller transfers still go through.
  EXPECT_TRUE(net0->Send(1, Activation(0, 1), data.data(), 100).ok());
}

// ---------------------------------------------------------------------------
// RingAllReduce.
// ---------------------------------------------------------------------------

// The input of `rank` for all-reduce number `call` (computed once: FMA
// contraction may round an inlined copy differently).
std::vector<float> Inputs(int rank, size_t n, int call) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    v[i] = static_cast<float>(
        std::sin(0.37 * static_cast<double>(i) + 1.3 * rank + 0.1 * call));
  }
  return v;
}

// A backend whose memory the collectives must treat as a device's: copied
// to the host and back (RingAllReduce's path for a CUDA backend).
class DeviceLikeBackend final : public ReferenceBackend {
 public:
  bool memory_is_host() const override { return false; }
};

// A CPU backend (host memory: the collectives work in place) or a
// DeviceLikeBackend.
absl::StatusOr<std::unique_ptr<Backend>> NewBackend(bool host_memory) {
  if (!host_memory) return std::make_unique<DeviceLikeBackend>();
  CpuBackendOptions bo;
  bo.num_threads = 1;
  absl::StatusOr<std::unique_ptr<CpuBackend>> cpu = CpuBackend::Create(bo);
  if (!cpu.ok()) return cpu.status();
  return std::unique_ptr<Backend>(std::move(*cpu));
}

// Runs AllReduceSum on every rank of a group of `size` workers (on threads,
// each with its own backend: NewBackend(host_memory)) for each n of `sizes` in turn, within one
// training step and one eval pass, and checks the results. Returns rank 0's
// results, one per call.
std::vector<std::vector<float>> RunRing(
    const std::vector<std::unique_ptr<PeerNetwork>>& networks,
    const std::vector<PeerMailbox*>& mailboxes,
    const std::vector<size_t>& sizes, const RingAllReduceOptions& options,
    bool host_memory = true) {
  const int size = static_cast<int>(networks.size());
  std::vector<int> group;
  for (int r = 0; r < size; ++r) group.push_back(r);
  // results[rank][call] = the all-reduced values.
  std::vector<std::vector<std::vector<float>>> results(size);
  std::vector<absl::Status> statuses(size);
  // inputs[rank][call]
  std::vector<std::vector<std::vector<float>>> inputs(size);
  for (int r = 0; r < size; ++r) {
    int call = 0;
    for (int pass = 0; pass < 2; ++pass) {
      for (size_t n : sizes) inputs[r].push_back(Inputs(r, n, call++));
    }
  }
  std::vector<std::unique_ptr<RingAllReduce>> rings(size);
  for (int r = 0; r < size; ++r) {
    auto ring = RingAllReduce::Create(networks[r].get(), group, r, options);
    EXPECT_TRUE(ring.ok()) << ring.status();
    if (!ring.ok()) return {};
    rings[r] = std::move(*ring);
    EXPECT_EQ(rings[r]->size(), size);
    EXPECT_EQ(rings[r]->rank(), r);
  }
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r]() {
      statuses[r] = [&]() -> absl::Status {
        auto backend = NewBackend(host_memory);
        if (!backend.ok()) return backend.status();
        int call = 0;
        for (bool eval : {false, true}) {
          rings[r]->SetStep(7, eval);
          for (size_t n : sizes) {
            std::vector<float> host = inputs[r][call];
            auto dev = (*backend)->Alloc(n);
            if (!dev.ok()) return dev.status();
            absl::Status s = (*backend)->CopyToBackend(*dev, host.data(), n);
            if (s.ok()) s = rings[r]->AllReduceSum(backend->get(), *dev, n);
            if (s.ok()) s = (*backend)->CopyToHost(host.data(), *dev, n);
            (*backend)->Free(*dev);
            if (!s.ok()) return s;
            results[r].push_back(std::move(host));
            ++call;
          }
        }
        return absl::OkStatus();
      }();
    });
  }
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < size; ++r) {
    EXPECT_TRUE(statuses[r].ok()) << "rank " << r << ": " << statuses[r];
    if (!statuses[r].ok()) return {};
  }
  int call = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t n : sizes) {
      for (int r = 0; r < size; ++r) {
        EXPECT_EQ(results[r][call].size(), n);
        if (results[r][call].size() != n) return {};
        // Bitwise identical on every rank.
        EXPECT_EQ(std::memcmp(results[r][call].data(), results[0][call].data(),
                              4 * n),
                  0)
            << "rank " << r << " n " << n;
      }
      for (size_t i = 0; i < n; ++i) {
        double sum = 0;
        for (int r = 0; r < size; ++r) sum += inputs[r][call][i];
        EXPECT_NEAR(results[0][call][i], sum, 1e-6) << "n " << n << " i " << i;
        if (std::abs(results[0][call][i] - sum) > 1e-6) return {};
      }
      ++call;
    }
  }
  // Over all ranks, each phase (reduce-scatter, all-gather) sends every
  // element size - 1 times; two passes (training and eval).
  int64_t elements = 0;
  for (size_t n : sizes) elements += static_cast<int64_t>(n);
  int64_t sent = 0;
  int64_t received = 0;
  for (int r = 0; r < size; ++r) {
    sent += rings[r]->bytes_sent();
    received += rings[r]->bytes_received();
    EXPECT_EQ(rings[r]->collectives(), 2 * static_cast<int64_t>(sizes.size()));
  }
  EXPECT_EQ(sent, 2 * 2 * 4 * elements * (size - 1));
  EXPECT_EQ(received, sent);
  for (int r = 0; r < size; ++r) {
    EXPECT_EQ(mailboxes[r]->pending_transfers(), 0);
  }
  return std::move(results[0]);
}

using RingAllReduceTest = PeerNetworkTest;

// Every group size, with segments whole (one piece) and pipelined in
// pieces of 1, 3 and 100 elements (uneven last pieces; segments of
// different piece counts), 1 to 3 sends in flight, in place (host memory)
// and through a host copy (device-like memory): correct sums, bitwise the
// same on every rank, for every piece size and both paths.
TEST_F(RingAllReduceTest, SizesSmallOddAndLargeWholeAndInPieces) {
  const std::vector<size_t> sizes = {0, 1, 2, 3, 5, 7, 1000, 4099};
  for (int size : {1, 2, 3}) {
    std::vector<std::unique_ptr<PeerNetwork>> networks;
    std::vector<PeerMailbox*> mailboxes;
    // 256-byte messages: big segments span several messages.
    for (int r = 0; r < size; ++r) {
      networks.push_back(Network(r, 256));
      mailboxes.push_back(nodes_[r]->mailbox.get());
    }
    std::vector<std::vector<float>> whole;
    for (const auto& [options, host_memory] :
         std::vector<std::pair<RingAllReduceOptions, bool>>{
             {{1 << 20, 1}, true},
             {{4, 1}, true},
             {{12, 2}, true},
             {{400, 3}, true},
             {{1 << 20, 1}, false},
             {{12, 2}, false}}) {
      SCOPED_TRACE(absl::StrCat("group of ", size, ", pieces of ",
                                options.piece_bytes, " bytes, ",
                                options.sends_in_flight, " in flight, ",
                                host_memory ? "in place" : "host copy"));
      std::vector<std::vector<float>> results =
          RunRing(networks, mailboxes, sizes, options, host_memory);
      ASSERT_EQ(results.size(), 2 * sizes.size());
      if (whole.empty()) {
        whole = std::move(results);
        continue;
      }
      for (size_t call = 0; call < whole.size(); ++call) {
        ASSERT_EQ(results[call].size(), whole[call].size());
        EXPECT_EQ(std::memcmp(results[call].data(), whole[call].data(),
                              4 * whole[call].size()),
                  0)
            << "call " << call;
      }
    }
  }
}

// The ring with its pieces through shared memory gives the socket's sums
// bit for bit (3 ranks, pieces of 1200 bytes in 256-byte messages).
TEST_F(RingAllReduceTest, SharedMemoryGivesTheSameSums) {
  const std::vector<size_t> sizes = {1, 7, 1000, 4099};
  std::vector<std::vector<float>> socket_results;
  for (int64_t window : {int64_t{0}, int64_t{2048}}) {
    std::vector<std::unique_ptr<PeerNetwork>> networks;
    std::vector<PeerMailbox*> mailboxes;
    for (int r = 0; r < 3; ++r) {
      networks.push_back(Network(r, 256, absl::Seconds(30), window));
      mailboxes.push_back(nodes_[r]->mailbox.get());
    }
    std::vector<std::vector<float>> results =
        RunRing(networks, mailboxes, sizes, {1200, 2});
    ASSERT_EQ(results.size(), 2 * sizes.size());
    int64_t shared = 0;
    for (const auto& n : networks) shared += n->bytes_shared();
    if (window == 0) {
      EXPECT_EQ(shared, 0);
      socket_results = std::move(results);
      continue;
    }
    EXPECT_GT(shared, 0);
    for (size_t call = 0; call < results.size(); ++call) {
      ASSERT_EQ(results[call], socket_results[call]) << "call " << call;
    }
  }
  EXPECT_TRUE(logged_.empty());
}

// Sequence parallelism's collectives: every rank reduce-scatters its input
// (segment r of the sum lands on rank r), then all-gathers the segments.
// The gathered sum is bitwise identical on every rank and across two
// repetitions (one summation order per segment, whatever the timing; the
// first in host memory, the second through host copies), gathering from the
// output's own segment gives the same, and it is close to the exact sum;
// sizes not divisible by the group are refused.
TEST_F(RingAllReduceTest, ReduceScatterThenAllGather) {
  for (const std::pair<int, int64_t>& config :
       std::vector<std::pair<int, int64_t>>{
           {1, 1 << 20}, {2, 1 << 20}, {3, 1 << 20}, {2, 12}, {3, 12}}) {
    const int size = config.first;
    const int64_t piece_bytes = config.second;
    SCOPED_TRACE(absl::StrCat("group of ", size, ", pieces of ", piece_bytes,
                              " bytes"));
    std::vector<std::unique_ptr<PeerNetwork>> networks;
    for (int r = 0; r < size; ++r) networks.push_back(Network(r, 256));
    std::vector<int> group;
    for (int r = 0; r < size; ++r) group.push_back(r);
    std::vector<std::unique_ptr<RingAllReduce>> rings(size);
    for (int r = 0; r < size; ++r) {
      auto ring = RingAllReduce::Create(
          networks[r].get(), group, r,
          {.piece_bytes = piece_bytes, .sends_in_flight = 2});
      ASSERT_TRUE(ring.ok()) << ring.status();
      rings[r] = std::move(*ring);
    }
    const std::vector<size_t> sizes = {0, static_cast<size_t>(size),
                                       static_cast<size_t>(size) * 333};
    // gathered[rank][rep][size index]
    std::vector<std::vector<std::vector<std::vector<float>>>> gathered(size);
    std::vector<absl::Status> statuses(size);
    std::vector<std::thread> threads;
    for (int r = 0; r < size; ++r) {
      threads.emplace_back([&, r]() {
        statuses[r] = [&]() -> absl::Status {
          // rep 0 in host memory (in place), rep 1 device-like (copies).
          std::unique_ptr<Backend> backends[2];
          for (int rep = 0; rep < 2; ++rep) {
            auto backend = NewBackend(rep == 0);
            if (!backend.ok()) return backend.status();
            backends[rep] = std::move(*backend);
          }
          gathered[r].resize(2);
          for (int rep = 0; rep < 2; ++rep) {
            Backend& be = *backends[rep];
            rings[r]->SetStep(rep, false);
            for (size_t k = 0; k < sizes.size(); ++k) {
              const size_t n = sizes[k], part = n / size;
              std::vector<float> host = Inputs(r, n, static_cast<int>(k));
              std::vector<float> all(n);
              auto in = be.Alloc(n + 1), mid = be.Alloc(part + 1),
                   out = be.Alloc(n + 1);
              if (!in.ok() || !mid.ok() || !out.ok()) {
                return absl::InternalError("alloc");
              }
              absl::Status s = be.CopyToBackend(*in, host.data(), n);
              if (s.ok()) s = rings[r]->ReduceScatterSum(&be, *in, *mid, n);
              if (s.ok()) s = rings[r]->AllGather(&be, *mid, *out, n);
              if (s.ok()) s = be.CopyToHost(all.data(), *out, n);
              // Gathering from the output's own segment gives the same.
              if (s.ok()) s = be.CopyToBackend(*in + r * part, all.data() + r * part, part);
              if (s.ok()) s = rings[r]->AllGather(&be, *in + r * part, *in, n);
              std::vector<float> again(n);
              if (s.ok()) s = be.CopyToHost(again.data(), *in, n);
              if (s.ok() && again != all) {
                s = absl::InternalError("gathering in place differs");
              }
              be.Free(*in);
              be.Free(*mid);
              be.Free(*out);
              if (!s.ok()) return s;
              gathered[r][rep].push_back(std::move(all));
            }
            if (size > 1) {
              // Not divisible: refused before any communication.
              float dummy[4] = {0, 0, 0, 0};
              auto d = be.Alloc(4);
              if (!d.ok()) return d.status();
              absl::Status s =
                  rings[r]->ReduceScatterSum(&be, *d, dummy, size + 1);
              absl::Status g = rings[r]->AllGather(&be, *d, dummy, size + 1);
              be.Free(*d);
              if (s.code() != absl::StatusCode::kInvalidArgument ||
                  g.code() != absl::StatusCode::kInvalidArgument) {
                return absl::InternalError(absl::StrCat(
                    "indivisible sizes accepted: ", s.ToString(), " / ",
                    g.ToString()));
              }
            }
          }
          return absl::OkStatus();
        }();
      });
    }
    for (std::thread& t : threads) t.join();
    for (int r = 0; r < size; ++r) {
      ASSERT_TRUE(statuses[r].ok()) << "rank " << r << ": " << statuses[r];
    }
    for (size_t k = 0; k < sizes.size(); ++k) {
      const size_t n = sizes[k];
      for (int r = 0; r < size; ++r) {
        for (int rep = 0; rep < 2; ++rep) {
          ASSERT_EQ(gathered[r][rep][k].size(), n);
          EXPECT_EQ(std::memcmp(gathered[r][rep][k].data(),
                                gathered[0][0][k].data(), 4 * n),
                    0)
              << "rank " << r << " rep " << rep << " n " << n;
        }
      }
      for (size_t i = 0; i < n; ++i) {
        double sum = 0;
        for (int r = 0; r < size; ++r) {
          sum += Inputs(r, n, static_cast<int>(k))[i];
        }
        ASSERT_NEAR(gathered[0][0][k][i], sum, 1e-6) << "n " << n << " i " << i;
      }
    }
    // Each of the three collectives sends (size - 1) / size of n per rank.
    int64_t sent = 0;
    for (int r = 0; r < size; ++r) sent += rings[r]->bytes_sent();
    int64_t elements = 0;
    for (size_t n : sizes) elements += static_cast<int64_t>(n);
    EXPECT_EQ(sent, 2 * 3 * 4 * elements * (size - 1));
  }
}

TEST_F(RingAllReduceTest, CreateValidates) {
  auto net1 = Network(1);
  EXPECT_EQ(RingAllReduce::Create(net1.get(), {0, 1}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);  // group[0] is not rank 1
  EXPECT_EQ(RingAllReduce::Create(net1.get(), {1, 1}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RingAllReduce::Create(net1.get(), {1, 5}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RingAllReduce::Create(nullptr, {1}, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RingAllReduce::Create(net1.get(), {1}, 0, {.piece_bytes = 3})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RingAllReduce::Create(net1.get(), {1}, 0, {.sends_in_flight = 0})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(RingAllReduce::Create(net1.get(), {2, 1, 0}, 1).ok());
}

TEST_F(RingAllReduceTest, MissingPeerFailsNamingIt) {
  auto net0 = Network(0, 1024, absl::Seconds(1));
  auto ring = RingAllReduce::Create(net0.get(), {0, 1}, 0);
  ASSERT_TRUE(ring.ok()) << ring.status();
  auto backend = CpuBackend::Create(CpuBackendOptions{1});
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto dev = (*backend)->Alloc(8);
  ASSERT_TRUE(dev.ok());
  (*ring)->SetStep(4, false);
  const absl::Time start = absl::Now();
  absl::Status status = (*ring)->AllReduceSum(backend->get(), *dev, 8);
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  (*backend)->Free(*dev);
  EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("waiting for ALL_REDUCE #0 round 0 of step 4 from "
                        "worker-1 (dp 0, pp 0, tp 1)"));
}

// The next rank is down: its first piece's send fails, and that stops the
// receive waiting for the previous rank at once (long before the 30 s
// timeout), with the send's error naming the dead peer. Pipelined (pieces
// of 16 elements on 2 sender threads) and whole (one piece per segment:
// the sends run inline).
TEST_F(RingAllReduceTest, DeadNextPeerStopsTheRingAtOnce) {
  nodes_[1]->Stop();
  for (const RingAllReduceOptions& options :
       std::vector<RingAllReduceOptions>{{64, 2}, {}}) {
    SCOPED_TRACE(absl::StrCat("pieces of ", options.piece_bytes, " bytes"));
    auto net0 = Network(0, 1024, absl::Seconds(30));
    auto ring = RingAllReduce::Create(net0.get(), {0, 1, 2}, 0, options);
    ASSERT_TRUE(ring.ok()) << ring.status();
    auto backend = CpuBackend::Create(CpuBackendOptions{1});
    ASSERT_TRUE(backend.ok()) << backend.status();
    auto dev = (*backend)->Alloc(3000);
    ASSERT_TRUE(dev.ok());
    (*ring)->SetStep(4, false);
    const absl::Time start = absl::Now();
    absl::Status status = (*ring)->AllReduceSum(backend->get(), *dev, 3000);
    EXPECT_LT(absl::Now() - start, absl::Seconds(10));
    (*backend)->Free(*dev);
    EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
    // Pieces 0 and 1 may be sent concurrently: either fails first.
    EXPECT_THAT(std::string(status.message()),
                StartsWith("sending ALL_REDUCE #0 round 0 "));
    EXPECT_THAT(std::string(status.message()),
                HasSubstr(absl::StrCat("of step 4 to worker-1 (dp 0, pp 0, "
                                       "tp 1) at 127.0.0.1:",
                                       nodes_[1]->port, ": UNAVAILABLE")));
  }
}

}  // namespace
}  // namespace lmps
