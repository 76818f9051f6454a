// The launcher's progress line, from the scheduler's JobStatus:
//
//   step  120/400 | loss 2.3456 | eval 2.5678 | 5321 tok/s |
//       pull 3.3 MB | push 1.6 MB | ETA 1m05s   (one line)
//
// step is the slowest worker's; loss and tok/s are over the replicas whose
// last pipeline stage reports a loss (first tensor-parallel rank); eval is
// data-parallel rank 0's; push is the bytes every worker's last gradient
// push put on the wire (per step; not written "/step", so that "step "
// starts only the line) (HeartbeatRequest.push_wire_bytes), summed: what
// train.compression reduces; pull likewise the payload bytes of every
// worker's last parameter pull (HeartbeatRequest.pull_wire_bytes), which
// train.pull_dtype BF16 halves; the ETA extrapolates the time per step since the
// first step this run (or restart) saw advance.
//
// On a terminal the line is redrawn in place (\r) and a new line is started
// for each new eval loss and at the end; otherwise a line is printed for a
// new step at most every 5 s, at once for a new eval loss, and at the end.
// Lines go to stdout, flushed. Quiet prints nothing.
//
// Thread-safety: not thread-safe; the launcher's monitor loop owns it.
#ifndef LMPS_LAUNCHER_PROGRESS_H_
#define LMPS_LAUNCHER_PROGRESS_H_

#include <chrono>
#include <cmath>
#include <cstdint>
#include <string>

#include "proto/lmps.pb.h"

namespace lmps {

// "--" (unknown), "42s", "3m07s" or "2h05m".
std::string FormatEta(double seconds);

// "512 B", "3.4 kB", "1.6 MB" or "2.05 GB" (powers of 1000).
std::string FormatBytes(int64_t bytes);

class ProgressLine {
 public:
  // `tty`: whether stdout is a terminal.
  ProgressLine(bool quiet, bool tty) : quiet_(quiet), tty_(tty) {}

  // Prints the line for `status` if due (see above); `final`: the job
  // ended, and then also "lmps: eval loss L (perplexity P)" when the job
  // evaluated.
  void Update(const JobStatus& status, bool final);

  // The job restarted: the ETA is measured afresh and the next step printed.
  void Restart();

  bool tty() const { return tty_; }

 private:
  // What one progress line shows.
  struct Figures {
    int64_t step = 0, total = 0;
    double loss = 0;
    float eval = 0;
    double tps = 0;
    int64_t pull_bytes = 0;
    int64_t push_bytes = 0;
    double eta = 0;
  };
  void PrintLine(const Figures& f, bool final,
                 std::chrono::steady_clock::time_point now);

  const bool quiet_;
  const bool tty_;
  int64_t first_step_ = -1;
  std::chrono::steady_clock::time_point first_step_time_;
  int64_t last_printed_step_ = -1;
  std::chrono::steady_clock::time_point last_print_;
  float last_eval_printed_ = NAN;
};

}  // namespace lmps

#endif  // LMPS_LAUNCHER_PROGRESS_H_
