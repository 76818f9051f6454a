// GPT-2's pre-tokenisation: cuts text into the pieces that byte-pair
// encoding (gpt2_bpe.h) then encodes one at a time. The pieces are those
// GPT-2's regular expression
//
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// finds in JavaScript with the `u` flag (npm gpt-3-encoder, Encoder.js),
// matched over Unicode code points of UTF-8 text:
//
// - `\s` is JavaScript's: tab, LF, VT, FF, CR, space, U+00A0, U+1680,
//   U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000, U+FEFF (not
//   U+0085, unlike Python's `regex`).
// - RE2 has no lookahead, so `\s+(?!\S)|\s+` is done by hand: RE2 matches a
//   whole whitespace run; when the run has two or more code points and a
//   non-space follows, its last code point is given back to the next piece
//   (which is how the lookahead's backtracking ends; a lone whitespace code
//   point before a non-space is a piece of its own, as `\s+` makes it).
// - `\p{L}` and `\p{N}` are RE2's tables (Debian 12's libre2-9: Unicode
//   14); a code point assigned later (e.g. CJK Extension H, Unicode 15) is
//   neither here, a letter or number to a newer JavaScript engine.
// - Bytes that are not valid UTF-8 (which no JavaScript string holds) are
//   pieces of one byte each, so any byte string is cut into pieces.
//
// The pieces are consecutive and concatenate to the text.
// tests/bpe_reference_test.sh checks all of this against Encoder.js.
//
// Thread-safety: pure functions (the compiled expression is an immutable
// process-wide singleton).
#ifndef LMPS_COMMON_TEXT_GPT2_PRETOKENIZER_H_
#define LMPS_COMMON_TEXT_GPT2_PRETOKENIZER_H_

#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/strings/string_view.h"

namespace lmps {

// Calls `piece` for every piece of `text`, in order.
void Gpt2PreTokenize(absl::string_view text,
                     absl::FunctionRef<void(absl::string_view)> piece);

// The pieces of `text` (views into it).
std::vector<absl::string_view> Gpt2PreTokenize(absl::string_view text);

// True for the code points of JavaScript's `\s`.
bool IsJsWhitespace(char32_t c);

// The first position p >= from where no piece spans p, found cheaply: a
// space (0x20) right after an ASCII non-space; text.size() if there is none.
// Pieces end there (every alternative holding a non-space stops before a
// space) and the pieces after p depend only on text[p, end) (nothing looks
// behind), so encoding text[0, p) and text[p, end) separately gives the
// tokens of the whole. For cutting large texts into chunks.
size_t Gpt2SafeCut(absl::string_view text, size_t from);

}  // namespace lmps

#endif  // LMPS_COMMON_TEXT_GPT2_PRETOKENIZER_H_
