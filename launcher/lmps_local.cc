// lmps_local: runs a whole lmps job on this machine as separate processes
// talking gRPC on loopback: one scheduler, S parameter-server shards and W
// workers, each on a free port. It shows a progress line, stops every child
// cleanly at the end, on an error or on Ctrl-C (children also die with it if
// it is killed), exports the final model to safetensors and prints the
// generated sample.
//
//   lmps_local [--job=job.textproto] [--workers=W] [--shards=S] [--steps=N]
//              [--run_dir=DIR] [--resume]
//              [--tls_dir=DIR] [--auth_token_file=FILE]
//
// Transport security (common/rpc/security.h): --tls_dir names the output of
// scripts/make_test_certs.sh; the scheduler and the shards then serve mutual
// TLS with DIR/server.{crt,key}, the workers and the launcher's own status
// channel use DIR/client.{crt,key}, all trusting DIR/ca.crt.
// --auth_token_file is passed to every daemon and used by the launcher.
//
// Layout of --run_dir: job.textproto (the effective spec), logs/<node>.log,
// ckpt/step_*/shard_*.ckpt, model.safetensors, sample.txt.
//
// This file only turns the flags into LauncherOptions; the launcher is
// launcher/launcher.h.
#include <signal.h>
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "launcher/launcher.h"

ABSL_FLAG(std::string, job, "", "job spec (text proto); empty: the defaults");
ABSL_FLAG(int, workers, 0, "data-parallel workers (0: the spec's layout.dp)");
ABSL_FLAG(int, pp, 0, "pipeline stages (0: the spec's layout.pp)");
ABSL_FLAG(int, tp, 0, "tensor-parallel ranks (0: the spec's layout.tp)");
ABSL_FLAG(std::string, schedule, "",
          "pipeline schedule: 1f1b or gpipe (empty: the spec's)");
ABSL_FLAG(int, micro_batches, 0,
          "micro-batches per replica per step (0: the spec's)");
ABSL_FLAG(int, shards, 0, "parameter-server shards (0: the spec's layout)");
ABSL_FLAG(int, steps, 0, "training steps (0: the spec's train.steps)");
ABSL_FLAG(std::string, data, "", "data file (empty: the spec's data.path)");
ABSL_FLAG(std::string, run_dir, "lmps_run", "where logs, checkpoints, the "
          "exported model and the sample go");
ABSL_FLAG(bool, resume, false,
          "resume from the latest complete checkpoint in --run_dir/ckpt "
          "(otherwise old checkpoints there are removed)");
ABSL_FLAG(std::string, bin_dir, "",
          "directory of the lmps binaries (default: found next to this one)");
ABSL_FLAG(std::string, worker_args, "", "extra flags for every worker");
ABSL_FLAG(std::string, server_args, "", "extra flags for every server");
ABSL_FLAG(int, metrics_base_port, 0,
          "serve Prometheus /metrics on 127.0.0.1: the scheduler on this "
          "port, shard s on port+1+s, worker w on port+1+S+w (0: off)");
ABSL_FLAG(int, resize_at_step, -1,
          "elastic data parallelism (tests, demos): once the slowest worker "
          "reaches this step, change dp to --resize_workers at the next step "
          "boundary (SIGUSR1 / SIGUSR2 add / remove one replica at any time)");
ABSL_FLAG(int, resize_workers, 0, "see --resize_at_step");
ABSL_FLAG(int, elastic_max_dp, 0,
          "> 0: the scheduler drives elastic dp (lmps_scheduler "
          "--elastic_max_dp): --resize_at_step/--resize_workers and "
          "SIGUSR1/SIGUSR2 then only start or kill worker processes, and the "
          "scheduler grows or shrinks dp at a step boundary, within "
          "[--elastic_min_dp, --elastic_max_dp]");
ABSL_FLAG(int, elastic_min_dp, 1, "see --elastic_max_dp");
ABSL_FLAG(double, elastic_grace_s, 10,
          "with --elastic_max_dp: how long a dead worker's slot waits for a "
          "replacement before the scheduler shrinks dp");
ABSL_FLAG(std::string, elastic_batch, "keep",
          "on a dp change: keep the global batch (each replica takes "
          "batch/dp; the result equals the fixed-dp run's) or rescale it "
          "(each replica keeps its batch, the global batch scales with dp)");
ABSL_FLAG(int, spare_workers, 0,
          "spare workers started with the job: each waits for a worker to "
          "die and takes over its slot at once (data-parallel jobs)");
ABSL_FLAG(int, restart_workers, 3,
          "replace a worker that dies up to this many times per worker");
ABSL_FLAG(int, lease_s, 10, "heartbeat lease (a dead worker's slot frees "
          "up for its replacement after it)");
ABSL_FLAG(int, fault_worker, -1,
          "fault injection for tests: worker index to kill, with "
          "--fault_kill_at_step");
ABSL_FLAG(int, fault_kill_at_step, -1,
          "fault injection: SIGKILL --fault_worker after it pushes this step");
ABSL_FLAG(int, restart_job, 3,
          "when a parameter-server shard (or, with pp * tp > 1, a worker "
          "out of --restart_workers) dies, restart the whole job from the "
          "latest complete checkpoint up to this many times (the job rolls "
          "back to that step everywhere)");
ABSL_FLAG(int, fault_kill_server, -1,
          "fault injection for tests: shard to SIGKILL once the slowest "
          "worker reaches --fault_kill_server_at_step");
ABSL_FLAG(int, fault_kill_server_at_step, -1, "see --fault_kill_server");
ABSL_FLAG(int, fault_kill_primary_again_at_step, -1,
          "fault injection for tests (layout.shard_backups = 1): after "
          "--fault_kill_server, SIGKILL whichever node then serves that shard "
          "as its primary once the slowest worker reaches this step and the "
          "shard's other node holds a complete copy again");
ABSL_FLAG(int, restart_scheduler, 3,
          "restart a scheduler that dies, on the same port, up to this many "
          "times; the running nodes rejoin it and the job continues");
ABSL_FLAG(int, fault_kill_scheduler_at_step, -1,
          "fault injection for tests: SIGKILL the scheduler once the slowest "
          "worker reaches this step");
ABSL_FLAG(int, fault_freeze_workers_at_step, -1,
          "fault injection for tests: SIGSTOP every worker once the slowest "
          "reaches this step, and SIGCONT them --fault_freeze_s later");
ABSL_FLAG(int, fault_freeze_s, 10, "see --fault_freeze_workers_at_step");
ABSL_FLAG(int, timeout_s, 3600, "give up and stop everything after this");
ABSL_FLAG(bool, export_model, true,
          "export the final model to --run_dir/model.safetensors");
ABSL_FLAG(bool, quiet, false, "no progress lines");
ABSL_FLAG(std::string, tls_dir, "",
          "mutual TLS for every daemon and channel, with the files of "
          "scripts/make_test_certs.sh in this directory (ca.crt, server.crt/"
          ".key, client.crt/.key); empty: plaintext");
ABSL_FLAG(std::string, auth_token_file, "",
          "shared token file passed to every daemon (--auth_token_file) and "
          "sent by the launcher; empty: no token");

namespace {

lmps::LauncherOptions OptionsFromFlags() {
  lmps::LauncherOptions o;
  o.job.job_file = absl::GetFlag(FLAGS_job);
  o.job.workers = absl::GetFlag(FLAGS_workers);
  o.job.pp = absl::GetFlag(FLAGS_pp);
  o.job.tp = absl::GetFlag(FLAGS_tp);
  o.job.schedule = absl::GetFlag(FLAGS_schedule);
  o.job.micro_batches = absl::GetFlag(FLAGS_micro_batches);
  o.job.shards = absl::GetFlag(FLAGS_shards);
  o.job.steps = absl::GetFlag(FLAGS_steps);
  o.job.data = absl::GetFlag(FLAGS_data);
  o.run_dir = absl::GetFlag(FLAGS_run_dir);
  o.resume = absl::GetFlag(FLAGS_resume);
  o.bin_dir = absl::GetFlag(FLAGS_bin_dir);
  o.worker_args = absl::GetFlag(FLAGS_worker_args);
  o.server_args = absl::GetFlag(FLAGS_server_args);
  o.metrics_base_port = absl::GetFlag(FLAGS_metrics_base_port);
  o.resize_at_step = absl::GetFlag(FLAGS_resize_at_step);
  o.resize_workers = absl::GetFlag(FLAGS_resize_workers);
  o.elastic_max_dp = absl::GetFlag(FLAGS_elastic_max_dp);
  o.elastic_min_dp = absl::GetFlag(FLAGS_elastic_min_dp);
  o.elastic_grace_s = absl::GetFlag(FLAGS_elastic_grace_s);
  o.elastic_batch = absl::GetFlag(FLAGS_elastic_batch);
  o.spare_workers = absl::GetFlag(FLAGS_spare_workers);
  o.restart_workers = absl::GetFlag(FLAGS_restart_workers);
  o.lease_s = absl::GetFlag(FLAGS_lease_s);
  o.restart_job = absl::GetFlag(FLAGS_restart_job);
  o.restart_scheduler = absl::GetFlag(FLAGS_restart_scheduler);
  o.faults.worker = absl::GetFlag(FLAGS_fault_worker);
  o.faults.worker_kill_at_step = absl::GetFlag(FLAGS_fault_kill_at_step);
  o.faults.server = absl::GetFlag(FLAGS_fault_kill_server);
  o.faults.server_at_step = absl::GetFlag(FLAGS_fault_kill_server_at_step);
  o.faults.primary_again_at_step =
      absl::GetFlag(FLAGS_fault_kill_primary_again_at_step);
  o.faults.scheduler_at_step = absl::GetFlag(FLAGS_fault_kill_scheduler_at_step);
  o.faults.freeze_workers_at_step =
      absl::GetFlag(FLAGS_fault_freeze_workers_at_step);
  o.faults.freeze_s = absl::GetFlag(FLAGS_fault_freeze_s);
  o.timeout_s = absl::GetFlag(FLAGS_timeout_s);
  o.export_model = absl::GetFlag(FLAGS_export_model);
  o.quiet = absl::GetFlag(FLAGS_quiet);
  o.tls_dir = absl::GetFlag(FLAGS_tls_dir);
  o.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "run an lmps job locally: lmps_local [--job=F] [--workers=W] "
      "[--shards=S] [--steps=N] [--run_dir=DIR] [--resume]");
  absl::ParseCommandLine(argc, argv);
  lmps::InstallLauncherSignalHandlers();
  const absl::Status status = lmps::RunLocalJob(OptionsFromFlags());
  if (!status.ok()) {
    std::fprintf(stderr, "\nlmps: error: %s\n", status.ToString().c_str());
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
