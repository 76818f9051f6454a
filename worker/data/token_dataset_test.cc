#include "worker/data/token_dataset.h"

#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/formats/token_shard.h"
#include "gtest/gtest.h"
#include "worker/data/dataset.h"

namespace lmps {
namespace {

std::string TmpDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir ? dir : "/tmp";
}

std::string Text(int n) {
  std::string s;
  for (int i = 0; i < n; ++i) s.push_back(static_cast<char>('a' + (i * 7 + i / 26) % 26));
  return s;
}

std::vector<uint16_t> Tokens(const std::string& s, size_t begin, size_t end) {
  std::vector<uint16_t> t;
  for (size_t i = begin; i < end; ++i) t.push_back(static_cast<unsigned char>(s[i]));
  return t;
}

// The same tokens as a TextDataset gives the same batches: the data order
// is the one of dataset.h, whatever the format and however the shards cut
// the splits.
TEST(TokenDatasetTest, SameDataOrderAsByteText) {
  const std::string text = Text(3000);
  auto bytes = TextDataset::FromText(text, 0.1f, 16);
  ASSERT_TRUE(bytes.ok());
  const int64_t split = (*bytes)->train_tokens();
  const std::string dir = TmpDir() + "/order";
  ASSERT_EQ(system(("mkdir -p " + dir).c_str()), 0);
  // Training split in 4 shards (one empty), validation in one.
  const int64_t cuts[] = {0, 700, 700, 1500, split};
  for (int k = 0; k < 4; ++k) {
    ASSERT_TRUE(WriteTokenShard(absl::StrCat(dir, "/train_", k, ".bin"),
                                Tokens(text, cuts[k], cuts[k + 1])).ok());
  }
  ASSERT_TRUE(WriteTokenShard(dir + "/val.bin", Tokens(text, split, text.size())).ok());
  auto tokens = TokenDataset::Create(dir + "/train_*.bin", dir + "/val.bin", 16,
                                     256, nullptr);
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  EXPECT_EQ((*tokens)->train_tokens(), split);
  EXPECT_EQ((*tokens)->val_tokens(), (*bytes)->val_tokens());
  for (Split s : {Split::kTrain, Split::kVal}) {
    for (uint64_t seed : {1u, 1337u}) {
      for (int64_t step : {0, 1, 57}) {
        std::vector<int32_t> x1(6 * 16), y1(6 * 16), x2(6 * 16), y2(6 * 16);
        (*bytes)->Batch(s, seed, step, 12, 3, 6, x1.data(), y1.data());
        (*tokens)->Batch(s, seed, step, 12, 3, 6, x2.data(), y2.data());
        ASSERT_EQ(x1, x2);
        ASSERT_EQ(y1, y2);
      }
    }
  }
  EXPECT_EQ((*tokens)->Token(Split::kTrain, 700), text[700]);
  EXPECT_EQ((*tokens)->Token(Split::kVal, 0), text[split]);
}

TEST(TokenDatasetTest, TokensAboveByteRange) {
  const std::string dir = TmpDir();
  std::vector<uint16_t> train, val;
  for (int i = 0; i < 500; ++i) train.push_back(static_cast<uint16_t>(50000 + i % 257));
  for (int i = 0; i < 100; ++i) val.push_back(static_cast<uint16_t>(i));
  ASSERT_TRUE(WriteTokenShard(dir + "/big_train.bin", train).ok());
  ASSERT_TRUE(WriteTokenShard(dir + "/big_val.bin", val).ok());
  auto ds = TokenDataset::Create(dir + "/big_train.bin", dir + "/big_val.bin", 8,
                                 50257, nullptr);
  ASSERT_TRUE(ds.ok()) << ds.status();
  std::vector<int32_t> x(4 * 8), y(4 * 8);
  (*ds)->Batch(Split::kTrain, 5, 2, 4, 0, 4, x.data(), y.data());
  for (int i = 0; i < 4; ++i) {
    for (int t = 0; t + 1 < 8; ++t) EXPECT_EQ(y[i * 8 + t], x[i * 8 + t + 1]);
  }
  for (int32_t v : x) EXPECT_GE(v, 50000);
  // Without a tokenizer the sample shows ids.
  EXPECT_EQ((*ds)->DecodeSample({50256, 7}), " <50256> <7>");
  EXPECT_EQ((*ds)->SampleVocab(), 0);  // no tokenizer: every id
}

void ExpectError(absl::StatusOr<std::unique_ptr<TokenDataset>> ds,
                 absl::StatusCode code, const std::string& needle) {
  ASSERT_FALSE(ds.ok()) << needle;
  EXPECT_EQ(ds.status().code(), code) << ds.status();
  EXPECT_NE(ds.status().message().find(needle), std::string::npos)
      << ds.status().message() << " lacks " << needle;
}

TEST(TokenDatasetTest, BadShardsAreClearErrors) {
  const std::string dir = TmpDir();
  std::vector<uint16_t> ok(100, 3);
  ASSERT_TRUE(WriteTokenShard(dir + "/ok.bin", ok).ok());
  ExpectError(TokenDataset::Create(dir + "/none_*.bin", dir + "/ok.bin", 8, 256, nullptr),
              absl::StatusCode::kInvalidArgument,
              "data.train_shards '" + dir + "/none_*.bin' matches no file");
  ExpectError(TokenDataset::Create(dir + "/ok.bin", "", 8, 256, nullptr),
              absl::StatusCode::kInvalidArgument, "data.val_shards is empty");
  // Each kind of bad shard, named.
  std::vector<uint16_t> high = ok;
  high[42] = 300;
  ASSERT_TRUE(WriteTokenShard(dir + "/high.bin", high).ok());
  ExpectError(TokenDataset::Create(dir + "/ok.bin", dir + "/high.bin", 8, 256, nullptr),
              absl::StatusCode::kInvalidArgument,
              "token shard '" + dir + "/high.bin': token 300 at index 42 is not below "
              "the model's vocab_size 256");
  {
    std::FILE* f = std::fopen((dir + "/magic.bin").c_str(), "wb");
    int32_t header[256] = {1234, 1, 0};
    std::fwrite(header, sizeof(header), 1, f);
    std::fclose(f);
  }
  ExpectError(TokenDataset::Create(dir + "/magic.bin", dir + "/ok.bin", 8, 256, nullptr),
              absl::StatusCode::kInvalidArgument, "wrong magic 1234");
  {
    std::FILE* f = std::fopen((dir + "/version.bin").c_str(), "wb");
    int32_t header[256] = {20240520, 2, 0};
    std::fwrite(header, sizeof(header), 1, f);
    std::fclose(f);
  }
  ExpectError(TokenDataset::Create(dir + "/version.bin", dir + "/ok.bin", 8, 256, nullptr),
              absl::StatusCode::kInvalidArgument, "version 2, expected 1");
  ASSERT_EQ(system(("head -c 1100 " + dir + "/ok.bin > " + dir + "/cut.bin").c_str()), 0);
  ExpectError(TokenDataset::Create(dir + "/cut.bin", dir + "/ok.bin", 8, 256, nullptr),
              absl::StatusCode::kInvalidArgument, "truncated");
  ExpectError(TokenDataset::Create(dir + "/ok.bin", dir + "/ok.bin", 100, 256, nullptr),
              absl::StatusCode::kInvalidArgument,
              "hold 100 tokens: a split needs at least block_size + 1 = 101");
  ExpectError(TokenDataset::Create(dir + "/ok.bin", dir + "/ok.bin", 8, 70000, nullptr),
              absl::StatusCode::kInvalidArgument, "vocab_size must be in [1, 65536]");
  ExpectError(TokenDataset::Create(dir + "/ok.bin", "/nonexistent/v.bin", 8, 256, nullptr),
              absl::StatusCode::kInvalidArgument, "matches no file");
}

}  // namespace
}  // namespace lmps
