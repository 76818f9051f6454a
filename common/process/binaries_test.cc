#include "common/process/binaries.h"

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "gtest/gtest.h"

namespace lmps {
namespace {

namespace fs = std::filesystem;

std::string TempDir(const std::string& name) {
  const char* base = std::getenv("TEST_TMPDIR");
  const fs::path dir = fs::path(base != nullptr ? base : "/tmp") / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

void WriteExecutable(const std::string& path) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path) << "#!/bin/sh\n";
  ASSERT_EQ(chmod(path.c_str(), 0755), 0) << path;
}

TEST(BinariesTest, BinDirIsTheFlagOrTwoLevelsAboveThisBinary) {
  EXPECT_EQ(BinDir("/opt/lmps/bin"), "/opt/lmps/bin");
  const fs::path exe = fs::canonical("/proc/self/exe");
  EXPECT_EQ(BinDir(""), exe.parent_path().parent_path().string());
}

TEST(BinariesTest, BazelLayoutWhenExecutableThereElseFlat) {
  const std::string bazel = TempDir("bazel_layout");
  WriteExecutable(bazel + "/server/lmps_server");
  EXPECT_EQ(BinaryIn(bazel, "server/lmps_server"),
            bazel + "/server/lmps_server");

  const std::string flat = TempDir("flat_layout");
  WriteExecutable(flat + "/lmps_server");
  EXPECT_EQ(BinaryIn(flat, "server/lmps_server"), flat + "/lmps_server");

  // A file that is not executable does not count as the Bazel layout.
  const std::string plain = TempDir("not_executable");
  fs::create_directories(plain + "/server");
  std::ofstream(plain + "/server/lmps_server") << "data";
  EXPECT_EQ(BinaryIn(plain, "server/lmps_server"), plain + "/lmps_server");
}

}  // namespace
}  // namespace lmps
