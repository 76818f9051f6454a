#include "common/process/process_group.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

// Polls `done` every 10 ms until it holds or `timeout` passes; the failure
// names what was awaited.
::testing::AssertionResult WaitFor(const std::function<bool()>& done,
                                   absl::Duration timeout,
                                   const std::string& what) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() >= deadline) {
      return ::testing::AssertionFailure()
             << "timed out after " << absl::FormatDuration(timeout)
             << " waiting for " << what;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  return ::testing::AssertionSuccess();
}

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir != nullptr ? dir : "/tmp", "/", name);
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// `sh -c script`: /bin/sh is the one path every test machine has.
std::vector<std::string> Shell(const std::string& script) {
  return {"/bin/sh", "-c", script};
}

TEST(ProcessGroupTest, ReportsExitStatus) {
  ProcessGroup group;
  absl::StatusOr<pid_t> pid = group.Spawn(Shell("exit 3"), SpawnOptions());
  ASSERT_TRUE(pid.ok()) << pid.status();
  std::optional<ExitStatus> status = group.Wait(*pid, absl::Seconds(30));
  ASSERT_TRUE(status.has_value()) << "sh -c 'exit 3' did not exit within 30 s";
  EXPECT_TRUE(status->exited());
  EXPECT_EQ(status->exit_code(), 3);
  EXPECT_EQ(status->term_signal(), 0);
  EXPECT_FALSE(status->success());
  EXPECT_EQ(status->Describe(), "exited with status 3");
  EXPECT_FALSE(group.running(*pid));
  // Still readable once reaped.
  ASSERT_TRUE(group.Poll(*pid).has_value());
  EXPECT_EQ(group.Poll(*pid)->exit_code(), 3);
}

TEST(ProcessGroupTest, KillReportsTheSignal) {
  ProcessGroup group;
  absl::StatusOr<pid_t> pid = group.Spawn(Shell("exec sleep 100"), SpawnOptions());
  ASSERT_TRUE(pid.ok()) << pid.status();
  EXPECT_TRUE(group.running(*pid));
  EXPECT_FALSE(group.Poll(*pid).has_value());
  absl::StatusOr<ExitStatus> status = group.Kill(*pid);
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_FALSE(status->exited());
  EXPECT_EQ(status->exit_code(), -1);
  EXPECT_EQ(status->term_signal(), SIGKILL);
  EXPECT_EQ(status->Describe(), "was killed by signal 9");
  EXPECT_EQ(group.Kill(*pid).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(group.Signal(*pid, SIGTERM).code(), absl::StatusCode::kNotFound);
}

TEST(ProcessGroupTest, MissingBinaryIsNotFound) {
  ProcessGroup group;
  absl::StatusOr<pid_t> pid =
      group.Spawn({"/nonexistent/lmps_binary"}, SpawnOptions());
  EXPECT_EQ(pid.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(pid.status().message(), "binary not found: /nonexistent/lmps_binary");
  EXPECT_TRUE(group.running_pids().empty());
}

TEST(ProcessGroupTest, RedirectsOutputToAFile) {
  const std::string log = TempPath("redirect.log");
  ProcessGroup group;
  SpawnOptions options;
  options.output_path = log;
  absl::StatusOr<pid_t> pid =
      group.Spawn(Shell("echo to-stdout; echo to-stderr >&2"), options);
  ASSERT_TRUE(pid.ok()) << pid.status();
  std::optional<ExitStatus> status = group.Wait(*pid, absl::Seconds(30));
  ASSERT_TRUE(status.has_value()) << "the echo shell did not exit within 30 s";
  EXPECT_TRUE(status->success());
  EXPECT_EQ(ReadFile(log), "to-stdout\nto-stderr\n");
  EXPECT_EQ(LogTail(log, 1), "    to-stderr\n");
  EXPECT_EQ(LogTail(log, 5), "    to-stdout\n    to-stderr\n");
}

TEST(ProcessGroupTest, UnopenableOutputFails) {
  ProcessGroup group;
  SpawnOptions options;
  options.output_path = "/nonexistent/dir/log";
  EXPECT_EQ(group.Spawn(Shell("exit 0"), options).status().code(),
            absl::StatusCode::kInternal);
}

TEST(ProcessGroupTest, StopAllStopsEveryChildWithinTheGrace) {
  ProcessGroup group;
  absl::StatusOr<pid_t> a = group.Spawn(Shell("exec sleep 100"), SpawnOptions());
  absl::StatusOr<pid_t> b = group.Spawn(Shell("exec sleep 100"), SpawnOptions());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(group.running_pids(), (std::vector<pid_t>{*a, *b}));
  const absl::Time start = absl::Now();
  group.StopAll(absl::Seconds(30));
  // sleep dies of SIGTERM at once: far within the grace.
  EXPECT_LT(absl::Now() - start, absl::Seconds(20));
  EXPECT_TRUE(group.running_pids().empty());
  ASSERT_TRUE(group.Poll(*a).has_value());
  EXPECT_EQ(group.Poll(*a)->term_signal(), SIGTERM);
  EXPECT_EQ(group.Poll(*b)->term_signal(), SIGTERM);
}

TEST(ProcessGroupTest, StopAllEscalatesToSigkill) {
  const std::string ready = TempPath("trapped");
  std::remove(ready.c_str());
  ProcessGroup group;
  absl::StatusOr<pid_t> pid = group.Spawn(
      Shell(absl::StrCat("trap '' TERM; echo ready > ", ready, "; exec sleep 100")),
      SpawnOptions());
  ASSERT_TRUE(pid.ok()) << pid.status();
  ASSERT_TRUE(WaitFor([&] { return !ReadFile(ready).empty(); }, absl::Seconds(30),
                      "the shell to ignore SIGTERM and write " + ready));
  group.StopAll(absl::Milliseconds(200));
  ASSERT_TRUE(group.Poll(*pid).has_value());
  EXPECT_EQ(group.Poll(*pid)->term_signal(), SIGKILL);
}

// The orphans of the children below are re-parented to this process, so it
// can reap them and see how they ended.
void BecomeSubreaper() { ASSERT_EQ(prctl(PR_SET_CHILD_SUBREAPER, 1), 0); }

// Reaps `pid` (a child of this process) once it exits, or times out.
::testing::AssertionResult ReapWithin(pid_t pid, absl::Duration timeout,
                                      const std::string& what, int* status) {
  return WaitFor([&] { return waitpid(pid, status, WNOHANG) == pid; }, timeout,
                 what);
}

TEST(ProcessGroupTest, NewProcessGroupReachesGrandchildren) {
  BecomeSubreaper();
  const std::string pid_file = TempPath("grandchild.pid");
  std::remove(pid_file.c_str());
  ProcessGroup group;
  SpawnOptions options;
  options.new_process_group = true;
  absl::StatusOr<pid_t> pid = group.Spawn(
      Shell(absl::StrCat("sleep 100 & echo $! > ", pid_file, "; wait")), options);
  ASSERT_TRUE(pid.ok()) << pid.status();
  std::string text;
  ASSERT_TRUE(WaitFor(
      [&] {
        text = ReadFile(pid_file);
        return !text.empty() && text.back() == '\n';
      },
      absl::Seconds(30), "the shell to write its background sleep's pid"));
  const pid_t grandchild = std::atoi(text.c_str());
  ASSERT_GT(grandchild, 0) << text;
  group.StopAll(absl::ZeroDuration());
  EXPECT_EQ(group.Poll(*pid)->term_signal(), SIGKILL);
  int status = 0;
  ASSERT_TRUE(ReapWithin(grandchild, absl::Seconds(30), "the grandchild to die",
                         &status));
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
}

TEST(ProcessGroupTest, ChildDiesWithItsParent) {
  BecomeSubreaper();
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  // The parent: spawns `sleep 100`, reports its pid and exits without
  // stopping it.
  const pid_t parent = fork();
  ASSERT_GE(parent, 0);
  if (parent == 0) {
    close(fds[0]);
    ProcessGroup group;
    absl::StatusOr<pid_t> pid = group.Spawn(Shell("exec sleep 100"), SpawnOptions());
    const pid_t value = pid.ok() ? *pid : -1;
    if (write(fds[1], &value, sizeof(value)) != sizeof(value)) _exit(2);
    _exit(0);  // no destructors: the child is left running
  }
  close(fds[1]);
  pid_t child = -1;
  ASSERT_EQ(read(fds[0], &child, sizeof(child)), static_cast<ssize_t>(sizeof(child)));
  close(fds[0]);
  ASSERT_GT(child, 0) << "the parent could not spawn sleep";
  int status = 0;
  ASSERT_TRUE(ReapWithin(parent, absl::Seconds(30), "the parent to exit", &status));
  ASSERT_TRUE(ReapWithin(child, absl::Seconds(30),
                         "the orphaned sleep to die with its parent", &status));
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
}

TEST(ProcessGroupTest, KillAllFromSignalHandlerKillsAndReaps) {
  // In a process of its own, as the handler's caller would then _exit.
  const pid_t helper = fork();
  ASSERT_GE(helper, 0);
  if (helper == 0) {
    ProcessGroup group;
    absl::StatusOr<pid_t> pid = group.Spawn(Shell("exec sleep 100"), SpawnOptions());
    if (!pid.ok()) _exit(2);
    ProcessGroup::KillAllFromSignalHandler();
    // Reaped: no such process any more.
    _exit(kill(*pid, 0) != 0 && errno == ESRCH ? 0 : 3);
  }
  int status = 0;
  ASSERT_TRUE(ReapWithin(helper, absl::Seconds(30), "the helper to exit", &status));
  EXPECT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "2: spawn failed, 3: sleep still exists";
}

}  // namespace
}  // namespace lmps
