// Parameter-server throughput benchmark. ps_bench acts as the one worker of
// a job it runs itself: it starts (fork/exec) an lmps_scheduler and
// --shards lmps_server processes on 127.0.0.1, registers as the worker
// (dp = 1), builds a PsClient and times whole-model transfers:
//
//   pull       PsClient::Pull(step 0): every shard streams its part of the
//              fp32 parameters in parallel.
//   push f32   PsClient::Push(step 0) of an fp32 gradient.
//   push bf16  the same with PsClientOptions::push_dtype = BF16 (half the
//              bytes on the wire).
//
// The first push of step 0 is accepted; the shards count the repeats as
// duplicates and do not accumulate them, but every byte still travels and
// is validated (headers, tiling, NaN/Inf scan), so the repeats measure the
// transfer path. Rates are GB/s (1e9 bytes) of payload over the wall time of
// the whole PsClient call, median over --repeats rounds (each round does a
// pull, a push f32 and a push bf16, so all three see the same machine load)
// after --warmup untimed rounds. Also printed: the CPU seconds the client
// and the shards spent per GB, and a single-threaded memcpy of the model for
// scale. Output lines (parsed by bench/ps_vs_iperf3.sh):
//
//   pull: 1.23 GB/s (9.84 Gbit/s) over 2 shards, 102 MB model
//   push f32: ...
//   push bf16: ...
//
// Children die with ps_bench (common/process/process_group.h) and are
// stopped and reaped on every exit path, including SIGINT/SIGTERM.
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/text_format.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/clients/scheduler_client.h"
#include "common/model/job_spec.h"
#include "common/model/model_spec.h"
#include "common/process/binaries.h"
#include "common/process/process_group.h"
#include "common/rpc/allocator.h"
#include "common/rpc/grpc_server.h"
#include "common/rpc/status_util.h"
#include "proto/lmps.grpc.pb.h"
#include "worker/ps_client.h"

ABSL_FLAG(int, shards, 2, "parameter-server shards (lmps_server processes)");
ABSL_FLAG(int, n_layer, 8, "model: transformer blocks");
ABSL_FLAG(int, n_head, 8, "model: attention heads");
ABSL_FLAG(int, n_embd, 512, "model: width");
ABSL_FLAG(int, block_size, 256, "model: context length");
ABSL_FLAG(int, repeats, 5, "timed rounds (pull, push f32, push bf16 each)");
ABSL_FLAG(int, warmup, 1, "untimed rounds before the timed ones");
ABSL_FLAG(int64_t, max_message_bytes, 0,
          "job's max_message_bytes (0: the spec default, 4 MiB)");
ABSL_FLAG(int64_t, max_push_stream_bytes, 0,
          "job's max_push_stream_bytes (0: the spec default, 8 MiB)");
ABSL_FLAG(bool, shared_memory, true,
          "job's shared_memory: AUTO (true: payloads through shared memory "
          "between processes on this host) or OFF (false: the socket)");
ABSL_FLAG(int, streams_per_shard, 0,
          "job's streams_per_shard (0: the spec default, 1)");
ABSL_FLAG(int64_t, max_chunk_bytes, 0,
          "job's max_chunk_bytes (0: the spec default, 4 MiB)");
ABSL_FLAG(std::string, bin_dir, "",
          "directory of the lmps binaries (default: the bazel-bin directory "
          "this binary is in, i.e. the parent of its bench/ directory)");
ABSL_FLAG(std::string, work_dir, "",
          "where the job spec and the daemons' logs go (default: a new "
          "temporary directory, removed at the end unless --keep_logs)");
ABSL_FLAG(bool, keep_logs, false, "keep the temporary work directory");
ABSL_FLAG(int, startup_timeout_s, 120,
          "give up if the job has not assembled and every shard answers "
          "within this many seconds");

namespace lmps {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------
// Child processes.
// ---------------------------------------------------------------------------

// SIGINT/SIGTERM: kill and reap every child (async-signal-safe calls only),
// then exit as if killed by the signal.
void OnFatalSignal(int sig) {
  ProcessGroup::KillAllFromSignalHandler();
  _exit(128 + sig);
}

struct ProcessUsage {
  double cpu_seconds = 0;   // user + system
  double minor_faults = 0;  // page faults served without I/O (fresh pages)
};

// This process's CPU time and minor page faults.
ProcessUsage SelfUsage() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  ProcessUsage out;
  out.cpu_seconds =
      static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
      1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
  out.minor_faults = static_cast<double>(u.ru_minflt);
  return out;
}

// The scheduler and the shards (common/process/process_group.h): each
// dies with ps_bench and ignores SIGINT. Destruction stops (SIGTERM, then
// SIGKILL after 5 s) and reaps every child still running.
class Children {
 public:
  struct Child {
    std::string name;
    std::string log;
    pid_t pid = -1;
    bool exited = false;  // reported by CheckAlive, or stopped
  };

  // Starts `binary args...` with stdout and stderr to `log`.
  absl::Status Start(const std::string& name, const std::string& binary,
                     const std::vector<std::string>& args,
                     const std::string& log) {
    std::vector<std::string> argv = {binary};
    argv.insert(argv.end(), args.begin(), args.end());
    SpawnOptions options;
    options.output_path = log;
    options.ignore_sigint = true;  // ps_bench decides how children stop
    absl::StatusOr<pid_t> pid = group_.Spawn(argv, options);
    if (absl::IsNotFound(pid.status())) {
      return absl::NotFoundError(
          absl::StrCat(pid.status().message(),
                       " (bazel build //bench:ps_bench builds it, or pass "
                       "--bin_dir)"));
    }
    LMPS_RETURN_IF_ERROR(pid.status());
    children_.push_back({name, log, *pid, false});
    return absl::OkStatus();
  }

  // An error naming the first child that exited (with the end of its log).
  absl::Status CheckAlive() {
    for (Child& c : children_) {
      if (c.exited) continue;
      const std::optional<ExitStatus> status = group_.Poll(c.pid);
      if (!status.has_value()) continue;
      c.exited = true;
      return absl::AbortedError(absl::StrCat(c.name, " ", status->Describe(),
                                             "; the end of ", c.log, ":\n",
                                             LogTail(c.log, 15)));
    }
    return absl::OkStatus();
  }

  // CPU seconds (user + system) and minor page faults so far of the running
  // children, from /proc/<pid>/stat.
  ProcessUsage Usage() const {
    const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
    ProcessUsage total;
    for (const pid_t pid : group_.running_pids()) {
      std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
      std::string text((std::istreambuf_iterator<char>(in)),
                       std::istreambuf_iterator<char>());
      // The fields after the ")" that closes the command name start with
      // field 3 (state); minflt is field 10, utime 14, stime 15.
      const size_t close = text.rfind(')');
      if (close == std::string::npos) continue;
      std::istringstream fields(text.substr(close + 2));
      std::string field;
      for (int i = 3; i <= 15 && (fields >> field); ++i) {
        if (i == 10) total.minor_faults += std::atof(field.c_str());
        if (i == 14 || i == 15) total.cpu_seconds += std::atof(field.c_str()) / tick;
      }
    }
    return total;
  }

  void StopAll() {
    group_.StopAll();
    for (Child& c : children_) c.exited = true;
  }

 private:
  ProcessGroup group_;
  std::vector<Child> children_;
};

// ---------------------------------------------------------------------------
// Measurements.
// ---------------------------------------------------------------------------

struct Samples {
  std::string name;
  int64_t payload_bytes = 0;  // per call
  std::vector<double> seconds;
  // Summed over the timed calls.
  ProcessUsage client, shards;

  double Median() const {
    std::vector<double> s = seconds;
    std::sort(s.begin(), s.end());
    return s[s.size() / 2];
  }
  double Best() const { return *std::min_element(seconds.begin(), seconds.end()); }
  double Worst() const { return *std::max_element(seconds.begin(), seconds.end()); }
};

// Runs `call` once; when `timed`, appends its wall time and CPU use.
absl::Status Measure(const std::function<absl::Status()>& call, bool timed,
                     const Children& children, Samples* samples) {
  const ProcessUsage client0 = SelfUsage();
  const ProcessUsage shards0 = children.Usage();
  const Clock::time_point t0 = Clock::now();
  LMPS_RETURN_IF_ERROR(call());
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  if (timed) {
    const ProcessUsage client1 = SelfUsage();
    const ProcessUsage shards1 = children.Usage();
    samples->seconds.push_back(wall);
    samples->client.cpu_seconds += client1.cpu_seconds - client0.cpu_seconds;
    samples->client.minor_faults += client1.minor_faults - client0.minor_faults;
    samples->shards.cpu_seconds += shards1.cpu_seconds - shards0.cpu_seconds;
    samples->shards.minor_faults += shards1.minor_faults - shards0.minor_faults;
  }
  return absl::OkStatus();
}

void Report(const Samples& s, int shards, double model_mb) {
  const double gb = static_cast<double>(s.payload_bytes) / 1e9;
  const double median = gb / s.Median();
  const double timed_gb = gb * static_cast<double>(s.seconds.size());
  const double timed_pages = timed_gb * 1e9 / 4096;
  std::printf(
      "%s: %.2f GB/s (%.2f Gbit/s) over %d shards, %.0f MB model "
      "[%.1f MB payload per call, median of %zu; best %.2f, worst %.2f GB/s; "
      "cpu s/GB: client %.2f, shards %.2f; fresh 4 KiB pages faulted per "
      "payload page: client %.2f, shards %.2f]\n",
      s.name.c_str(), median, 8 * median, shards, model_mb,
      static_cast<double>(s.payload_bytes) / 1e6, s.seconds.size(),
      gb / s.Best(), gb / s.Worst(), s.client.cpu_seconds / timed_gb,
      s.shards.cpu_seconds / timed_gb, s.client.minor_faults / timed_pages,
      s.shards.minor_faults / timed_pages);
}

// ---------------------------------------------------------------------------
// The benchmark.
// ---------------------------------------------------------------------------

absl::StatusOr<JobSpec> MakeSpec(int shards) {
  JobSpec spec;
  LMPS_ASSIGN_OR_RETURN(spec, ParseJobSpec(""));
  spec.set_name("ps_bench");
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(absl::GetFlag(FLAGS_n_layer));
  m->set_n_head(absl::GetFlag(FLAGS_n_head));
  m->set_n_embd(absl::GetFlag(FLAGS_n_embd));
  m->set_block_size(absl::GetFlag(FLAGS_block_size));
  spec.mutable_layout()->set_dp(1);
  spec.mutable_layout()->set_num_shards(shards);
  // Nothing is ever applied; keep the job long enough not to finish.
  spec.mutable_train()->set_steps(1000);
  if (absl::GetFlag(FLAGS_max_push_stream_bytes) > 0) {
    spec.set_max_push_stream_bytes(absl::GetFlag(FLAGS_max_push_stream_bytes));
  }
  if (!absl::GetFlag(FLAGS_shared_memory)) {
    spec.set_shared_memory(SHARED_MEMORY_OFF);
  }
  if (absl::GetFlag(FLAGS_streams_per_shard) > 0) {
    spec.set_streams_per_shard(absl::GetFlag(FLAGS_streams_per_shard));
  }
  if (absl::GetFlag(FLAGS_max_message_bytes) > 0) {
    spec.set_max_message_bytes(absl::GetFlag(FLAGS_max_message_bytes));
  }
  if (absl::GetFlag(FLAGS_max_chunk_bytes) > 0) {
    spec.set_max_chunk_bytes(absl::GetFlag(FLAGS_max_chunk_bytes));
  }
  if (absl::Status s = ValidateJobSpec(spec); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid benchmark job: ", s.message()));
  }
  return spec;
}

absl::Status Run(const std::string& work_dir) {
  const int shards = absl::GetFlag(FLAGS_shards);
  const int repeats = absl::GetFlag(FLAGS_repeats);
  const int warmup = absl::GetFlag(FLAGS_warmup);
  if (shards < 1 || repeats < 1 || warmup < 0) {
    return absl::InvalidArgumentError(
        "--shards and --repeats must be >= 1, --warmup >= 0");
  }
  const std::string bin_dir = BinDir(absl::GetFlag(FLAGS_bin_dir));
  LMPS_ASSIGN_OR_RETURN(const JobSpec spec, MakeSpec(shards));
  const int64_t num_params = GptNumParameters(spec.model());
  const double model_mb = 4.0 * static_cast<double>(num_params) / 1e6;
  std::printf(
      "ps_bench: model n_layer=%d n_head=%d n_embd=%d block_size=%d: %lld "
      "parameters, %.1f MB fp32; %d shards on 127.0.0.1; max_message_bytes "
      "%lld, max_chunk_bytes %lld; %d timed rounds after %d warm-up\n",
      spec.model().n_layer(), spec.model().n_head(), spec.model().n_embd(),
      spec.model().block_size(), static_cast<long long>(num_params), model_mb,
      shards, static_cast<long long>(spec.max_message_bytes()),
      static_cast<long long>(spec.max_chunk_bytes()), repeats, warmup);
  std::fflush(stdout);

  const std::string job_file = work_dir + "/job.textproto";
  {
    std::string text;
    google::protobuf::TextFormat::PrintToString(spec, &text);
    std::ofstream out(job_file);
    out << text;
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", job_file));
  }

  Children children;
  const Clock::time_point give_up =
      Clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_startup_timeout_s));
  const std::string timeout_arg =
      absl::StrCat("--assemble_timeout_s=", absl::GetFlag(FLAGS_startup_timeout_s));

  // Scheduler first, on a free port it reports through a file.
  const std::string port_file = work_dir + "/scheduler.port";
  LMPS_RETURN_IF_ERROR(children.Start(
      "scheduler", BinaryIn(bin_dir, "server/scheduler/lmps_scheduler"),
      {"--job=" + job_file, "--listen=127.0.0.1:0", "--port_file=" + port_file,
       timeout_arg},
      work_dir + "/scheduler.log"));
  std::string port;
  while (port.empty()) {
    LMPS_RETURN_IF_ERROR(children.CheckAlive());
    std::ifstream in(port_file);
    std::getline(in, port);
    if (!port.empty()) break;
    if (Clock::now() > give_up) {
      return absl::DeadlineExceededError(absl::StrCat(
          "the scheduler did not report its port; see ", work_dir,
          "/scheduler.log"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const std::string scheduler = "127.0.0.1:" + port;
  for (int s = 0; s < shards; ++s) {
    LMPS_RETURN_IF_ERROR(children.Start(
        absl::StrCat("server-", s), BinaryIn(bin_dir, "server/lmps_server"),
        {"--scheduler=" + scheduler, "--listen=127.0.0.1:0",
         "--advertise_host=127.0.0.1", absl::StrCat("--shard=", s),
         timeout_arg},
        absl::StrCat(work_dir, "/server-", s, ".log")));
  }

  // Join as the job's one worker.
  SchedulerClient client(Scheduler::NewStub(MakeChannel(scheduler)), scheduler);
  RegisterRequest reg;
  reg.set_role(WORKER);
  reg.set_requested_rank(-1);
  reg.set_hostname("ps_bench");
  const absl::Duration startup =
      absl::Seconds(absl::GetFlag(FLAGS_startup_timeout_s));
  LMPS_RETURN_IF_ERROR(client.Register(reg, startup).status());
  // The wait runs on its own thread so that a shard dying before it
  // registers is reported at once: then the scheduler is stopped, which
  // ends the wait.
  absl::StatusOr<Assignment> assignment = absl::UnknownError("not assigned");
  std::atomic<bool> assigned{false};
  std::thread waiter([&] {
    assignment = client.WaitForAssignment(startup);
    assigned = true;
  });
  absl::Status alive;
  while (!assigned) {
    alive = children.CheckAlive();
    if (!alive.ok()) {
      children.StopAll();
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  waiter.join();
  LMPS_RETURN_IF_ERROR(alive);
  LMPS_RETURN_IF_ERROR(assignment.status());
  HeartbeatLoop heartbeat(
      &client, client.lease() / 3, [] { return HeartbeatRequest(); },
      [](const absl::StatusOr<HeartbeatResponse>&) {});

  // One channel per shard, shared by the f32 and the bf16 client.
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::string> addresses(assignment->shard_addresses().begin(),
                                     assignment->shard_addresses().end());
  for (const std::string& a : addresses) channels.push_back(MakeChannel(a));
  auto make_client = [&](DType push_dtype)
      -> absl::StatusOr<std::unique_ptr<PsClient>> {
    PsClientOptions options;
    options.max_message_bytes = assignment->spec().max_message_bytes();
    options.max_push_stream_bytes = assignment->spec().max_push_stream_bytes();
    options.streams_per_shard = assignment->spec().streams_per_shard();
    options.shared_memory =
        assignment->spec().shared_memory() == SHARED_MEMORY_AUTO;
    options.push_dtype = push_dtype;
    return PsClient::Create(assignment->spec().model(), assignment->partition(),
                            channels, addresses, options);
  };
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<PsClient> ps_f32, make_client(F32));
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<PsClient> ps_bf16, make_client(BF16));
  if (ps_f32->num_parameters() != num_params) {
    return absl::InternalError(absl::StrCat(
        "the client counts ", ps_f32->num_parameters(), " parameters, ",
        "GptNumParameters ", num_params));
  }

  // The shards initialise their parameters after the assignment; until
  // then they answer UNAVAILABLE.
  for (;;) {
    LMPS_RETURN_IF_ERROR(children.CheckAlive());
    absl::StatusOr<std::vector<int64_t>> versions = ps_f32->Versions();
    if (versions.ok()) break;
    if (versions.status().code() != absl::StatusCode::kUnavailable ||
        Clock::now() > give_up) {
      return versions.status();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // A finite gradient (the shards reject NaN/Inf) of varied values.
  std::vector<float> params(num_params), grads(num_params);
  for (int64_t i = 0; i < num_params; ++i) {
    grads[i] = 1e-3f * static_cast<float>(i % 1000 - 500) / 500.0f;
  }
  std::printf("ps_bench: job assembled (partition imbalance %.3f); measuring\n",
              assignment->partition().imbalance());
  std::fflush(stdout);

  Samples pull{"pull", 4 * num_params};
  Samples push_f32{"push f32", 4 * num_params};
  Samples push_bf16{"push bf16", 2 * num_params};
  const std::string worker_id = client.node_id();
  for (int round = 0; round < warmup + repeats; ++round) {
    const bool timed = round >= warmup;
    LMPS_RETURN_IF_ERROR(Measure(
        [&] { return ps_f32->Pull(0, params.data()); }, timed, children, &pull));
    LMPS_RETURN_IF_ERROR(Measure(
        [&] { return ps_f32->Push(0, worker_id, 0, grads.data()); }, timed,
        children, &push_f32));
    LMPS_RETURN_IF_ERROR(Measure(
        [&] { return ps_bf16->Push(0, worker_id, 0, grads.data()); }, timed,
        children, &push_bf16));
  }
  const int64_t rounds = warmup + repeats;
  if (ps_f32->stats().bytes_pulled.load() != rounds * 4 * num_params ||
      ps_f32->stats().bytes_pushed.load() != rounds * 4 * num_params ||
      ps_bf16->stats().bytes_pushed.load() != rounds * 2 * num_params) {
    return absl::InternalError(
        "the client's byte counters disagree with the model size");
  }
  // Version 0 of the parameters is GPT-2's init: mostly normal(0, 0.02).
  double sum_squares = 0;
  for (float v : params) sum_squares += static_cast<double>(v) * v;
  if (!(sum_squares > 0) || !std::isfinite(sum_squares)) {
    return absl::DataLossError("the pulled parameters are all zero or non-finite");
  }
  heartbeat.Stop();

  // For scale: one thread copying the same bytes in this process.
  Samples copy{"memcpy (1 thread, same bytes, for scale)", 4 * num_params};
  for (int i = 0; i < warmup + repeats; ++i) {
    LMPS_RETURN_IF_ERROR(Measure(
        [&] {
          std::memcpy(params.data(), grads.data(), 4 * num_params);
          return absl::OkStatus();
        },
        i >= warmup, children, &copy));
  }

  Report(pull, shards, model_mb);
  Report(push_f32, shards, model_mb);
  Report(push_bf16, shards, model_mb);
  std::printf(
      "note: every push is for step 0; the shards accept the first and count "
      "the repeats as duplicates (not accumulated), but their bytes still "
      "travel and are validated, so the push rates measure the transfer "
      "path\n");
  const double copy_gbs = 4e-9 * static_cast<double>(num_params) / copy.Median();
  std::printf("%s: %.2f GB/s\n", copy.name.c_str(), copy_gbs);
  std::fflush(stdout);
  children.StopAll();
  return absl::OkStatus();
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  // As lmps_worker does (common/rpc/allocator.h): this process is the worker.
  lmps::TuneAllocatorForLargeBuffers();
  absl::SetProgramUsageMessage(
      "parameter-server throughput: ps_bench [--shards=2] [--repeats=5] "
      "[--n_layer=8 --n_embd=512 --block_size=256]");
  absl::ParseCommandLine(argc, argv);
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = lmps::OnFatalSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);

  std::string work_dir = absl::GetFlag(FLAGS_work_dir);
  bool remove_work_dir = false;
  if (work_dir.empty()) {
    char tmpl[] = "/tmp/ps_bench.XXXXXX";
    if (mkdtemp(tmpl) == nullptr) {
      std::fprintf(stderr, "ps_bench: mkdtemp: %s\n", std::strerror(errno));
      return 1;
    }
    work_dir = tmpl;
    remove_work_dir = !absl::GetFlag(FLAGS_keep_logs);
  } else {
    std::error_code ec;
    std::filesystem::create_directories(work_dir, ec);
  }
  const absl::Status status = lmps::Run(work_dir);  // children stopped here
  if (!status.ok()) {
    std::fprintf(stderr, "ps_bench: error: %s\n(logs in %s)\n",
                 status.ToString().c_str(), work_dir.c_str());
    return 1;
  }
  if (remove_work_dir) {
    std::error_code ec;
    std::filesystem::remove_all(work_dir, ec);
  }
  return 0;
}
