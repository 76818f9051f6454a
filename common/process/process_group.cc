#include "common/process/process_group.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace lmps {
namespace {

// How often StopAll and Wait look for exited children.
constexpr absl::Duration kPollInterval = absl::Milliseconds(20);

// The running children of every ProcessGroup, for KillAllFromSignalHandler:
// a pid, negated when the child leads its own process group; 0: free.
constexpr int kMaxTracked = 4096;
std::atomic<pid_t> g_tracked[kMaxTracked];

int Track(pid_t pid, bool own_group) {
  const pid_t value = own_group ? -pid : pid;
  for (int i = 0; i < kMaxTracked; ++i) {
    pid_t expected = 0;
    if (g_tracked[i].compare_exchange_strong(expected, value)) return i;
  }
  return -1;
}

void Untrack(int slot) {
  if (slot >= 0) g_tracked[slot].store(0);
}

}  // namespace

bool ExitStatus::exited() const { return WIFEXITED(wait_status_); }

int ExitStatus::exit_code() const {
  return WIFEXITED(wait_status_) ? WEXITSTATUS(wait_status_) : -1;
}

int ExitStatus::term_signal() const {
  return WIFSIGNALED(wait_status_) ? WTERMSIG(wait_status_) : 0;
}

std::string ExitStatus::Describe() const {
  return WIFEXITED(wait_status_)
             ? absl::StrCat("exited with status ", WEXITSTATUS(wait_status_))
             : absl::StrCat("was killed by signal ", WTERMSIG(wait_status_));
}

ProcessGroup::~ProcessGroup() { StopAll(); }

absl::StatusOr<pid_t> ProcessGroup::Spawn(const std::vector<std::string>& argv,
                                          const SpawnOptions& options) {
  if (argv.empty()) return absl::InvalidArgumentError("Spawn: empty argv");
  const std::string& binary = argv[0];
  if (access(binary.c_str(), X_OK) != 0) {
    return absl::NotFoundError(absl::StrCat("binary not found: ", binary));
  }
  // Everything the child needs is prepared here: between fork and exec it
  // makes async-signal-safe calls only (this process may have threads).
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  int output = options.output_fd;
  int opened = -1;
  if (!options.output_path.empty()) {
    opened = open(options.output_path.c_str(),
                  O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (opened < 0) {
      return absl::InternalError(absl::StrCat(
          "cannot open ", options.output_path, ": ", std::strerror(errno)));
    }
    output = opened;
  }
  // Closed by the child's exec; an exec that fails writes its errno first.
  int exec_pipe[2];
  if (pipe2(exec_pipe, O_CLOEXEC) != 0) {
    const int err = errno;
    if (opened >= 0) close(opened);
    return absl::InternalError(absl::StrCat("pipe: ", std::strerror(err)));
  }
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    const int err = errno;
    if (opened >= 0) close(opened);
    close(exec_pipe[0]);
    close(exec_pipe[1]);
    return absl::InternalError(absl::StrCat("fork: ", std::strerror(err)));
  }
  if (pid == 0) {
    if (options.die_with_parent) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(1);  // it died before prctl
    }
    if (options.new_process_group) setpgid(0, 0);
    if (output >= 0) {
      dup2(output, 1);
      dup2(output, 2);
    }
    if (options.ignore_sigint) signal(SIGINT, SIG_IGN);
    execv(args[0], args.data());
    const int err = errno;
    ssize_t ignored = write(exec_pipe[1], &err, sizeof(err));
    (void)ignored;
    _exit(127);
  }
  if (opened >= 0) close(opened);
  close(exec_pipe[1]);
  int exec_errno = 0;
  ssize_t n;
  do {
    n = read(exec_pipe[0], &exec_errno, sizeof(exec_errno));
  } while (n < 0 && errno == EINTR);
  close(exec_pipe[0]);
  if (n == static_cast<ssize_t>(sizeof(exec_errno))) {
    waitpid(pid, nullptr, 0);
    return absl::InternalError(absl::StrCat("execv ", binary, ": ",
                                            std::strerror(exec_errno)));
  }
  Child child;
  child.order = next_order_++;
  child.own_process_group = options.new_process_group;
  child.slot = Track(pid, options.new_process_group);
  children_[pid] = child;
  return pid;
}

void ProcessGroup::Reaped(pid_t pid, Child& child, int wait_status) {
  (void)pid;
  child.running = false;
  child.wait_status = wait_status;
  Untrack(child.slot);
  child.slot = -1;
}

std::optional<ExitStatus> ProcessGroup::Poll(pid_t pid) {
  auto it = children_.find(pid);
  if (it == children_.end()) return std::nullopt;
  Child& child = it->second;
  if (child.running) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) != pid) return std::nullopt;
    Reaped(pid, child, status);
  }
  return ExitStatus(child.wait_status);
}

std::optional<ExitStatus> ProcessGroup::Wait(pid_t pid, absl::Duration timeout) {
  if (children_.count(pid) == 0) return std::nullopt;
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    if (std::optional<ExitStatus> status = Poll(pid)) return status;
    if (absl::Now() >= deadline) return std::nullopt;
    absl::SleepFor(kPollInterval);
  }
}

void ProcessGroup::SendSignal(pid_t pid, const Child& child, int sig) {
  if (child.own_process_group) kill(-pid, sig);
  kill(pid, sig);
}

absl::Status ProcessGroup::Signal(pid_t pid, int sig) {
  auto it = children_.find(pid);
  if (it == children_.end() || !it->second.running) {
    return absl::NotFoundError(absl::StrCat("no running child ", pid));
  }
  SendSignal(pid, it->second, sig);
  return absl::OkStatus();
}

absl::StatusOr<ExitStatus> ProcessGroup::Kill(pid_t pid) {
  auto it = children_.find(pid);
  if (it == children_.end() || !it->second.running) {
    return absl::NotFoundError(absl::StrCat("no running child ", pid));
  }
  SendSignal(pid, it->second, SIGKILL);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  Reaped(pid, it->second, status);
  return ExitStatus(status);
}

void ProcessGroup::StopAll(absl::Duration grace) {
  if (grace > absl::ZeroDuration()) {
    for (auto& [pid, child] : children_) {
      if (child.running) SendSignal(pid, child, SIGTERM);
    }
    const absl::Time deadline = absl::Now() + grace;
    while (true) {
      bool all = true;
      for (auto& [pid, child] : children_) {
        if (!child.running) continue;
        int status = 0;
        if (waitpid(pid, &status, WNOHANG) == pid) {
          Reaped(pid, child, status);
        } else {
          all = false;
        }
      }
      if (all || absl::Now() >= deadline) break;
      absl::SleepFor(kPollInterval);
    }
  }
  for (auto& [pid, child] : children_) {
    if (child.running) Kill(pid).IgnoreError();
  }
}

bool ProcessGroup::running(pid_t pid) const {
  auto it = children_.find(pid);
  return it != children_.end() && it->second.running;
}

std::vector<pid_t> ProcessGroup::running_pids() const {
  std::vector<std::pair<int64_t, pid_t>> running;
  for (const auto& [pid, child] : children_) {
    if (child.running) running.push_back({child.order, pid});
  }
  std::sort(running.begin(), running.end());
  std::vector<pid_t> out;
  for (const auto& [order, pid] : running) out.push_back(pid);
  return out;
}

void ProcessGroup::KillAllFromSignalHandler() {
  for (std::atomic<pid_t>& slot : g_tracked) {
    const pid_t value = slot.load();
    if (value == 0) continue;
    const pid_t pid = value < 0 ? -value : value;
    if (value < 0) kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
  }
}

std::string LogTail(const std::string& path, int lines) {
  std::ifstream in(path);
  std::vector<std::string> all;
  std::string line;
  while (std::getline(in, line)) all.push_back(line);
  std::string out;
  const size_t first =
      all.size() > static_cast<size_t>(lines) ? all.size() - lines : 0;
  for (size_t i = first; i < all.size(); ++i) out += "    " + all[i] + "\n";
  return out;
}

}  // namespace lmps
