// Helpers for the multi-process tests: run a binary of this build with a
// timeout and capture its output, locate the binaries, compare models.
// Processes are started with common/process/process_group.h, each leading
// a process group of its own (so a kill reaches what it started), and do
// not die with the test.
//
// Thread-safety: not thread-safe; one test at a time per process.
#ifndef LMPS_TESTS_TEST_UTIL_H_
#define LMPS_TESTS_TEST_UTIL_H_

#include <cmath>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/formats/safetensors.h"
#include "common/process/process_group.h"

namespace lmps::testing {

struct CommandResult {
  int exit_code = -1;   // -1: killed (timeout or signal)
  bool timed_out = false;
  std::string output;   // stdout and stderr together
};

// Runs argv[0] with the rest as arguments; kills it (and its children, via
// a process group) after `timeout_s`. A binary that cannot be started:
// exit_code -1, the reason in `output`.
CommandResult RunCommand(const std::vector<std::string>& argv, int timeout_s);

// A process running in the background, killed (with its process group) on
// destruction. Its output goes to `log_path`. One that cannot be started
// says why on stderr and has pid() -1.
class BackgroundProcess {
 public:
  BackgroundProcess(const std::vector<std::string>& argv,
                    const std::string& log_path);
  ~BackgroundProcess();
  // Waits up to timeout_s for it to exit; returns its exit code, or -1.
  int Wait(int timeout_s);
  int pid() const { return pid_; }

 private:
  ProcessGroup group_;
  int pid_ = -1;
};

// Polls until `path` exists and is non-empty (up to timeout_s); returns its
// contents, or "" on timeout.
std::string WaitForFile(const std::string& path, int timeout_s);

// Absolute path of a binary of this build, e.g. "launcher/lmps_local".
std::string BinaryPath(const std::string& relative);

// A fresh directory under $TEST_TMPDIR.
std::string TempDir(const std::string& name);

// Writes `text` to `path`.
void WriteFile(const std::string& path, const std::string& text);
std::string ReadFile(const std::string& path);

// Largest |a - b| over every tensor; an error if names or shapes differ.
absl::StatusOr<double> MaxAbsDiff(const SafetensorsContents& a,
                                  const SafetensorsContents& b);
// The same for two safetensors files (an error if either cannot be read).
absl::StatusOr<double> MaxAbsDiffOfFiles(const std::string& a,
                                         const std::string& b);

// Expects the models two runs exported (RUN_DIR/model.safetensors) to be
// bit-identical; `why` is added to the failure.
void ExpectSameExportedModel(const std::string& run_dir_a,
                             const std::string& run_dir_b,
                             const std::string& why = "");

// The data-parallel aggregation tests' job (ring all-reduce, hierarchical):
// a 2-layer, 32-wide GPT, 4 steps of batch 12, 2 KiB chunks and 1 KiB
// messages (many of each per tensor), no evaluation or sample; `optimizer`
// and `train` are fields inside optimizer { } and train { }.
std::string SmallAggregationJob(const std::string& optimizer,
                                const std::string& train);

// The figures of lmps_local's final progress line, "step N/N | loss L |
// eval E | T tok/s | pull P | push Q | ETA --" (pull and push: the last
// step's bytes, all workers); NaN where the line has no such field.
struct FinalProgress {
  float eval = NAN;
  double pull_bytes = NAN;
  double push_bytes = NAN;
  std::string run_dir;  // lmps_local's --run_dir (model.safetensors, logs/)
};

// Runs lmps_local on `job` (text proto) in TempDir(name) with `flags`,
// expects it to succeed within `timeout_s` and parses the progress line of
// its last step `steps` (a test failure names what is missing).
FinalProgress RunLocalJob(const std::string& name, const std::string& job,
                          const std::vector<std::string>& flags, int steps,
                          int timeout_s = 240);

// Jobs whose workers need each other's step (ring all-reduce, host
// groups): `workers` workers train SmallAggregationJob(AdamW, `train`)
// twice, once straight and once with dp rank 0 SIGKILLed mid-push at step
// 2 (lease 2 s). Expects the second run to finish through a replacement
// and a regroup at the failed step (its survivors' logs say they waited
// for it), with an exported model bit-identical to the straight run's.
void ExpectDeadWorkerReplacedExactly(const std::string& name,
                                     const std::string& train, int workers);

}  // namespace lmps::testing

#endif  // LMPS_TESTS_TEST_UTIL_H_
