#include "common/text/gpt2_pretokenizer.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "re2/re2.h"

namespace lmps {
namespace {

// JavaScript's \s (WhiteSpace and LineTerminator), as an RE2 class body.
#define LMPS_JS_SPACE                                              \
  "\\t\\n\\x0B\\f\\r \\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}" \
  "\\x{2029}\\x{202F}\\x{205F}\\x{3000}\\x{FEFF}"

// GPT-2's expression with `\s+(?!\S)|\s+` replaced by one whitespace run;
// the lookahead is applied by hand in Gpt2PreTokenize.
constexpr char kPattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\pL+| ?\\pN+| ?[^" LMPS_JS_SPACE
    "\\pL\\pN]+|[" LMPS_JS_SPACE "]+";

const RE2& Expression() {
  static const RE2* const re = [] {
    RE2::Options options;  // UTF-8, leftmost-first (Perl) alternation
    options.set_log_errors(false);
    auto* r = new RE2(kPattern, options);
    if (!r->ok()) {
      // A constant pattern: only a broken RE2 build gets here.
      std::fprintf(stderr, "gpt2_pretokenizer: RE2 rejects the pattern: %s\n",
                   r->error().c_str());
      std::abort();
    }
    return r;
  }();
  return *re;
}

// Start of the last UTF-8 code point of s[begin, end) (begin < end).
size_t LastCodePointStart(absl::string_view s, size_t begin, size_t end) {
  size_t i = end - 1;
  while (i > begin && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

// The code point of the valid UTF-8 sequence s[begin, end).
char32_t DecodeUtf8(absl::string_view s, size_t begin, size_t end) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  const size_t n = end - begin;
  if (n == 1) return byte(begin);
  char32_t c = byte(begin) & (0x7F >> n);
  for (size_t i = begin + 1; i < end; ++i) c = (c << 6) | (byte(i) & 0x3F);
  return c;
}

}  // namespace

bool IsJsWhitespace(char32_t c) {
  return c == '\t' || c == '\n' || c == 0x0B || c == '\f' || c == '\r' ||
         c == ' ' || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000 || c == 0xFEFF;
}

size_t Gpt2SafeCut(absl::string_view text, size_t from) {
  for (size_t p = std::max<size_t>(from, 1); p < text.size(); ++p) {
    if (text[p] != ' ') continue;
    const auto prev = static_cast<unsigned char>(text[p - 1]);
    if (prev < 0x80 && !IsJsWhitespace(prev)) return p;
  }
  return text.size();
}

void Gpt2PreTokenize(absl::string_view text,
                     absl::FunctionRef<void(absl::string_view)> piece) {
  const RE2& re = Expression();
  const re2::StringPiece input(text.data(), text.size());
  re2::StringPiece match;
  const size_t n = text.size();
  size_t pos = 0;
  while (pos < n) {
    // Only the whole match: asking RE2 for a group costs a slower engine.
    if (!re.Match(input, pos, n, RE2::ANCHOR_START, &match, 1)) {
      // Not valid UTF-8 here: a piece of one byte.
      piece(text.substr(pos, 1));
      ++pos;
      continue;
    }
    size_t len = match.size();
    if (pos + len < n) {
      // Every alternative but the whitespace run ends in a non-space. A run
      // is maximal (a non-space follows): `\s+(?!\S)` takes all of it but
      // its last code point; if that leaves nothing, `\s+` takes the one
      // code point.
      const size_t last = LastCodePointStart(text, pos, pos + len);
      if (last > pos && IsJsWhitespace(DecodeUtf8(text, last, pos + len))) {
        len = last - pos;
      }
    }
    piece(text.substr(pos, len));
    pos += len;
  }
}

std::vector<absl::string_view> Gpt2PreTokenize(absl::string_view text) {
  std::vector<absl::string_view> pieces;
  Gpt2PreTokenize(text, [&](absl::string_view p) { pieces.push_back(p); });
  return pieces;
}

}  // namespace lmps
