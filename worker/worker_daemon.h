// The training worker's life cycle, as run by lmps_worker and
// lmps_worker_cuda. Each registration with the scheduler goes through these
// steps, starting every resource afresh:
//
//   1. start: Prometheus /metrics on metrics_listen, the compute backend
//      (before joining, so that a backend this machine cannot run fails
//      fast; the CUDA plugin loads after /metrics started), the channel to
//      the scheduler, and the WorkerPeer service (pipeline activations,
//      tensor-parallel all-reduce) on peer_listen, advertised as
//      advertise_host:<bound port> (a data-parallel job runs without it);
//   2. join: a spare first waits until the job is RUNNING; then Register
//      (role WORKER, requested rank); a surplus worker of an elastic job
//      (ELASTIC_SURPLUS) stands by and keeps registering until dp grows or
//      a slot frees; then wait for the assignment (ranks, job spec,
//      partition map, shard addresses). From the assignment on the worker
//      heartbeats every lease/3, so steps 3-5 (a big model's buffers, a
//      large dataset) can take longer than the lease; the answers are acted
//      on from step 6;
//   3. connect: the dataset, the parallel layout and the PsClient (failing
//      over to the shards' backups when they are replicated); a restarted
//      scheduler is rejoined with this worker's rank;
//   4. resume: start at the assignment's step or, for a replacement joining
//      a running job, at the shards' version (ASYNC: its replica's clock);
//   5. build the training loop: DataParallelTrainer (data parallel only) or
//      PipelineTrainer (pp * tp > 1, over a PeerNetwork and, with tp > 1, a
//      tensor-parallel RingAllReduce);
//   6. run it, heartbeating its progress (a FAILED job or a fenced
//      registration cancels it); data-parallel rank 0 then
//      samples from the model when the spec asks for it; report done or the
//      error in a final heartbeat, retried for up to a minute while the
//      scheduler is unreachable.
//
// Outcomes: OK when the job finished, with this worker or without needing
// it (a spare, a surplus or a late worker told JOB_FINISHED). When the
// shards stop an elastic job for a resize (STOPPED_FOR_RESIZE), the worker
// tells the scheduler and registers again for the resized job (step 1; the
// previous registration's resources are released first); in a job that is
// not elastic it returns OK. So it does when the job re-assembled without
// it (HeartbeatResponse.reassemble: its lease expired while it was alive,
// e.g. frozen, so it never stopped for the regroup): the step in progress
// is dropped, and so is its failure on the re-assembled shards (the
// scheduler ignores the report of a worker of the old assembly and answers
// it "reassemble"). Otherwise the first error, InvalidArgument for
// unusable options (lmps_worker exits 2 on those, 1 on other errors). Only
// errors of the training loop (step 6) are reported to the scheduler.
//
// Every line is logged as "[ID] message" (ID: "worker" until registered,
// then the node id), the same as on stderr before the daemon existed:
// tests and tools read them.
//
// Stop(): a spare's wait for the running job and a surplus worker's standby
// end at their next retry, a training loop at its next step boundary; the
// daemon then returns CancelledError without reporting to the scheduler
// (which sees this worker's lease expire, as for a killed worker). A
// registration or an assignment wait in progress is not interrupted.
// lmps_worker never calls it: SIGTERM keeps its default action.
//
// Thread-safety: RunWorkerDaemon runs on the caller's thread and joins the
// threads it starts before returning; the StopSignal
// (common/rpc/stop_signal.h) is thread-safe.
#ifndef LMPS_WORKER_WORKER_DAEMON_H_
#define LMPS_WORKER_WORKER_DAEMON_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/rpc/security.h"
#include "common/rpc/stop_signal.h"
#include "proto/lmps.pb.h"
#include "worker/backend/backend.h"

namespace lmps {

// Creates the compute backend; lmps_worker passes CreateBackend
// (worker/backend_factory.h) of the factory it links, which knows
// "cuda[:N]" only in lmps_worker_cuda.
using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<Backend>>(
    const std::string& name, int threads, const std::string& cuda_matmul,
    const std::string& cuda_plugin)>;

// --overlap_push: kAuto overlaps with a CUDA backend (the host is idle
// during backward), not with the CPU backend (its cores are busy).
enum class OverlapPush { kAuto, kOn, kOff };

struct WorkerDaemonOptions {
  std::string scheduler;  // host:port (required)
  // The compute backend: backend_factory(backend, threads, cuda_matmul,
  // cuda_backend_lib), called once per registration (required).
  BackendFactory backend_factory;
  std::string backend = "cpu";   // "cpu", or "cuda[:N]"
  std::string cuda_matmul;       // "tf32", "bf16"; empty: the default
  std::string cuda_backend_lib;  // the plugin's path; empty: searched
  // Compute threads; 0: all cores divided by workers_per_host.
  int threads = 0;
  int workers_per_host = 1;
  int rank = -1;     // worker rank to ask for; -1: the next free one
  std::string data;  // overrides the job spec's data.path when not empty
  // Data-parallel rank 0 generates a sample after training when the spec
  // asks for sample tokens (logged; also written to sample_out if set).
  std::string sample_out;
  std::string sample_prompt = "The ";
  // Appends one JSON line per step here (worker/step_log.h); empty: no step
  // log. A log that cannot be written is reported once and dropped.
  std::string step_log;
  double sample_temperature = 0.8;  // 0: greedy
  int sample_top_k = 40;            // 0: all
  DType push_dtype = F32;           // gradient payload: F32 or BF16
  OverlapPush overlap_push = OverlapPush::kAuto;
  // DataParallelTrainerOptions.pull_with_push.
  bool pull_with_push = true;
  std::string metrics_listen;  // /metrics host:port; empty: off
  absl::Duration rpc_timeout = absl::Seconds(120);  // per shard RPC
  // Fault injection for tests: SIGKILL this worker mid-push of this step
  // (data parallel) or as its pipeline schedule starts; -1: never.
  int64_t fault_kill_at_step = -1;
  // How long to wait for the scheduler and for the job to assemble.
  absl::Duration assemble_timeout = absl::Seconds(120);
  // A spare waits up to spare_wait for the job to run and for a slot.
  bool spare = false;
  absl::Duration spare_wait = absl::Seconds(86400);
  std::string peer_listen = "0.0.0.0:0";  // WorkerPeer service; port 0: any
  std::string advertise_host = "127.0.0.1";
  // The machine this worker runs on, as the scheduler groups workers for
  // train.workers_per_host (hierarchical aggregation); empty: the hostname.
  // In Kubernetes: the node name (the downward API's spec.nodeName).
  std::string host_name;
  // Transport security of every channel this worker opens and of its
  // WorkerPeer service; `peer_security`, when set, replaces it for the
  // WorkerPeer service (another certificate). Loaded at each registration.
  SecurityOptions security;
  std::optional<SecurityOptions> peer_security;
  // Receives every log line, "[ID] " prefix included; empty: stderr.
  std::function<void(const std::string&)> log;
};

absl::Status RunWorkerDaemon(const WorkerDaemonOptions& options,
                             StopSignal* stop);

}  // namespace lmps

#endif  // LMPS_WORKER_WORKER_DAEMON_H_
