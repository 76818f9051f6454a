// ProcessGroup: child processes started with fork/exec, reaped, and stopped
// all together, in one place for the launcher (launcher/lmps_local), the
// parameter-server benchmark (bench/ps_bench) and the multi-process tests
// (tests/test_util.h).
//
// Contract:
//
//   Spawn(argv, options) starts argv[0], a path (not looked up in $PATH),
//   with `argv` as its argument vector. A path that is not executable is
//   NotFound ("binary not found: PATH") and nothing is started. When Spawn
//   returns a pid, the child has applied every option below and exec'd the
//   binary (unless something killed it first); an exec that failed is
//   Internal (the child is reaped). The child
//   inherits the environment, the working directory, the signal mask,
//   ignored signals (SIG_IGN) and descriptors without FD_CLOEXEC.
//
//   A child is running from Spawn until Poll, Wait, Kill or StopAll reaps
//   it (waitpid); its ExitStatus stays readable with Poll afterwards. Signals
//   to a child spawned with `new_process_group` go to its whole process group
//   (its descendants too) as well as to the child.
//
//   StopAll(grace) sends SIGTERM to every running child, waits up to `grace`
//   for them to exit, then SIGKILLs and reaps the rest (a zero grace: SIGKILL
//   at once); it returns once every child is reaped. The destructor does
//   StopAll(kDefaultStopGrace).
//
//   Failures are absl::Status; nothing here throws or exits the process.
//
// Thread-safety: a ProcessGroup is not thread-safe; one thread owns it.
// With `die_with_parent` the children get SIGKILL when the thread that
// spawned them exits (PR_SET_PDEATHSIG follows the thread, not the process),
// so spawn from a thread that lives as long as the children should.
// Separate ProcessGroups may be used from separate threads, provided nothing
// else in the process reaps their children (waitpid(-1, ...) or SIGCHLD set
// to SIG_IGN would take their exit statuses).
// ProcessGroup::KillAllFromSignalHandler() is async-signal-safe.
#ifndef LMPS_COMMON_PROCESS_PROCESS_GROUP_H_
#define LMPS_COMMON_PROCESS_PROCESS_GROUP_H_

#include <sys/types.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace lmps {

// How a reaped child ended: a waitpid() status.
class ExitStatus {
 public:
  explicit ExitStatus(int wait_status) : wait_status_(wait_status) {}

  // It called exit() (or returned from main).
  bool exited() const;
  // Its exit code, or -1 when it did not exit (killed by a signal).
  int exit_code() const;
  // The signal that killed it, or 0 when it exited.
  int term_signal() const;
  // Exited with code 0.
  bool success() const { return exited() && exit_code() == 0; }
  // "exited with status N" or "was killed by signal N" (the launcher's log
  // lines, which tests match, are built from these).
  std::string Describe() const;
  int wait_status() const { return wait_status_; }

 private:
  int wait_status_;
};

struct SpawnOptions {
  // stdout and stderr go to this file, created or truncated (mode 0644);
  // a file that cannot be opened fails Spawn. Empty: see output_fd.
  std::string output_path;
  // When output_path is empty and this is >= 0: stdout and stderr go to
  // this descriptor (e.g. a pipe's write end). Otherwise they are inherited.
  int output_fd = -1;
  // SIGKILL the child when the spawning thread exits (PR_SET_PDEATHSIG); a
  // child whose parent died before it could arrange this exits with status 1.
  bool die_with_parent = true;
  // The child leads a new process group (setpgid(0, 0)): Signal, Kill and
  // StopAll then reach everything it starts.
  bool new_process_group = false;
  // The child ignores SIGINT: a Ctrl-C at the terminal goes to the whole
  // foreground process group, and the parent decides how children stop.
  bool ignore_sigint = false;
};

class ProcessGroup {
 public:
  // StopAll's grace in the destructor: SIGTERM, then SIGKILL after 5 s.
  static constexpr absl::Duration kDefaultStopGrace = absl::Seconds(5);

  ProcessGroup() = default;
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;
  ~ProcessGroup();

  // Starts argv[0] with `argv`; returns its pid. See the contract above.
  absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv,
                              const SpawnOptions& options);

  // Without blocking: pid's exit status if it has exited (reaping it), or
  // if it was reaped before; nullopt while it runs, and for a pid this group
  // did not spawn.
  std::optional<ExitStatus> Poll(pid_t pid);

  // Polls pid until it exits or `timeout` passes; nullopt on timeout (it
  // keeps running) and for a pid this group did not spawn.
  std::optional<ExitStatus> Wait(pid_t pid, absl::Duration timeout);

  // Sends `sig` to a running child (and its process group, if it has one).
  // NotFound if pid is not a running child of this group.
  absl::Status Signal(pid_t pid, int sig);

  // SIGKILLs a running child (and its process group, if it has one) and
  // reaps it. NotFound if pid is not a running child of this group.
  absl::StatusOr<ExitStatus> Kill(pid_t pid);

  // Stops and reaps every running child; see the contract above.
  void StopAll(absl::Duration grace = kDefaultStopGrace);

  bool running(pid_t pid) const;
  // The running children's pids, in the order they were spawned.
  std::vector<pid_t> running_pids() const;

  // For a SIGINT/SIGTERM handler that then _exit()s: SIGKILLs and reaps
  // (blocking) every running child of every ProcessGroup in this process,
  // using async-signal-safe calls only. The first 4096 children running at
  // once are covered (any beyond still die with the process when spawned
  // with die_with_parent).
  static void KillAllFromSignalHandler();

 private:
  struct Child {
    int64_t order = 0;  // spawn order
    bool running = true;
    bool own_process_group = false;
    int slot = -1;  // in the signal handler's table; -1: not in it
    int wait_status = 0;
  };

  void SendSignal(pid_t pid, const Child& child, int sig);
  // Records a reaped child.
  void Reaped(pid_t pid, Child& child, int wait_status);

  std::map<pid_t, Child> children_;
  int64_t next_order_ = 0;
};

// The last `lines` lines of a child's log file, each indented by 4 spaces
// and ending in a newline ("" if it cannot be read): the launcher's and the
// benchmark's report of a child that failed.
std::string LogTail(const std::string& path, int lines);

}  // namespace lmps

#endif  // LMPS_COMMON_PROCESS_PROCESS_GROUP_H_
