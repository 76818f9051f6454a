// lmps_report RUN_DIR: writes RUN_DIR/report.html from the run's step log,
// job spec and sample (report/run_report.h). lmps_local writes it at the
// end of every run; this rebuilds it, e.g. for a run still going.
// Exit status: 0 written, 1 not written, 2 bad usage.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "report/run_report.h"

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "lmps_report RUN_DIR: writes RUN_DIR/report.html (charts of the step "
      "log RUN_DIR/steps.jsonl, the job spec, the sample)");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::fprintf(stderr, "usage: lmps_report RUN_DIR\n");
    return 2;
  }
  const std::string run_dir = args[1];
  const absl::Status s =
      lmps::WriteRunReport(run_dir, [](const std::string& warning) {
        std::fprintf(stderr, "lmps_report: %s\n", warning.c_str());
      });
  if (!s.ok()) {
    std::fprintf(stderr, "lmps_report: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::printf("lmps_report: wrote %s/report.html\n", run_dir.c_str());
  return 0;
}
