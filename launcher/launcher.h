// RunLocalJob: a whole lmps job on this machine, as separate processes
// talking gRPC on loopback: one scheduler, the parameter-server shards (and
// their backups) and the workers, each on a free port, started with
// common/process/process_group.h (each dies with the launcher and ignores
// SIGINT; their output goes to RUN_DIR/logs/<node>.log).
//
// It follows the job with the scheduler's status (the progress line,
// launcher/progress.h), replaces dead workers, restarts a dead scheduler,
// restarts the whole job from its latest checkpoint when a shard (or a
// pipeline worker out of replacements) is lost (the rules:
// launcher/restart_policy.h), resizes data parallelism on request (elastic
// dp), injects the tests' faults (launcher/fault_injection.h), and once
// the workers are done waits for the servers and the scheduler to exit,
// exports the final model to RUN_DIR/model.safetensors and prints the
// generated sample. Every child is stopped (SIGTERM, SIGKILL after 5 s) and
// reaped before it returns, on success, error or interruption.
//
// Layout of RUN_DIR: job.textproto (the effective spec), logs/<node>.log,
// ckpt/step_*/shard_*.ckpt, steps/<worker>.jsonl (each worker's step log)
// and steps.jsonl (merged, one line per step: launcher/step_log_merge.h),
// events.jsonl (launcher/event_log.h), model.safetensors, sample.txt,
// report.html (report/run_report.h); the logs and the report are kept by
// launcher/run_logs.h.
//
// Progress and events go to stdout; the lines the tests match ("lmps:
// worker-1 was killed by signal 9; starting a replacement (1 of 3)", ...)
// are part of the contract. Errors: InvalidArgument for a bad job, flag or
// security file; Cancelled when interrupted; DeadlineExceeded after
// timeout_s; Aborted naming a child that failed, with the end of its log;
// FailedPrecondition when the job FAILED.
//
// Thread-safety: one RunLocalJob per process, on the thread that installed
// the signal handlers (the children die with that thread).
#ifndef LMPS_LAUNCHER_LAUNCHER_H_
#define LMPS_LAUNCHER_LAUNCHER_H_

#include <string>

#include "absl/status/status.h"
#include "launcher/fault_injection.h"
#include "launcher/job_plan.h"

namespace lmps {

// lmps_local's flags (see their help in lmps_local.cc), with their defaults.
struct LauncherOptions {
  JobOverrides job;
  std::string run_dir = "lmps_run";
  bool resume = false;
  std::string bin_dir;      // empty: next to this binary (BinDir)
  std::string worker_args;  // extra flags for every worker, space-separated
  std::string server_args;  // extra flags for every server
  int metrics_base_port = 0;
  // Elastic data parallelism.
  int resize_at_step = -1;
  int resize_workers = 0;
  int elastic_max_dp = 0;
  int elastic_min_dp = 1;
  double elastic_grace_s = 10;
  std::string elastic_batch = "keep";
  int spare_workers = 0;
  // Failures.
  int restart_workers = 3;
  int lease_s = 10;
  int restart_job = 3;
  int restart_scheduler = 3;
  FaultOptions faults;
  int timeout_s = 3600;
  bool export_model = true;
  bool quiet = false;
  // Transport security (PlanSecurity).
  std::string tls_dir;
  std::string auth_token_file;
};

// SIGINT/SIGTERM: RunLocalJob stops every process and returns Cancelled.
// SIGUSR1/SIGUSR2: add/remove one data-parallel replica. SIGPIPE: ignored.
void InstallLauncherSignalHandlers();

// Runs the job (see above); every child is stopped when it returns.
absl::Status RunLocalJob(const LauncherOptions& options);

}  // namespace lmps

#endif  // LMPS_LAUNCHER_LAUNCHER_H_
