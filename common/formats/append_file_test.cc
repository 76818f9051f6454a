#include "common/formats/append_file.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

TEST(AppendFileTest, AppendsWholeLinesAfterWhatIsThere) {
  const std::string path =
      std::string(std::getenv("TEST_TMPDIR")) + "/log.jsonl";
  std::ofstream(path) << "{\"earlier\": 1}\n";
  auto f = AppendFile::Open(path, "test log");
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_TRUE((*f)->AppendLine("{\"a\": 1}").ok());
  ASSERT_TRUE((*f)->AppendLine("{\"b\": 2}").ok());
  EXPECT_EQ(ReadLinesIfRegular(path),
            (std::vector<std::string>{"{\"earlier\": 1}", "{\"a\": 1}",
                                      "{\"b\": 2}"}));
}

TEST(AppendFileTest, ErrorsNameTheFile) {
  auto missing = AppendFile::Open("/nonexistent/dir/log", "test log");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(missing.status().message().find("test log /nonexistent/dir/log"),
            std::string::npos);
  auto full = AppendFile::Open("/dev/full", "test log");
  ASSERT_TRUE(full.ok()) << full.status();
  const absl::Status s = (*full)->AppendLine("x");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("/dev/full"), std::string::npos) << s;
}

TEST(AppendFileTest, OnlyRegularFilesAreRead) {
  EXPECT_TRUE(ReadLinesIfRegular("/dev/zero").empty());  // never ends
  EXPECT_TRUE(ReadLinesIfRegular("/nonexistent").empty());
}

}  // namespace
}  // namespace lmps
