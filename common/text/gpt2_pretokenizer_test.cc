#include "common/text/gpt2_pretokenizer.h"

#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

std::vector<std::string> Pieces(const std::string& text) {
  std::vector<std::string> out;
  for (absl::string_view p : Gpt2PreTokenize(text)) out.emplace_back(p);
  return out;
}

using V = std::vector<std::string>;

TEST(Gpt2PreTokenizerTest, WordsNumbersPunctuation) {
  EXPECT_EQ(Pieces("Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(Pieces("x!!! y 123abc 4.5"),
            (V{"x", "!!!", " y", " 123", "abc", " 4", ".", "5"}));
  EXPECT_EQ(Pieces(" ,;"), (V{" ,;"}));
  EXPECT_EQ(Pieces(""), V{});
}

TEST(Gpt2PreTokenizerTest, Contractions) {
  EXPECT_EQ(Pieces("it's they're we've I'm you'll he'd don't"),
            (V{"it", "'s", " they", "'re", " we", "'ve", " I", "'m", " you",
               "'ll", " he", "'d", " don", "'t"}));
  // Case-sensitive, ASCII apostrophe only.
  EXPECT_EQ(Pieces("IT'S"), (V{"IT", "'", "S"}));
  EXPECT_EQ(Pieces("it\xE2\x80\x99s"), (V{"it", "\xE2\x80\x99", "s"}));
}

// `\s+(?!\S)|\s+`: a run followed by a non-space gives back its last code
// point.
TEST(Gpt2PreTokenizerTest, WhitespaceRunsGiveBackTheirLastCodePoint) {
  EXPECT_EQ(Pieces("a   b"), (V{"a", "  ", " b"}));
  EXPECT_EQ(Pieces("a b"), (V{"a", " b"}));
  EXPECT_EQ(Pieces("  hello"), (V{" ", " hello"}));
  EXPECT_EQ(Pieces("a\n\nb"), (V{"a", "\n", "\n", "b"}));
  EXPECT_EQ(Pieces("a\tb"), (V{"a", "\t", "b"}));
  EXPECT_EQ(Pieces("a \t\n b"), (V{"a", " \t\n", " b"}));
  EXPECT_EQ(Pieces("end   "), (V{"end", "   "}));
  EXPECT_EQ(Pieces("   "), (V{"   "}));
  EXPECT_EQ(Pieces("a\n\n  !"), (V{"a", "\n\n ", " !"}));
  // Multi-byte whitespace: NBSP and the ideographic space.
  EXPECT_EQ(Pieces("a\xC2\xA0\xC2\xA0" "b"),
            (V{"a", "\xC2\xA0", "\xC2\xA0", "b"}));
  EXPECT_EQ(Pieces("a \xE3\x80\x80x"), (V{"a", " ", "\xE3\x80\x80", "x"}));
}

TEST(Gpt2PreTokenizerTest, JavaScriptWhitespaceOnly) {
  // U+0085 (NEL) is not in JavaScript's \s: punctuation here.
  EXPECT_EQ(Pieces("a\xC2\x85" "b"), (V{"a", "\xC2\x85", "b"}));
  // Vertical tab and U+FEFF are.
  EXPECT_EQ(Pieces("a\x0B\x0B" "b"), (V{"a", "\x0B", "\x0B", "b"}));
  EXPECT_EQ(Pieces("a\xEF\xBB\xBF"), (V{"a", "\xEF\xBB\xBF"}));
  EXPECT_TRUE(IsJsWhitespace(0x3000));
  EXPECT_FALSE(IsJsWhitespace(0x85));
}

TEST(Gpt2PreTokenizerTest, UnicodeLettersAndNumbers) {
  // CJK and accented letters are \p{L}; Arabic-Indic digits \p{N}; an emoji
  // is neither.
  EXPECT_EQ(Pieces("\xE6\x97\xA5\xE6\x9C\xAC caf\xC3\xA9"),
            (V{"\xE6\x97\xA5\xE6\x9C\xAC", " caf\xC3\xA9"}));
  EXPECT_EQ(Pieces(" \xD9\xA1\xD9\xA2"), (V{" \xD9\xA1\xD9\xA2"}));
  EXPECT_EQ(Pieces("hi \xF0\x9F\x98\x80!"), (V{"hi", " \xF0\x9F\x98\x80!"}));
  // A combining mark (U+0301) is \p{M}: not a letter.
  EXPECT_EQ(Pieces("e\xCC\x81t"), (V{"e", "\xCC\x81", "t"}));
}

TEST(Gpt2PreTokenizerTest, InvalidUtf8BytesArePiecesOfTheirOwn) {
  EXPECT_EQ(Pieces("a\xFF" "b"), (V{"a", "\xFF", "b"}));
  EXPECT_EQ(Pieces("\xE6\x97"), (V{"\xE6", "\x97"}));
}

TEST(Gpt2PreTokenizerTest, PiecesConcatenateToAnyByteString) {
  std::mt19937 rng(7);
  const std::string alphabet[] = {"a", "Z", " ", "  ", "\n", "\t", "1", "'s",
                                  "'", "!", "\xC2\xA0", "\xE6\x97\xA5",
                                  "\xF0\x9F\x98\x80", "\xCC\x81", "\xFF", "\x80"};
  for (int trial = 0; trial < 500; ++trial) {
    std::string text;
    const int len = rng() % 40;
    for (int i = 0; i < len; ++i) text += alphabet[rng() % 16];
    std::string joined;
    for (absl::string_view p : Gpt2PreTokenize(text)) {
      ASSERT_FALSE(p.empty());
      joined.append(p.data(), p.size());
    }
    EXPECT_EQ(joined, text);
  }
}

TEST(Gpt2PreTokenizerTest, SafeCutsSplitNoPiece) {
  EXPECT_EQ(Gpt2SafeCut("ab  cd ef", 0), 2u);
  EXPECT_EQ(Gpt2SafeCut("ab  cd ef", 3), 6u);
  EXPECT_EQ(Gpt2SafeCut("ab  cd ef", 7), 9u);
  EXPECT_EQ(Gpt2SafeCut(" x", 0), 2u);
  std::mt19937 rng(9);
  const std::string alphabet[] = {"a", " ", " ", "\n", "1", "'s", "!",
                                  "\xC2\xA0", "\xE6\x97\xA5", "\xFF"};
  for (int trial = 0; trial < 500; ++trial) {
    std::string text;
    const int len = rng() % 60;
    for (int i = 0; i < len; ++i) text += alphabet[rng() % 10];
    std::vector<absl::string_view> whole = Gpt2PreTokenize(text);
    std::vector<absl::string_view> chunked;
    for (size_t start = 0; start < text.size();) {
      const size_t cut = Gpt2SafeCut(text, start + rng() % 8);
      for (absl::string_view p :
           Gpt2PreTokenize(absl::string_view(text).substr(start, cut - start))) {
        chunked.push_back(p);
      }
      start = cut;
    }
    ASSERT_EQ(chunked, whole) << text;
  }
}

}  // namespace
}  // namespace lmps
