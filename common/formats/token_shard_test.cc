#include "common/formats/token_shard.h"

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

std::string TmpPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return absl::StrCat(dir ? dir : "/tmp", "/", name);
}

// A shard's bytes: header ints (the rest zero), then raw tokens.
void WriteRaw(const std::string& path, std::vector<int32_t> header,
              const std::vector<uint16_t>& tokens, int extra_bytes = 0) {
  header.resize(256, 0);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(header.data()), 1024);
  f.write(reinterpret_cast<const char*>(tokens.data()),
          static_cast<std::streamsize>(tokens.size() * 2));
  for (int i = 0; i < extra_bytes; ++i) f.put('\0');
}

void ExpectInvalid(const std::string& path, int vocab, const std::string& needle) {
  absl::StatusOr<std::unique_ptr<TokenShard>> s = TokenShard::Open(path, vocab);
  ASSERT_FALSE(s.ok()) << needle;
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find(needle), std::string::npos)
      << s.status().message();
  EXPECT_NE(s.status().message().find(path), std::string::npos);
}

TEST(TokenShardTest, WriteThenReadBack) {
  const std::string path = TmpPath("ok.bin");
  std::vector<uint16_t> tokens = {50256, 15496, 995, 0, 65535};
  ASSERT_TRUE(WriteTokenShard(path, tokens).ok());
  // llm.c's header, byte for byte.
  std::ifstream f(path, std::ios::binary);
  int32_t header[256];
  f.read(reinterpret_cast<char*>(header), sizeof(header));
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], 5);
  EXPECT_EQ(header[255], 0);
  absl::StatusOr<std::unique_ptr<TokenShard>> shard = TokenShard::Open(path, 0);
  ASSERT_TRUE(shard.ok()) << shard.status();
  ASSERT_EQ((*shard)->size(), 5);
  EXPECT_EQ(std::vector<uint16_t>((*shard)->tokens(), (*shard)->tokens() + 5),
            tokens);
  EXPECT_TRUE(TokenShard::Open(path, 65536).ok());
  EXPECT_FALSE(std::ifstream(path + ".tmp").good());
}

TEST(TokenShardTest, EmptyShardAndAppendInPieces) {
  const std::string path = TmpPath("pieces.bin");
  auto w = TokenShardWriter::Create(path);
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Append({}).ok());
  ASSERT_TRUE((*w)->Append({1, 2}).ok());
  ASSERT_TRUE((*w)->Append({3}).ok());
  EXPECT_EQ((*w)->tokens(), 3);
  // Not there until Close.
  EXPECT_FALSE(std::ifstream(path).good());
  ASSERT_TRUE((*w)->Close().ok());
  EXPECT_EQ((*w)->Close().code(), absl::StatusCode::kFailedPrecondition);
  auto shard = TokenShard::Open(path, 4);
  ASSERT_TRUE(shard.ok());
  EXPECT_EQ((*shard)->size(), 3);
  EXPECT_EQ((*shard)->tokens()[2], 3);

  ASSERT_TRUE(WriteTokenShard(TmpPath("empty.bin"), {}).ok());
  auto empty = TokenShard::Open(TmpPath("empty.bin"), 10);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ((*empty)->size(), 0);
}

TEST(TokenShardTest, UnclosedWriterLeavesNothing) {
  const std::string path = TmpPath("abandoned.bin");
  {
    auto w = TokenShardWriter::Create(path);
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->Append({1, 2, 3}).ok());
  }
  EXPECT_FALSE(std::ifstream(path).good());
  EXPECT_FALSE(std::ifstream(path + ".tmp").good());
}

TEST(TokenShardTest, WrongMagic) {
  const std::string path = TmpPath("magic.bin");
  WriteRaw(path, {20240519, 1, 2}, {1, 2});
  ExpectInvalid(path, 0, "wrong magic 20240519, expected 20240520");
}

TEST(TokenShardTest, WrongVersion) {
  const std::string path = TmpPath("version.bin");
  WriteRaw(path, {20240520, 2, 2}, {1, 2});
  ExpectInvalid(path, 0, "version 2, expected 1");
}

TEST(TokenShardTest, TruncatedOrCountMismatch) {
  const std::string path = TmpPath("truncated.bin");
  WriteRaw(path, {20240520, 1, 3}, {1, 2});
  ExpectInvalid(path, 0, "counts 3 tokens (1030 bytes) but the file has 1028 bytes: truncated");
  WriteRaw(path, {20240520, 1, 2}, {1, 2}, /*extra_bytes=*/1);
  ExpectInvalid(path, 0, "bytes after the tokens");
  WriteRaw(path, {20240520, 1, -1}, {});
  ExpectInvalid(path, 0, "negative token count -1");
  std::ofstream(path, std::ios::trunc) << "short";
  ExpectInvalid(path, 0, "shorter than the 1024-byte header");
}

TEST(TokenShardTest, TokenOutsideTheVocabulary) {
  const std::string path = TmpPath("vocab.bin");
  ASSERT_TRUE(WriteTokenShard(path, {5, 50256, 50257, 3}).ok());
  EXPECT_TRUE(TokenShard::Open(path, 50304).ok());
  ExpectInvalid(path, 50257, "token 50257 at index 2 is not below the model's vocab_size 50257");
  ExpectInvalid(path, 256, "token 50256 at index 1");
}

// nanoGPT's train.bin: the tokens alone.
TEST(TokenShardTest, RawNanoGptTokens) {
  const std::string path = TmpPath("raw.bin");
  const std::vector<uint16_t> tokens = {15496, 995, 50256, 0, 7};
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(tokens.data()), 10);
  }
  auto shard = TokenShard::Open(path, 50257, TokenShardLayout::kRaw);
  ASSERT_TRUE(shard.ok()) << shard.status();
  ASSERT_EQ((*shard)->size(), 5);
  EXPECT_EQ(std::vector<uint16_t>((*shard)->tokens(), (*shard)->tokens() + 5),
            tokens);
  // The same file is not an llm.c shard (no header).
  EXPECT_FALSE(TokenShard::Open(path, 50257).ok());
  auto raw_invalid = [](const std::string& p, int vocab,
                        const std::string& needle) {
    auto s = TokenShard::Open(p, vocab, TokenShardLayout::kRaw);
    ASSERT_FALSE(s.ok()) << needle;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.status().message().find(needle), std::string::npos)
        << s.status().message();
    EXPECT_NE(s.status().message().find("nanoGPT"), std::string::npos);
  };
  raw_invalid(path, 50000, "token 50256 at index 2");
  {
    std::ofstream f(path, std::ios::binary | std::ios::app);
    f.put('\1');
  }
  raw_invalid(path, 50257, "11 bytes, an odd number");
  { std::ofstream f(path, std::ios::binary | std::ios::trunc); }
  raw_invalid(path, 50257, "empty file");
}

TEST(TokenShardTest, MissingFile) {
  auto s = TokenShard::Open("/nonexistent/x.bin", 10);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.status().message().find("/nonexistent/x.bin"), std::string::npos);
  EXPECT_EQ(TokenShardWriter::Create("/nonexistent/x.bin").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lmps
