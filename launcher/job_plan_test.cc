#include "launcher/job_plan.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "common/formats/token_shard.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

std::string TmpDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir ? dir : "/tmp";
}

absl::StatusOr<JobSpec> Plan(const std::string& spec_text) {
  const std::string path = TmpDir() + "/job.textproto";
  std::ofstream(path, std::ios::trunc) << spec_text;
  JobOverrides o;
  o.job_file = path;
  return PlanJobSpec(o);
}

// lmps_local checks every token shard before any process starts.
TEST(JobPlanTest, TokenShardsAreCheckedBeforeTheJobStarts) {
  const std::string dir = TmpDir();
  ASSERT_TRUE(WriteTokenShard(dir + "/train.bin", std::vector<uint16_t>(500, 100)).ok());
  ASSERT_TRUE(WriteTokenShard(dir + "/val.bin", std::vector<uint16_t>(200, 200)).ok());
  const std::string spec = "model { block_size: 16 vocab_size: 256 } data { format: TOKEN_SHARDS "
                           "train_shards: '" + dir + "/train.bin' val_shards: '";
  absl::StatusOr<JobSpec> ok = Plan(spec + dir + "/val.bin' }");
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->data().format(), TOKEN_SHARDS);

  struct Bad {
    std::vector<int32_t> header;
    int tokens;
    uint16_t value;
    std::string error;
  };
  const Bad bads[] = {
      {{20240521, 1, 100}, 100, 1, "wrong magic 20240521"},
      {{20240520, 7, 100}, 100, 1, "version 7, expected 1"},
      {{20240520, 1, 100}, 60, 1, "counts 100 tokens"},
      {{20240520, 1, 100}, 100, 256, "token 256 at index 0 is not below the model's vocab_size 256"},
  };
  for (const Bad& b : bads) {
    std::vector<int32_t> header = b.header;
    header.resize(256, 0);
    std::vector<uint16_t> tokens(b.tokens, b.value);
    std::FILE* f = std::fopen((dir + "/bad.bin").c_str(), "wb");
    std::fwrite(header.data(), 4, 256, f);
    std::fwrite(tokens.data(), 2, tokens.size(), f);
    std::fclose(f);
    absl::StatusOr<JobSpec> bad = Plan(spec + dir + "/bad.bin' }");
    ASSERT_FALSE(bad.ok()) << b.error;
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(bad.status().message().find(dir + "/bad.bin"), std::string::npos)
        << bad.status();
    EXPECT_NE(bad.status().message().find(b.error), std::string::npos) << bad.status();
  }
  absl::StatusOr<JobSpec> missing = Plan(spec + dir + "/nothing_*.bin' }");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("matches no file"), std::string::npos);
}

TEST(JobPlanTest, MissingTextFile) {
  absl::StatusOr<JobSpec> s = Plan("data { path: '/nonexistent/text.txt' }");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lmps
