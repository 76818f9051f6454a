// lmps_worker: a stateless training worker. It registers with the
// scheduler, receives its assignment (ranks, job spec, partition map, shard
// addresses), pulls parameters, computes forward and backward on its
// backend, pushes gradients, and reports progress in its heartbeats. A
// replacement started with the same flags reproduces exactly what it lost.
// worker/worker_daemon.h has the life cycle; this file turns the flags into
// its options.
//
// Transport security (common/rpc/security.h): --tls_ca, --tls_cert/--tls_key
// (the client certificate shown to the scheduler and the shards) and
// --auth_token_file secure every channel this worker opens.
//
// Exit status: 0 when the job finished, 1 on an error (printed), 2 on bad
// flags.
#include <csignal>
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/rpc/allocator.h"
#include "common/rpc/security.h"
#include "common/rpc/security_flags.h"
#include "worker/backend_factory.h"
#include "worker/worker_daemon.h"

ABSL_FLAG(std::string, scheduler, "", "scheduler address host:port (required)");
ABSL_FLAG(std::string, backend, "cpu", "compute backend: cpu, cuda[:N], or sim:TFLOPS (a simulated "
          "device that computes nothing: bench/gpu_sim.sh)");
ABSL_FLAG(std::string, cuda_backend_lib, "",
          "lmps_worker_cuda: path of liblmps_cuda_backend.so (default: beside "
          "the binary, in its runfiles, then LD_LIBRARY_PATH)");
ABSL_FLAG(std::string, cuda_matmul, "",
          "matrix-product input precision of --backend=cuda: tf32 or bf16 "
          "(bf16 copies of fp32 operands, fp32 accumulation); empty: the "
          "backend's default (bf16)");
ABSL_FLAG(int, rank, -1,
          "worker rank to ask the scheduler for (-1: the next free one)");
ABSL_FLAG(int, threads, 0,
          "compute threads (0: all cores divided by --workers_per_host)");
ABSL_FLAG(int, workers_per_host, 1,
          "workers sharing this machine's cores (for the --threads default)");
ABSL_FLAG(std::string, data, "",
          "data file; overrides the job spec's data.path (same contents "
          "expected on every worker)");
ABSL_FLAG(std::string, step_log, "",
          "append one JSON line per training step to this file (the "
          "launcher merges the workers' into RUN_DIR/steps.jsonl); empty: "
          "none");
ABSL_FLAG(std::string, sample_out, "",
          "data-parallel rank 0 writes the generated sample here");
ABSL_FLAG(std::string, sample_prompt, "The ", "prompt for the sample");
ABSL_FLAG(double, sample_temperature, 0.8, "sampling temperature (0: greedy)");
ABSL_FLAG(int, sample_top_k, 40, "top-k for sampling (0: all)");
ABSL_FLAG(std::string, push_dtype, "f32", "gradient payload: f32 or bf16");
ABSL_FLAG(std::string, overlap_push, "auto",
          "true: push the gradient while the step's last backward pass runs "
          "(pipeline stages: the schedule's last), each block's part as "
          "soon as it is final (bit-identical results); false: push after "
          "the backward pass; auto: true with a CUDA backend (the host is "
          "idle during backward), false with the CPU backend (its cores are "
          "busy: bench/ps_features.sh measured overlap 7% slower on 2 cores)");
ABSL_FLAG(bool, pull_with_push, true,
          "SYNC data-parallel jobs with one shard on this host and "
          "layer-wise pulls off (the CPU default): the shard answers the next step's "
          "pull together with the push (one round trip per step); false: "
          "a pull of its own per step (for comparison: bench/overhead.sh)");
ABSL_FLAG(std::string, metrics_listen, "",
          "serve Prometheus /metrics on this host:port (empty: off)");
ABSL_FLAG(int, rpc_timeout_s, 120,
          "deadline of each parameter-server RPC (pull waits for peers)");
ABSL_FLAG(int, fault_kill_at_step, -1,
          "fault injection for tests: SIGKILL this worker in the middle of "
          "pushing its gradient for this step, right after shard 0 accepted "
          "it (with --overlap_push: its first part) and before the other "
          "shards did; with pp * tp > 1, as the "
          "step's pipeline schedule starts (-1: never)");
ABSL_FLAG(int, assemble_timeout_s, 120,
          "how long to wait for the scheduler and the job to assemble");
ABSL_FLAG(bool, spare, false,
          "a spare worker: wait (up to --spare_wait_s) until a worker of the "
          "running job dies and take over its slot, then train; exit 0 "
          "without training if the job finishes first");
ABSL_FLAG(int, spare_wait_s, 86400, "how long a --spare waits for a slot");
ABSL_FLAG(std::string, peer_listen, "0.0.0.0:0",
          "where the WorkerPeer service (pipeline activations, tensor-parallel "
          "all-reduce) listens; port 0 picks a free port");
ABSL_FLAG(std::string, peer_tls_cert, "",
          "with TLS: the certificate (and --peer_tls_key its key) the "
          "WorkerPeer service presents to other workers, who check it like a "
          "server's; empty: --tls_cert");
ABSL_FLAG(std::string, peer_tls_key, "", "see --peer_tls_cert");
ABSL_FLAG(std::string, host_name, "",
          "the machine this worker runs on, for train.workers_per_host "
          "(hierarchical aggregation: the scheduler gives the workers of one "
          "host consecutive dp ranks); empty: the hostname. In Kubernetes: "
          "the node name (spec.nodeName through the downward API)");
ABSL_FLAG(std::string, advertise_host, "127.0.0.1",
          "host other workers reach this worker's WorkerPeer service at; the "
          "advertised address is advertise_host:<bound port>");

namespace {

// The exit status of an error, printed as "[worker] error: ...": 2 for
// unusable flags (InvalidArgument), 1 otherwise.
int Fail(const absl::Status& status) {
  std::fprintf(stderr, "[worker] error: %s\n", status.ToString().c_str());
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

absl::StatusOr<lmps::WorkerDaemonOptions> OptionsFromFlags() {
  lmps::WorkerDaemonOptions options;
  options.scheduler = absl::GetFlag(FLAGS_scheduler);
  options.backend_factory = lmps::CreateBackend;
  options.backend = absl::GetFlag(FLAGS_backend);
  options.cuda_matmul = absl::GetFlag(FLAGS_cuda_matmul);
  options.cuda_backend_lib = absl::GetFlag(FLAGS_cuda_backend_lib);
  options.threads = absl::GetFlag(FLAGS_threads);
  options.workers_per_host = absl::GetFlag(FLAGS_workers_per_host);
  options.rank = absl::GetFlag(FLAGS_rank);
  options.data = absl::GetFlag(FLAGS_data);
  options.sample_out = absl::GetFlag(FLAGS_sample_out);
  options.step_log = absl::GetFlag(FLAGS_step_log);
  options.sample_prompt = absl::GetFlag(FLAGS_sample_prompt);
  options.sample_temperature = absl::GetFlag(FLAGS_sample_temperature);
  options.sample_top_k = absl::GetFlag(FLAGS_sample_top_k);
  const std::string push_dtype = absl::GetFlag(FLAGS_push_dtype);
  if (push_dtype == "bf16") {
    options.push_dtype = lmps::BF16;
  } else if (push_dtype != "f32") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--push_dtype must be f32 or bf16, got '", push_dtype, "'"));
  }
  const std::string overlap = absl::GetFlag(FLAGS_overlap_push);
  if (overlap == "true") {
    options.overlap_push = lmps::OverlapPush::kOn;
  } else if (overlap == "false") {
    options.overlap_push = lmps::OverlapPush::kOff;
  } else if (overlap != "auto") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--overlap_push must be auto, true or false, got '", overlap, "'"));
  }
  options.pull_with_push = absl::GetFlag(FLAGS_pull_with_push);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.rpc_timeout = absl::Seconds(absl::GetFlag(FLAGS_rpc_timeout_s));
  options.fault_kill_at_step = absl::GetFlag(FLAGS_fault_kill_at_step);
  options.assemble_timeout =
      absl::Seconds(absl::GetFlag(FLAGS_assemble_timeout_s));
  options.spare = absl::GetFlag(FLAGS_spare);
  options.spare_wait = absl::Seconds(absl::GetFlag(FLAGS_spare_wait_s));
  options.peer_listen = absl::GetFlag(FLAGS_peer_listen);
  options.advertise_host = absl::GetFlag(FLAGS_advertise_host);
  options.host_name = absl::GetFlag(FLAGS_host_name);
  options.security = lmps::SecurityOptionsFromFlags();
  if (!absl::GetFlag(FLAGS_peer_tls_cert).empty() ||
      !absl::GetFlag(FLAGS_peer_tls_key).empty()) {
    lmps::SecurityOptions peer = options.security;
    peer.cert = absl::GetFlag(FLAGS_peer_tls_cert);
    peer.key = absl::GetFlag(FLAGS_peer_tls_key);
    options.peer_security = peer;
  }
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  lmps::TuneAllocatorForLargeBuffers();
  absl::SetProgramUsageMessage(
      "lmps training worker: lmps_worker --scheduler=host:port [--backend=cpu]");
  absl::ParseCommandLine(argc, argv);
  std::signal(SIGPIPE, SIG_IGN);
  absl::StatusOr<lmps::WorkerDaemonOptions> options = OptionsFromFlags();
  if (!options.ok()) return Fail(options.status());
  // Nothing stops it: SIGTERM and SIGINT keep their default action (the
  // worker dies at once, like a killed one, and its slot is taken over).
  lmps::StopSignal stop;
  const absl::Status status = lmps::RunWorkerDaemon(*options, &stop);
  return status.ok() ? 0 : Fail(status);
}
