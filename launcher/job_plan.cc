#include "launcher/job_plan.h"

#include <unistd.h>

#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/model/job_spec.h"
#include "common/rpc/status_util.h"
#include "worker/data/create_dataset.h"

namespace lmps {

namespace fs = std::filesystem;

absl::StatusOr<JobSpec> PlanJobSpec(const JobOverrides& overrides) {
  JobSpec spec;
  if (overrides.job_file.empty()) {
    LMPS_ASSIGN_OR_RETURN(spec, ParseJobSpec(""));
  } else {
    // Validated below, with the flags' changes.
    LMPS_ASSIGN_OR_RETURN(spec, LoadJobSpecFile(overrides.job_file,
                                                JobSpecCheck::kParseOnly));
  }
  if (overrides.workers > 0) {
    spec.mutable_layout()->set_dp(overrides.workers);
  }
  if (overrides.shards > 0) {
    spec.mutable_layout()->set_num_shards(overrides.shards);
  }
  if (overrides.pp > 0) spec.mutable_layout()->set_pp(overrides.pp);
  if (overrides.tp > 0) spec.mutable_layout()->set_tp(overrides.tp);
  if (overrides.micro_batches > 0) {
    spec.mutable_train()->set_micro_batches(overrides.micro_batches);
  }
  const std::string& schedule = overrides.schedule;
  if (schedule == "1f1b") {
    spec.mutable_layout()->set_schedule(ONE_F_ONE_B);
  } else if (schedule == "gpipe") {
    spec.mutable_layout()->set_schedule(GPIPE);
  } else if (!schedule.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--schedule must be 1f1b or gpipe, got '", schedule, "'"));
  }
  if (overrides.steps > 0) {
    spec.mutable_train()->set_steps(overrides.steps);
  }
  if (!overrides.data.empty()) {
    spec.mutable_data()->set_path(overrides.data);
  }
  if (absl::Status s = ValidateJobSpec(spec); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "invalid job spec",
        overrides.job_file.empty() ? "" : absl::StrCat(" ", overrides.job_file),
        ": ", s.message()));
  }
  if (IsTokenData(spec.data())) {
    // Every shard checked here (magic, version, size, each token below
    // vocab_size), as each worker will, before any process starts.
    absl::StatusOr<std::unique_ptr<Dataset>> data = CreateDataset(spec);
    if (!data.ok()) return data.status();
    return spec;
  }
  // Catch a missing data file here rather than in every worker.
  if (access(spec.data().path().c_str(), R_OK) != 0) {
    return absl::NotFoundError(
        absl::StrCat("cannot read data file '", spec.data().path(), "'"));
  }
  return spec;
}

absl::StatusOr<SecurityPlan> PlanSecurity(const std::string& tls_dir,
                                          const std::string& auth_token_file) {
  const std::string& token = auth_token_file;
  SecurityOptions server, worker;
  if (!tls_dir.empty()) {
    const std::string dir = fs::absolute(tls_dir).string();
    server.ca_cert = worker.ca_cert = dir + "/ca.crt";
    server.cert = dir + "/server.crt";
    server.key = dir + "/server.key";
    worker.cert = dir + "/client.crt";
    worker.key = dir + "/client.key";
  }
  if (!token.empty()) {
    server.token_file = worker.token_file = fs::absolute(token).string();
  }
  // Every file is checked here, before any daemon starts.
  absl::StatusOr<Security> s = Security::Load(server);
  if (!s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(s.status().message(),
                     tls_dir.empty() ? "" : " (--tls_dir expects the files of "
                                            "scripts/make_test_certs.sh)"));
  }
  s = Security::Load(worker);
  if (!s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        s.status().message(),
        tls_dir.empty() ? "" : " (--tls_dir expects the files of "
                               "scripts/make_test_certs.sh)"));
  }
  SecurityPlan plan;
  plan.launcher = *std::move(s);
  auto flags = [](const SecurityOptions& o) {
    std::vector<std::string> out;
    if (!o.ca_cert.empty()) {
      out = {"--tls_ca=" + o.ca_cert, "--tls_cert=" + o.cert,
             "--tls_key=" + o.key};
    }
    if (!o.token_file.empty()) out.push_back("--auth_token_file=" + o.token_file);
    return out;
  };
  plan.server_args = flags(server);
  plan.worker_args = flags(worker);
  if (!server.ca_cert.empty()) {
    // The workers' WorkerPeer service is a server to their peers.
    plan.worker_args.push_back("--peer_tls_cert=" + server.cert);
    plan.worker_args.push_back("--peer_tls_key=" + server.key);
  }
  return plan;
}

}  // namespace lmps
