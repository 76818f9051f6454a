#include "tests/test_util.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"

namespace lmps::testing {

CommandResult RunCommand(const std::vector<std::string>& argv, int timeout_s) {
  CommandResult result;
  int pipefd[2];
  if (pipe(pipefd) != 0) return result;
  pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    dup2(pipefd[1], 1);
    dup2(pipefd[1], 2);
    close(pipefd[0]);
    close(pipefd[1]);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(pipefd[1]);
  fcntl(pipefd[0], F_SETFL, O_NONBLOCK);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  int status = 0;
  bool exited = false;
  char buf[4096];
  while (true) {
    ssize_t n;
    while ((n = read(pipefd[0], buf, sizeof(buf))) > 0) result.output.append(buf, n);
    if (exited) break;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      exited = true;  // drain once more
      continue;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      result.timed_out = true;
      kill(-pid, SIGKILL);
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      exited = true;
      continue;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  close(pipefd[0]);
  result.exit_code = WIFEXITED(status) && !result.timed_out ? WEXITSTATUS(status) : -1;
  return result;
}

BackgroundProcess::BackgroundProcess(const std::vector<std::string>& argv,
                                     const std::string& log_path) {
  pid_ = fork();
  if (pid_ == 0) {
    setpgid(0, 0);
    int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
}

int BackgroundProcess::Wait(int timeout_s) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      reaped_ = true;
      return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

BackgroundProcess::~BackgroundProcess() {
  if (pid_ > 0 && !reaped_) {
    kill(-pid_, SIGKILL);
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

std::string WaitForFile(const std::string& path, int timeout_s) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    std::string text = ReadFile(path);
    if (!text.empty()) return text;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return "";
}

std::string BinaryPath(const std::string& relative) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* ws = std::getenv("TEST_WORKSPACE");
  std::string path = absl::StrCat(srcdir ? srcdir : ".", "/", ws ? ws : "lmps",
                                  "/", relative);
  return std::filesystem::canonical(path).string();
}

std::string TempDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string dir = absl::StrCat(tmp ? tmp : "/tmp", "/", name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

absl::StatusOr<double> MaxAbsDiff(const SafetensorsContents& a,
                                  const SafetensorsContents& b) {
  if (a.tensors.size() != b.tensors.size()) {
    return absl::InvalidArgumentError("different tensor counts");
  }
  double worst = 0;
  for (const SafeTensor& ta : a.tensors) {
    const SafeTensor* tb = b.Find(ta.name);
    if (tb == nullptr || tb->shape != ta.shape) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", ta.name, " differs"));
    }
    for (size_t i = 0; i < ta.data.size(); ++i) {
      double d = std::fabs(static_cast<double>(ta.data[i]) - tb->data[i]);
      if (!(d <= worst)) worst = std::isnan(d) ? INFINITY : d;
    }
  }
  return worst;
}

absl::StatusOr<double> MaxAbsDiffOfFiles(const std::string& a,
                                         const std::string& b) {
  absl::StatusOr<SafetensorsContents> ma = ReadSafetensorsFile(a);
  if (!ma.ok()) return ma.status();
  absl::StatusOr<SafetensorsContents> mb = ReadSafetensorsFile(b);
  if (!mb.ok()) return mb.status();
  return MaxAbsDiff(*ma, *mb);
}

}  // namespace lmps::testing
