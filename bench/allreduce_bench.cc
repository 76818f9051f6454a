// Tensor-parallel all-reduce bandwidth benchmark. allreduce_bench runs a
// whole tp group in this process: for each buffer size of --mib it starts
// --ranks WorkerPeerService gRPC servers on 127.0.0.1 (port 0), each with its
// own PeerMailbox, PeerNetwork and RingAllReduce over the group, and one
// thread per rank with its own CPU backend buffer, i.e. the production path
// of worker/peer over real loopback TCP connections (one per neighbour).
//
// Per size: one warm-up all-reduce, then --repeats timed ones. Before each,
// every rank refills its buffer (rank r: r + 1 + k plus an index-dependent
// multiple of 1/1024, k varying with the iteration; every partial sum is
// exactly representable in fp32, so the result must equal the expected sum
// bitwise whatever the order of the additions) and waits at a barrier; the
// time runs from the barrier's release to the last rank finishing its
// AllReduceSum. Every result is checked on every rank. Each iteration has
// its own step (SetStep), so message tags never collide.
//
// Reported per size (GB = 1e9 bytes), median over the repeats:
//   algbw = bytes / time
//   busbw = algbw * 2 (n - 1) / n   (NCCL's convention: what every rank
//           sends, and receives, over its link to its ring neighbour, so it
//           is comparable with the bandwidth of one TCP stream)
// plus the process's CPU seconds (every rank's sends, receives, copies and
// additions, gRPC threads included) per GB sent by all ranks together over
// the timed iterations. Last lines (parsed by bench/allreduce_vs_iperf3.sh):
//   allreduce cpu s/GB (largest size): X.XX
//   allreduce busbw GB/s (largest size, median): X.XX
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/rpc/allocator.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/status_util.h"
#include "proto/lmps.grpc.pb.h"
#include "worker/backend/cpu_backend.h"
#include "worker/peer/mailbox.h"
#include "worker/peer/peer_network.h"
#include "worker/peer/peer_service.h"
#include "worker/peer/ring_allreduce.h"

ABSL_FLAG(int, ranks, 2, "workers in the tensor-parallel group (ring)");
ABSL_FLAG(std::string, mib, "1,4,16,64",
          "comma-separated buffer sizes in MiB (fp32 elements = MiB * 2^18)");
ABSL_FLAG(int, repeats, 7, "timed all-reduces per size (after 1 warm-up)");
ABSL_FLAG(int64_t, max_message_bytes, 4 << 20,
          "payload per PeerMessage (PeerNetworkOptions::max_message_bytes)");
ABSL_FLAG(int64_t, piece_bytes, lmps::RingAllReduceOptions().piece_bytes,
          "payload per pipelined piece of a ring round's segment "
          "(RingAllReduceOptions::piece_bytes; >= the segment: unpipelined)");
ABSL_FLAG(int, sends_in_flight, lmps::RingAllReduceOptions().sends_in_flight,
          "pieces sent concurrently (RingAllReduceOptions::sends_in_flight)");
ABSL_FLAG(int, timeout_s, 60, "PeerNetwork timeout per send and receive");
ABSL_FLAG(bool, shared_memory, true,
          "pieces through shared memory between the ranks "
          "(PeerNetworkOptions::shared_memory); false: the loopback socket");

namespace lmps {
namespace {

using Clock = std::chrono::steady_clock;

double CpuSeconds() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// A reusable barrier for `count` threads. The last thread to arrive runs
// `on_release` (under the lock) before it lets the others go.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}

  void ArriveAndWait(const std::function<void()>& on_release = nullptr) {
    absl::MutexLock lock(&mu_);
    const int64_t generation = generation_;
    if (++arrived_ == count_) {
      if (on_release) on_release();
      arrived_ = 0;
      ++generation_;
      return;
    }
    auto released = [this, generation]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return generation_ != generation;
    };
    mu_.Await(absl::Condition(&released));
  }

 private:
  const int count_;
  absl::Mutex mu_;
  int arrived_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;
};

// One rank's server side: its mailbox served by its WorkerPeerService.
struct Node {
  std::unique_ptr<PeerMailbox> mailbox;
  std::unique_ptr<WorkerPeerService> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  // In the order of peer_service.h.
  void Stop() {
    if (mailbox) mailbox->Shutdown();
    if (server) server->Shutdown(std::chrono::system_clock::now());
    server.reset();
    service.reset();
  }
  ~Node() { Stop(); }
};

absl::StatusOr<std::unique_ptr<Node>> StartNode() {
  auto node = std::make_unique<Node>();
  LMPS_ASSIGN_OR_RETURN(node->mailbox,
                        PeerMailbox::Create(PeerMailboxOptions()));
  LMPS_ASSIGN_OR_RETURN(node->service,
                        WorkerPeerService::Create(node->mailbox.get(), {}));
  GrpcServerOptions options;
  options.listen_address = "127.0.0.1:0";
  LMPS_ASSIGN_OR_RETURN(StartedServer started,
                        StartGrpcServer(options, {node->service.get()}));
  node->server = std::move(started.server);
  node->port = started.port;
  return node;
}

// Deterministic index-dependent fraction in [0, 1), a multiple of 1/1024
// (a hash, so that a segment landing at the wrong offset is detected).
inline float Fraction(size_t i) {
  uint64_t x = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull;
  x ^= x >> 29;
  return static_cast<float>((x >> 20) & 1023) / 1024.0f;
}

// Rank r's input of iteration `it` at index i is Base(r, it) + Fraction(i).
inline float Base(int rank, int it) {
  return static_cast<float>(rank + 1 + it % 5);
}

struct SizeResult {
  double mib = 0;
  int64_t bytes = 0;
  std::vector<double> seconds;  // timed iterations
  double cpu_seconds = 0;       // process CPU over the timed iterations
};

double Median(std::vector<double> s) {
  std::sort(s.begin(), s.end());
  return s[s.size() / 2];
}

absl::StatusOr<SizeResult> RunSize(double mib, int ranks, int repeats) {
  const size_t n = static_cast<size_t>(mib * (1 << 20) / 4 + 0.5);
  if (n == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--mib: ", mib, " MiB holds no fp32 element"));
  }
  SizeResult result;
  result.mib = mib;
  result.bytes = 4 * static_cast<int64_t>(n);

  // Servers, then the group's view of itself.
  std::vector<std::unique_ptr<Node>> nodes;
  std::vector<PeerInfo> workers;
  for (int r = 0; r < ranks; ++r) {
    LMPS_ASSIGN_OR_RETURN(std::unique_ptr<Node> node, StartNode());
    PeerInfo info;
    info.set_node_id(absl::StrCat("worker-", r));
    info.set_address(absl::StrCat("127.0.0.1:", node->port));
    info.set_dp_rank(0);
    info.set_pp_rank(0);
    info.set_tp_rank(r);
    workers.push_back(info);
    nodes.push_back(std::move(node));
  }
  std::vector<int> group;
  for (int r = 0; r < ranks; ++r) group.push_back(r);
  std::vector<std::unique_ptr<PeerNetwork>> networks;
  std::vector<std::unique_ptr<RingAllReduce>> rings;
  RingAllReduceOptions ring_options;
  ring_options.piece_bytes = absl::GetFlag(FLAGS_piece_bytes);
  ring_options.sends_in_flight = absl::GetFlag(FLAGS_sends_in_flight);
  for (int r = 0; r < ranks; ++r) {
    PeerNetworkOptions options;
    options.self_id = workers[r].node_id();
    options.self_rank = r;
    options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
    options.timeout = absl::Seconds(absl::GetFlag(FLAGS_timeout_s));
    options.shared_memory = absl::GetFlag(FLAGS_shared_memory);
    LMPS_ASSIGN_OR_RETURN(
        std::unique_ptr<PeerNetwork> network,
        PeerNetwork::Create(options, workers, nodes[r]->mailbox.get(),
                            [](const std::string& address) {
                              return MakeChannel(address);
                            }));
    networks.push_back(std::move(network));
    LMPS_ASSIGN_OR_RETURN(std::unique_ptr<RingAllReduce> ring,
                          RingAllReduce::Create(networks[r].get(), group, r,
                                                ring_options));
    rings.push_back(std::move(ring));
  }

  // Iteration 0 is the warm-up (it also connects the channels).
  const int iterations = 1 + repeats;
  Barrier barrier(ranks);
  Clock::time_point start;
  double cpu_start = 0;
  std::vector<Clock::time_point> finished(ranks);
  std::vector<absl::Status> statuses(ranks);
  absl::Mutex failed_mu;
  bool failed = false;  // guarded by failed_mu; read at barriers
  auto fail = [&](int r, absl::Status s) {
    statuses[r] = std::move(s);
    absl::MutexLock lock(&failed_mu);
    if (!failed) {
      failed = true;
      // Wake every rank still waiting for a peer.
      for (auto& node : nodes) node->mailbox->Shutdown();
    }
  };
  // Whether to stop, decided by the last rank at a barrier (read by every
  // rank after it, written only at the next barrier's release).
  bool stop = false;
  auto any_failed = [&] {
    absl::MutexLock lock(&failed_mu);
    return failed;
  };

  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      CpuBackendOptions bo;
      bo.num_threads = 1;
      absl::StatusOr<std::unique_ptr<CpuBackend>> backend =
          CpuBackend::Create(bo);
      float* dev = nullptr;
      if (!backend.ok()) {
        fail(r, backend.status());
      } else {
        absl::StatusOr<float*> alloc = (*backend)->Alloc(n);
        if (alloc.ok()) {
          dev = *alloc;
        } else {
          fail(r, alloc.status());
        }
      }
      std::vector<float> host(n);
      for (int it = 0; it < iterations; ++it) {
        // Untimed: this rank's input of this iteration.
        bool ok = dev != nullptr && !any_failed();
        if (ok) {
          const float base = Base(r, it);
          for (size_t i = 0; i < n; ++i) host[i] = base + Fraction(i);
          absl::Status s = (*backend)->CopyToBackend(dev, host.data(), n);
          if (!s.ok()) {
            fail(r, s);
            ok = false;
          }
        }
        barrier.ArriveAndWait([&] {
          cpu_start = CpuSeconds();
          start = Clock::now();
        });
        if (ok && !any_failed()) {
          rings[r]->SetStep(it, /*eval=*/false);
          absl::Status s = rings[r]->AllReduceSum(backend->get(), dev, n);
          finished[r] = Clock::now();
          if (!s.ok()) fail(r, s);
        }
        barrier.ArriveAndWait([&] {
          stop = any_failed();
          if (it == 0 || stop) return;
          result.cpu_seconds += CpuSeconds() - cpu_start;
          const Clock::time_point last =
              *std::max_element(finished.begin(), finished.end());
          result.seconds.push_back(
              std::chrono::duration<double>(last - start).count());
        });
        // `stop` only changes at the next barrier's release, so every rank
        // takes the same decision here.
        if (stop) break;
        // Untimed: check the result.
        absl::Status s = (*backend)->CopyToHost(host.data(), dev, n);
        if (!s.ok()) {
          fail(r, s);
        } else {
          float base_sum = 0;
          for (int q = 0; q < ranks; ++q) base_sum += Base(q, it);
          for (size_t i = 0; i < n; ++i) {
            const float expected =
                base_sum + static_cast<float>(ranks) * Fraction(i);
            if (host[i] != expected) {
              fail(r, absl::DataLossError(absl::StrCat(
                          "rank ", r, ", ", mib, " MiB, iteration ", it,
                          ": element ", i, " is ", host[i], ", expected ",
                          expected)));
              break;
            }
          }
        }
        // Everyone checked before the next refill.
        barrier.ArriveAndWait([&] { stop = any_failed(); });
        if (stop) break;
      }
      if (dev != nullptr) (*backend)->Free(dev);
    });
  }
  for (std::thread& t : threads) t.join();

  // Tear down: rings and networks (channels) first, then the servers.
  rings.clear();
  networks.clear();
  for (auto& node : nodes) node->Stop();
  for (int r = 0; r < ranks; ++r) {
    if (!statuses[r].ok()) {
      // The first real error, not a rank woken by the shutdown.
      if (statuses[r].code() == absl::StatusCode::kUnavailable) continue;
      return statuses[r];
    }
  }
  for (int r = 0; r < ranks; ++r) {
    if (!statuses[r].ok()) return statuses[r];
  }
  if (static_cast<int>(result.seconds.size()) != repeats) {
    return absl::InternalError("missing timings");
  }
  return result;
}

absl::Status Run() {
  const int ranks = absl::GetFlag(FLAGS_ranks);
  const int repeats = absl::GetFlag(FLAGS_repeats);
  const int64_t max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  if (ranks < 2) return absl::InvalidArgumentError("--ranks must be >= 2");
  if (repeats < 1) return absl::InvalidArgumentError("--repeats must be >= 1");
  // Room for the message header under the channels' message-size limit.
  if (max_message_bytes < 4 || max_message_bytes > kDefaultMaxMessageBytes - 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_message_bytes must be in [4, ",
                     kDefaultMaxMessageBytes - 4096, "]"));
  }
  if (absl::GetFlag(FLAGS_piece_bytes) < 4) {
    return absl::InvalidArgumentError("--piece_bytes must be >= 4");
  }
  if (absl::GetFlag(FLAGS_timeout_s) < 1) {
    return absl::InvalidArgumentError("--timeout_s must be >= 1");
  }
  std::vector<double> sizes;
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_mib), ',', absl::SkipWhitespace())) {
    double mib = 0;
    if (!absl::SimpleAtod(part, &mib) || !(mib > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--mib: \"", part, "\" is not a positive number"));
    }
    sizes.push_back(mib);
  }
  if (sizes.empty()) return absl::InvalidArgumentError("--mib is empty");

  const double bus_factor = 2.0 * (ranks - 1) / ranks;
  std::printf(
      "allreduce_bench: ring all-reduce (worker/peer RingAllReduce over "
      "gRPC) of %d ranks in one process on 127.0.0.1, CPU backend; "
      "max_message_bytes %lld, piece_bytes %lld, sends_in_flight %d; "
      "median of %d timed "
      "all-reduces after 1 warm-up; busbw = algbw * 2(n-1)/n = algbw * %.3f; "
      "GB = 1e9 bytes\n",
      ranks, static_cast<long long>(max_message_bytes),
      static_cast<long long>(absl::GetFlag(FLAGS_piece_bytes)),
      absl::GetFlag(FLAGS_sends_in_flight), repeats,
      bus_factor);
  std::fflush(stdout);

  double largest_mib = -1;
  double largest_busbw = 0;
  double largest_cpu = 0;
  for (double mib : sizes) {
    LMPS_ASSIGN_OR_RETURN(SizeResult r, RunSize(mib, ranks, repeats));
    const double gb = static_cast<double>(r.bytes) / 1e9;
    const double median = Median(r.seconds);
    const double best = *std::min_element(r.seconds.begin(), r.seconds.end());
    const double worst = *std::max_element(r.seconds.begin(), r.seconds.end());
    const double algbw = gb / median;
    const double busbw = algbw * bus_factor;
    // Bytes sent by all ranks over the timed iterations.
    const double sent_gb = gb * bus_factor * ranks * repeats;
    std::printf(
        "%g MiB: median %.2f ms (best %.2f, worst %.2f), algbw %.2f GB/s, "
        "busbw %.2f GB/s (%.2f Gbit/s) [busbw best %.2f, worst %.2f GB/s; "
        "cpu s per GB sent (all ranks, whole process): %.2f]\n",
        mib, 1e3 * median, 1e3 * best, 1e3 * worst, algbw, busbw, 8 * busbw,
        gb * bus_factor / best, gb * bus_factor / worst,
        r.cpu_seconds / sent_gb);
    std::fflush(stdout);
    if (mib > largest_mib) {
      largest_mib = mib;
      largest_busbw = busbw;
      largest_cpu = r.cpu_seconds / sent_gb;
    }
  }
  std::printf("allreduce cpu s/GB (largest size): %.2f\n", largest_cpu);
  std::printf("allreduce busbw GB/s (largest size, median): %.2f\n",
              largest_busbw);
  return absl::OkStatus();
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  // As lmps_worker does (common/rpc/allocator.h).
  lmps::TuneAllocatorForLargeBuffers();
  absl::SetProgramUsageMessage(
      "tensor-parallel all-reduce bandwidth on loopback: allreduce_bench "
      "[--ranks=2] [--mib=1,4,16,64] [--repeats=7] "
      "[--max_message_bytes=4194304] [--piece_bytes=8388608] "
      "[--sends_in_flight=2]");
  absl::ParseCommandLine(argc, argv);
  signal(SIGPIPE, SIG_IGN);
  const absl::Status status = lmps::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "allreduce_bench: error: %s\n",
                 status.ToString().c_str());
    return 1;
  }
  return 0;
}
