#include "common/text/gpt2_bpe.h"

#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/text/gpt2_test_vocab.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

std::unique_ptr<Gpt2Bpe> Make(const TestVocab& v) {
  absl::StatusOr<std::unique_ptr<Gpt2Bpe>> bpe =
      Gpt2Bpe::FromStrings(v.encoder_json, v.vocab_bpe);
  EXPECT_TRUE(bpe.ok()) << bpe.status();
  return bpe.ok() ? std::move(*bpe) : nullptr;
}

TEST(Gpt2BpeTest, ByteToUnicodeIsGpt2s) {
  EXPECT_EQ(ByteToUnicode('A'), U'A');
  EXPECT_EQ(ByteToUnicode(' '), 0x120u);   // 'Ġ'
  EXPECT_EQ(ByteToUnicode('\n'), 0x10Au);  // 'Ċ'
  EXPECT_EQ(ByteToUnicode(0), 0x100u);
  EXPECT_EQ(ByteToUnicode(0xAD), 0x143u);
  EXPECT_EQ(ByteToUnicode(0xFF), 0xFFu);
}

TEST(Gpt2BpeTest, MergesByRank) {
  // Ids: bytes 0..255, then ab = 256, abc = 257, "Ġa" = 258, aa = 259.
  auto bpe = Make(MakeTestVocab({{"a", "b"}, {"ab", "c"}, {"Ġ", "a"}, {"a", "a"}}));
  ASSERT_NE(bpe, nullptr);
  EXPECT_TRUE(bpe->merges_ordered());
  EXPECT_EQ(bpe->vocab_size(), 260);
  EXPECT_EQ(bpe->eot_token(), -1);
  EXPECT_EQ(bpe->Encode("abc"), (std::vector<int32_t>{257}));
  EXPECT_EQ(bpe->Encode("abd"), (std::vector<int32_t>{256, 'd'}));
  // " ab": (Ġ, a) ranks after (a, b).
  EXPECT_EQ(bpe->Encode(" ab"), (std::vector<int32_t>{' ', 256}));
  // Left to right, without overlap.
  EXPECT_EQ(bpe->Encode("aaa"), (std::vector<int32_t>{259, 'a'}));
  EXPECT_EQ(bpe->Encode("aaaa"), (std::vector<int32_t>{259, 259}));
  EXPECT_EQ(*bpe->Decode(bpe->Encode("aaab abc")), "aaab abc");
}

// The naive loop (encoder.py's) and the fast one agree, and so does an
// unordered vocabulary (which makes Encode use the naive loop).
TEST(Gpt2BpeTest, FastAndNaiveMergeLoopsAgree) {
  auto bpe = Make(MakeTestVocab({{"a", "b"}, {"b", "a"}, {"a", "a"}, {"ab", "a"},
                             {"ba", "b"}, {"aa", "b"}, {"ab", "ab"},
                             {"aab", "a"}, {"b", "b"}, {"bb", "a"}}));
  ASSERT_NE(bpe, nullptr);
  ASSERT_TRUE(bpe->merges_ordered());
  std::mt19937 rng(3);
  for (int trial = 0; trial < 3000; ++trial) {
    std::string piece;
    const int len = 1 + rng() % 30;
    for (int i = 0; i < len; ++i) piece.push_back("aab"[rng() % 3]);
    std::vector<int32_t> fast, naive;
    bpe->MergeFast(piece, &fast);
    bpe->MergeNaive(piece, &naive);
    ASSERT_EQ(fast, naive) << piece;
  }
  // "ab a" is used before it is made: not ordered.
  auto unordered = Make(MakeTestVocab({{"ab", "a"}, {"a", "b"}}));
  ASSERT_NE(unordered, nullptr);
  EXPECT_FALSE(unordered->merges_ordered());
  EXPECT_EQ(unordered->Encode("aba"), (std::vector<int32_t>{256}));
}

TEST(Gpt2BpeTest, AnyBytesRoundTrip) {
  auto bpe = Make(MakeTestVocab({{"Ġ", "t"}, {"h", "e"}, {"Ġt", "he"}}));
  ASSERT_NE(bpe, nullptr);
  std::mt19937 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    std::string s;
    const int len = rng() % 200;
    for (int i = 0; i < len; ++i) s.push_back(static_cast<char>(rng()));
    absl::StatusOr<std::string> back = bpe->Decode(bpe->Encode(s));
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, s);
  }
  EXPECT_EQ(bpe->Encode(" the"), (std::vector<int32_t>{258}));
  EXPECT_EQ(bpe->Decode({-1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bpe->Decode({259}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

void ExpectInvalid(const std::string& json, const std::string& bpe,
                   const std::string& needle) {
  absl::StatusOr<std::unique_ptr<Gpt2Bpe>> r = Gpt2Bpe::FromStrings(json, bpe);
  ASSERT_FALSE(r.ok()) << needle;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find(needle), std::string::npos)
      << r.status().message() << " lacks " << needle;
}

TEST(Gpt2BpeTest, BadFilesAreClearErrors) {
  const TestVocab good = MakeTestVocab({{"a", "b"}});
  ASSERT_TRUE(Gpt2Bpe::FromStrings(good.encoder_json, good.vocab_bpe).ok());
  ExpectInvalid("{\"a\": 0", good.vocab_bpe, "encoder.json: not valid JSON");
  ExpectInvalid("[1, 2]", good.vocab_bpe, "encoder.json: expected a JSON object");
  ExpectInvalid("{\"a\": 5}", good.vocab_bpe, "not an integer in [0, 1)");
  ExpectInvalid("{\"a\": \"x\"}", good.vocab_bpe, "not an integer");
  ExpectInvalid("{\"a\": 0, \"b\": 0}", good.vocab_bpe, "given to two tokens");
  ExpectInvalid("{\"a\": 0, \"\xE6\x97\xA5\": 1}", good.vocab_bpe,
                "not written in GPT-2's byte characters");
  ExpectInvalid("{\"a\": 0}", good.vocab_bpe, "no token for byte 0");
  ExpectInvalid(good.encoder_json, "#version: 0.2\na b c\n",
                "vocab.bpe: line 2: expected two tokens");
  ExpectInvalid(good.encoder_json, "#version: 0.2\nxy c\n",
                "vocab.bpe: line 2: 'xy' is not a token");
  ExpectInvalid(good.encoder_json, "#version: 0.2\nb a\n",
                "'ba' (the merge) is not a token");
  ExpectInvalid(good.encoder_json, "#version: 0.2\na b\na b\n",
                "line 3: the merge of 'a' and 'b' appears twice");

  absl::StatusOr<std::unique_ptr<Gpt2Bpe>> missing =
      Gpt2Bpe::Create("/nonexistent/encoder.json", "/nonexistent/vocab.bpe");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/encoder.json"),
            std::string::npos);
  // A file that exists but is not JSON: the error names the file.
  const std::string tmp = absl::StrCat(
      getenv("TEST_TMPDIR") ? getenv("TEST_TMPDIR") : "/tmp", "/bad.json");
  std::ofstream(tmp) << "not json";
  absl::StatusOr<std::unique_ptr<Gpt2Bpe>> bad =
      Gpt2Bpe::Create(tmp, "/nonexistent/vocab.bpe");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kNotFound);  // vocab.bpe
  const std::string vocab_tmp = tmp + ".bpe";
  std::ofstream(vocab_tmp) << good.vocab_bpe;
  bad = Gpt2Bpe::Create(tmp, vocab_tmp);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find(tmp + ": not valid JSON"),
            std::string::npos)
      << bad.status().message();
}

// GPT-2's own vocabulary, where scripts/install_deps.sh has installed it.
class Gpt2VocabTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<Gpt2Bpe>> bpe =
        Gpt2Bpe::FromDir(DefaultGpt2VocabDir());
    if (bpe.ok()) {
      bpe_ = bpe->release();
    } else {
      std::printf("LMPS_SKIP(installable): GPT-2's vocabulary: %s\n",
                  std::string(bpe.status().message()).c_str());
    }
  }
  void SetUp() override {
    if (bpe_ == nullptr) GTEST_SKIP() << "no GPT-2 vocabulary";
  }
  static Gpt2Bpe* bpe_;
};
Gpt2Bpe* Gpt2VocabTest::bpe_ = nullptr;

TEST_F(Gpt2VocabTest, KnownIds) {
  EXPECT_EQ(bpe_->vocab_size(), 50257);
  EXPECT_EQ(bpe_->eot_token(), 50256);
  EXPECT_TRUE(bpe_->merges_ordered());
  using Ids = std::vector<int32_t>;
  EXPECT_EQ(bpe_->Encode("Hello world"), (Ids{15496, 995}));
  EXPECT_EQ(bpe_->Encode("hello world"), (Ids{31373, 995}));
  EXPECT_EQ(bpe_->Encode(" the"), (Ids{262}));
  EXPECT_EQ(bpe_->Encode("\n"), (Ids{198}));
  // "<|endoftext|>" in a text is ordinary text.
  EXPECT_NE(bpe_->Encode("<|endoftext|>"), (Ids{50256}));
  EXPECT_EQ(*bpe_->Decode({50256}), "<|endoftext|>");
}

TEST_F(Gpt2VocabTest, RoundTripsAndLoopsAgree) {
  std::mt19937 rng(11);
  const std::string parts[] = {
      "The ",      "quick",     " brown",  "   ",      "\n\n",   "1234567",
      "don't",     "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E", "\xF0\x9F\x98\x80",
      "e\xCC\x81", "\xD7\xA9\xD7\x9C\xD7\x95\xD7\x9D", "\t", "{\"a\": [1, 2]},",
      "\xFF\xFE",  "____",     "!!!",      "\xC2\xA0"};
  for (int trial = 0; trial < 300; ++trial) {
    std::string s;
    const int len = rng() % 60;
    for (int i = 0; i < len; ++i) s += parts[rng() % 17];
    const std::vector<int32_t> ids = bpe_->Encode(s);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < 50256);
    absl::StatusOr<std::string> back = bpe_->Decode(ids);
    ASSERT_TRUE(back.ok());
    ASSERT_EQ(*back, s);
    std::vector<int32_t> fast, naive;
    bpe_->MergeFast(s, &fast);
    bpe_->MergeNaive(s, &naive);
    ASSERT_EQ(fast, naive);
  }
  // Long pieces: a digit run and a whitespace run.
  const std::string digits(5000, '7'), spaces(5000, ' ');
  EXPECT_EQ(*bpe_->Decode(bpe_->Encode(digits)), digits);
  EXPECT_EQ(*bpe_->Decode(bpe_->Encode(spaces + "x")), spaces + "x");
}

}  // namespace
}  // namespace lmps
