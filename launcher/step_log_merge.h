// StepLogMerger: the run's step log, RUN_DIR/steps.jsonl, merged from the
// workers' own (RUN_DIR/steps/<process>.jsonl, worker/step_log.h): one JSON
// object per step, in step order,
//   {"step": 41, "time": 1764900000.1, "loss": 2.31, "eval_loss": 2.45,
//    "lr": 0.0006, "grad_norm": 0.87, "tokens_per_second": 10642,
//    "bytes_pulled": 2400000, "bytes_pushed": 2400000, "bubble": 0.25,
//    "workers": {"worker-0": {"compute_s": 0.21, "pull_s": 0.01,
//                             "push_s": 0.02, "wait_s": 0.004}, ...}}
// time: the latest worker's; loss: the mean over the workers that report
// one (the last pipeline stage's); eval_loss, lr, grad_norm: the first
// worker's that has one (they agree); tokens_per_second: the sum over the
// workers that report a loss with tensor-parallel rank 0 (one per
// data-parallel replica); bytes: the
// sums; bubble: the mean over pipeline stages. Keys are absent where no
// worker gave a value. Two lines of one worker for one step merge, the later
// winning (the final evaluation adds eval_loss).
//
// A step is written once: when every worker is past it (Poll), or at the
// end (Flush). Each line goes out in one O_APPEND write. A resumed run
// continues the file: Create reads the last step written and later steps
// are never written again, even when a restart redoes them. A line of a
// worker's log that is not a JSON object with an integer "step" (a torn
// write, a corrupt file) is reported through `warn` with its file and line
// number and skipped.
//
// Thread-safety: not thread-safe; the launcher's monitor loop owns it.
#ifndef LMPS_LAUNCHER_STEP_LOG_MERGE_H_
#define LMPS_LAUNCHER_STEP_LOG_MERGE_H_

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/formats/append_file.h"
#include "nlohmann/json.hpp"

namespace lmps {

class StepLogMerger {
 public:
  static absl::StatusOr<std::unique_ptr<StepLogMerger>> Create(
      std::string in_dir, std::string out_path,
      std::function<void(const std::string&)> warn);

  // Reads what the workers appended since the last call, then writes every
  // step below `complete_before` that is not written yet.
  absl::Status Poll(int64_t complete_before);
  // Reads and writes every step not written yet (the job ended).
  absl::Status Flush() { return Poll(std::numeric_limits<int64_t>::max()); }

  // The last step in the file; -1 when none.
  int64_t last_written() const { return last_written_; }

 private:
  struct Input {
    uint64_t offset = 0;  // bytes consumed (complete lines)
    int64_t lines = 0;    // lines consumed
  };

  StepLogMerger(std::string in_dir, std::unique_ptr<AppendFile> out,
                std::function<void(const std::string&)> warn)
      : in_dir_(std::move(in_dir)),
        out_(std::move(out)),
        warn_(std::move(warn)) {}

  void ReadNew();
  void ReadLine(const std::string& file, int64_t number,
                const std::string& line);

  const std::string in_dir_;
  const std::unique_ptr<AppendFile> out_;
  const std::function<void(const std::string&)> warn_;
  std::map<std::string, Input> inputs_;
  // step -> node -> its record.
  std::map<int64_t, std::map<std::string, nlohmann::json>> pending_;
  int64_t last_written_ = -1;
};

// The merged line of one step from its workers' records.
nlohmann::ordered_json MergeStep(
    int64_t step, const std::map<std::string, nlohmann::json>& records);

}  // namespace lmps

#endif  // LMPS_LAUNCHER_STEP_LOG_MERGE_H_
