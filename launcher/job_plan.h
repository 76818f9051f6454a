// The job lmps_local runs, planned before any process starts: the effective
// job spec (the spec file with the command line's overrides, validated, its
// data file readable; token shards read and checked completely), the transport security of every daemon and of the
// launcher's own status channel (every file checked), and where the lmps
// binaries are.
//
// Errors: InvalidArgument for a bad spec, flag or security file (the
// launcher exits 2), NotFound for an unreadable data file or shard,
// InvalidArgument for a bad shard (docs/data.md).
// Thread-safety: pure functions of their arguments and the files they read.
#ifndef LMPS_LAUNCHER_JOB_PLAN_H_
#define LMPS_LAUNCHER_JOB_PLAN_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/rpc/security.h"
#include "proto/lmps.pb.h"

namespace lmps {

// The command line's changes to the job spec; 0 or empty: the spec's.
struct JobOverrides {
  std::string job_file;  // text proto; empty: the defaults
  int workers = 0;       // layout.dp
  int pp = 0;
  int tp = 0;
  std::string schedule;  // "1f1b" or "gpipe"
  int micro_batches = 0;
  int shards = 0;        // layout.num_shards
  int steps = 0;         // train.steps
  std::string data;      // data.path
};

// The spec file (or the defaults) with `overrides` applied; validated, and
// its data file readable (TOKEN_SHARDS: every shard valid).
absl::StatusOr<JobSpec> PlanJobSpec(const JobOverrides& overrides);

// --tls_dir (the files of scripts/make_test_certs.sh) and --auth_token_file
// (empty: none): the scheduler and the shards serve with DIR/server.{crt,
// key}, the workers and the launcher use DIR/client.{crt,key} (a worker's
// peer service serves with the server pair), all trusting DIR/ca.crt.
struct SecurityPlan {
  Security launcher;                      // the launcher's status channel
  std::vector<std::string> server_args;   // flags of the scheduler, shards
  std::vector<std::string> worker_args;   // flags of every worker
};
absl::StatusOr<SecurityPlan> PlanSecurity(const std::string& tls_dir,
                                          const std::string& auth_token_file);

}  // namespace lmps

#endif  // LMPS_LAUNCHER_JOB_PLAN_H_
