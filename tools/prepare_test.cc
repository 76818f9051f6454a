#include "tools/prepare.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/formats/token_shard.h"
#include "common/text/gpt2_bpe.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

std::string TmpDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir ? dir : "/tmp";
}

std::string Write(const std::string& name, const std::string& text) {
  const std::string path = TmpDir() + "/" + name;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
  return path;
}

// Byte tokens only (id = byte), then "<|endoftext|>" = 256.
std::unique_ptr<Gpt2Bpe> ByteVocab() {
  std::string json = "{";
  for (int b = 0; b < 256; ++b) {
    const char32_t c = ByteToUnicode(static_cast<uint8_t>(b));
    std::string s;
    if (c == '"' || c == '\\') {
      s = std::string("\\") + static_cast<char>(c);
    } else if (c < 0x80) {
      s = std::string(1, static_cast<char>(c));
    } else {
      s = {static_cast<char>(0xC0 | (c >> 6)), static_cast<char>(0x80 | (c & 0x3F))};
    }
    absl::StrAppend(&json, "\"", s, "\":", b, ",");
  }
  json += "\"<|endoftext|>\":256}";
  auto bpe = Gpt2Bpe::FromStrings(json, "#version: 0.2\n");
  EXPECT_TRUE(bpe.ok()) << bpe.status();
  return bpe.ok() ? std::move(*bpe) : nullptr;
}

std::vector<uint16_t> Read(const std::string& path) {
  auto shard = TokenShard::Open(path, 0);
  EXPECT_TRUE(shard.ok()) << shard.status();
  if (!shard.ok()) return {};
  return std::vector<uint16_t>((*shard)->tokens(), (*shard)->tokens() + (*shard)->size());
}

TEST(PrepareTest, DocumentsAfterEndOfTextThenTheSplit) {
  auto bpe = ByteVocab();
  ASSERT_NE(bpe, nullptr);
  PrepareOptions o;
  o.inputs = {Write("a.txt", "hello"), Write("b.txt", "world!"), Write("empty.txt", "")};
  o.train_out = TmpDir() + "/p_train.bin";
  o.val_out = TmpDir() + "/p_val.bin";
  o.val_fraction = 0.25f;
  int64_t last_done = -1, last_total = -1, last_tokens = -1;
  o.progress = [&](int64_t done, int64_t total, int64_t tokens) {
    EXPECT_GE(done, last_done);
    last_done = done;
    last_total = total;
    last_tokens = tokens;
  };
  absl::StatusOr<PrepareResult> r = PrepareTokenShards(o, *bpe);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->documents, 2);
  EXPECT_EQ(r->bytes, 11);
  // 13 tokens: <eot> h e l l o <eot> w o r l d !; 13 - (int)(13 * 0.25) = 10.
  EXPECT_EQ(r->train_tokens, 10);
  EXPECT_EQ(r->val_tokens, 3);
  EXPECT_EQ(last_done, last_total);
  EXPECT_EQ(last_tokens, 13);
  std::vector<uint16_t> all = Read(o.train_out);
  for (uint16_t t : Read(o.val_out)) all.push_back(t);
  const std::vector<uint16_t> want = {256, 'h', 'e', 'l', 'l', 'o', 256,
                                      'w', 'o', 'r', 'l', 'd', '!'};
  EXPECT_EQ(all, want);
}

TEST(PrepareTest, DocumentDelimiter) {
  auto bpe = ByteVocab();
  ASSERT_NE(bpe, nullptr);
  PrepareOptions o;
  o.inputs = {Write("docs.txt", "ab\n\ncd\n\n\n\nef")};
  o.train_out = TmpDir() + "/d_train.bin";
  o.val_out = TmpDir() + "/d_val.bin";
  o.doc_delimiter = "\n\n";
  o.val_fraction = 0.2f;
  absl::StatusOr<PrepareResult> r = PrepareTokenShards(o, *bpe);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->documents, 3);
  std::vector<uint16_t> all = Read(o.train_out);
  for (uint16_t t : Read(o.val_out)) all.push_back(t);
  EXPECT_EQ(all, (std::vector<uint16_t>{256, 'a', 'b', 256, 'c', 'd', 256, 'e', 'f'}));
}

TEST(PrepareTest, Errors) {
  auto bpe = ByteVocab();
  ASSERT_NE(bpe, nullptr);
  PrepareOptions o;
  o.train_out = TmpDir() + "/e_train.bin";
  o.val_out = TmpDir() + "/e_val.bin";
  o.inputs = {"/nonexistent/text.txt"};
  EXPECT_EQ(PrepareTokenShards(o, *bpe).status().code(), absl::StatusCode::kNotFound);
  o.inputs = {Write("tiny.txt", "x")};
  absl::StatusOr<PrepareResult> tiny = PrepareTokenShards(o, *bpe);
  EXPECT_EQ(tiny.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(tiny.status().message().find("too few"), std::string::npos);
  o.val_fraction = 1.5f;
  EXPECT_EQ(PrepareTokenShards(o, *bpe).status().code(),
            absl::StatusCode::kInvalidArgument);
  o.val_fraction = 0.1f;
  o.train_out = "/nonexistent/dir/train.bin";
  o.inputs = {Write("long.txt", std::string(100, 'z'))};
  EXPECT_FALSE(PrepareTokenShards(o, *bpe).ok());
}

// With GPT-2's vocabulary, where scripts/install_deps.sh installed it.
TEST(PrepareTest, Gpt2Ids) {
  auto bpe = Gpt2Bpe::FromDir(DefaultGpt2VocabDir());
  if (!bpe.ok()) {
    std::printf("LMPS_SKIP(installable): GPT-2's vocabulary: %s\n",
                std::string(bpe.status().message()).c_str());
    GTEST_SKIP();
  }
  PrepareOptions o;
  o.inputs = {Write("hello.txt", "Hello world"), Write("hello2.txt", "Hello world")};
  o.train_out = TmpDir() + "/g_train.bin";
  o.val_out = TmpDir() + "/g_val.bin";
  o.val_fraction = 0.5f;
  ASSERT_TRUE(PrepareTokenShards(o, **bpe).ok());
  EXPECT_EQ(Read(o.train_out), (std::vector<uint16_t>{50256, 15496, 995}));
  EXPECT_EQ(Read(o.val_out), (std::vector<uint16_t>{50256, 15496, 995}));
}

}  // namespace
}  // namespace lmps
