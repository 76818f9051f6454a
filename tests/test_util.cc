#include "tests/test_util.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace lmps::testing {

namespace {

// Each command leads its own process group (a kill reaches everything it
// started) and, as always in these tests, is not tied to the test process's
// life: the test stops it.
SpawnOptions CommandOptions() {
  SpawnOptions options;
  options.die_with_parent = false;
  options.new_process_group = true;
  return options;
}

}  // namespace

CommandResult RunCommand(const std::vector<std::string>& argv, int timeout_s) {
  CommandResult result;
  int pipefd[2];
  // The read end stays out of the command; the write end is its stdout and
  // stderr.
  if (pipe2(pipefd, O_CLOEXEC) != 0) return result;
  ProcessGroup group;
  SpawnOptions options = CommandOptions();
  options.output_fd = pipefd[1];
  absl::StatusOr<pid_t> pid = group.Spawn(argv, options);
  close(pipefd[1]);
  if (!pid.ok()) {
    close(pipefd[0]);
    result.output = pid.status().ToString();
    return result;
  }
  fcntl(pipefd[0], F_SETFL, O_NONBLOCK);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  std::optional<ExitStatus> status;
  char buf[4096];
  while (true) {
    ssize_t n;
    while ((n = read(pipefd[0], buf, sizeof(buf))) > 0) result.output.append(buf, n);
    if (status.has_value()) break;
    if ((status = group.Poll(*pid)).has_value()) continue;  // drain once more
    if (std::chrono::steady_clock::now() > deadline) {
      result.timed_out = true;
      absl::StatusOr<ExitStatus> killed = group.Kill(*pid);
      status = killed.ok() ? *killed : ExitStatus(SIGKILL);
      continue;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  close(pipefd[0]);
  result.exit_code = status->exited() && !result.timed_out ? status->exit_code() : -1;
  return result;
}

BackgroundProcess::BackgroundProcess(const std::vector<std::string>& argv,
                                     const std::string& log_path) {
  SpawnOptions options = CommandOptions();
  options.output_path = log_path;
  absl::StatusOr<pid_t> pid = group_.Spawn(argv, options);
  if (!pid.ok()) {
    std::fprintf(stderr, "BackgroundProcess: %s\n", pid.status().ToString().c_str());
    return;
  }
  pid_ = *pid;
}

int BackgroundProcess::Wait(int timeout_s) {
  if (pid_ < 0) return -1;
  std::optional<ExitStatus> status = group_.Wait(pid_, absl::Seconds(timeout_s));
  return status.has_value() ? status->exit_code() : -1;
}

BackgroundProcess::~BackgroundProcess() { group_.StopAll(absl::ZeroDuration()); }

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

namespace {

// The bytes figure at text[at]: "56.6 kB", "1.2 MB" or "830 B".
double ParseBytes(const std::string& text, size_t at) {
  char* unit = nullptr;
  const double v = std::strtod(text.c_str() + at, &unit);
  const std::string rest(unit, std::min<size_t>(3, std::strlen(unit)));
  return v * (rest == " kB" ? 1e3 : rest == " MB" ? 1e6 : 1);
}

}  // namespace

void ExpectSameExportedModel(const std::string& run_dir_a,
                             const std::string& run_dir_b,
                             const std::string& why) {
  absl::StatusOr<double> diff =
      MaxAbsDiffOfFiles(run_dir_a + "/model.safetensors",
                        run_dir_b + "/model.safetensors");
  if (!diff.ok()) {
    ADD_FAILURE() << diff.status();
    return;
  }
  EXPECT_EQ(*diff, 0.0) << run_dir_a << " vs " << run_dir_b << ": " << why;
}

std::string SmallAggregationJob(const std::string& optimizer,
                                const std::string& train) {
  return absl::StrCat(
      "model { n_layer: 2 n_head: 2 n_embd: 32 block_size: 16 }\n"
      "optimizer { ",
      optimizer,
      " }\n"
      "train { steps: 4 batch_size: 12 eval_interval: 0 sample_tokens: 0 ",
      train,
      " }\n"
      "max_chunk_bytes: 2048\nmax_message_bytes: 1024\n");
}

FinalProgress RunLocalJob(const std::string& name, const std::string& job,
                          const std::vector<std::string>& flags, int steps,
                          int timeout_s) {
  const std::string dir = TempDir(name);
  WriteFile(dir + "/job.textproto", job);
  std::vector<std::string> argv = {BinaryPath("launcher/lmps_local"),
                                   "--job=" + dir + "/job.textproto",
                                   "--run_dir=" + dir + "/run"};
  argv.insert(argv.end(), flags.begin(), flags.end());
  CommandResult r = RunCommand(argv, timeout_s);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  FinalProgress out;
  out.run_dir = dir + "/run";
  const std::string last = absl::StrCat("step ", steps, "/", steps);
  const size_t line = r.output.rfind(last);
  if (line == std::string::npos) {
    ADD_FAILURE() << "no progress line '" << last << "': " << r.output;
    return out;
  }
  const size_t end = r.output.find('\n', line);
  const std::string text = r.output.substr(line, end - line);
  if (const size_t at = text.find("eval "); at != std::string::npos) {
    out.eval = std::strtof(text.c_str() + at + 5, nullptr);
  }
  if (const size_t at = text.find("pull "); at != std::string::npos) {
    out.pull_bytes = ParseBytes(text, at + 5);
  }
  if (const size_t at = text.find("push "); at != std::string::npos) {
    out.push_bytes = ParseBytes(text, at + 5);
  }
  std::printf("%s: eval %.4f, pull %.0f, push %.0f bytes/step\n",
              name.c_str(), out.eval, out.pull_bytes, out.push_bytes);
  return out;
}

void ExpectDeadWorkerReplacedExactly(const std::string& name,
                                     const std::string& train, int workers) {
  const std::string job = SmallAggregationJob("lr: 0.001", train);
  const std::vector<std::string> flags = {
      absl::StrCat("--workers=", workers), "--shards=2", "--lease_s=2"};
  const FinalProgress straight = RunLocalJob(name + "_straight", job, flags, 4);
  std::vector<std::string> faulty_flags = flags;
  faulty_flags.push_back("--fault_worker=0");
  faulty_flags.push_back("--fault_kill_at_step=2");
  const FinalProgress faulty =
      RunLocalJob(name + "_faulty", job, faulty_flags, 4);
  const std::string logs = faulty.run_dir + "/logs/";
  EXPECT_NE(ReadFile(logs + "worker-0.log").find("SIGKILL mid-push of step 2"),
            std::string::npos)
      << ReadFile(logs + "worker-0.log");
  EXPECT_FALSE(ReadFile(logs + "worker-0.restart1.log").empty())
      << "no replacement of worker-0";
  // The survivors' step failed on the dead peer and they waited for the
  // regroup instead of failing the job.
  const std::string survivor = ReadFile(logs + "worker-1.log");
  EXPECT_NE(survivor.find("for the scheduler to regroup the job at this step"),
            std::string::npos)
      << survivor;
  ExpectSameExportedModel(straight.run_dir, faulty.run_dir);
}

}  // namespace lmps::testing
