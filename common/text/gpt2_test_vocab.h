// Synthetic GPT-2 vocabularies for tests (testonly): the files' contents in
// GPT-2's format, with the 256 byte tokens (id = byte), then the results of
// the given merges, then any extra tokens.
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_TEXT_GPT2_TEST_VOCAB_H_
#define LMPS_COMMON_TEXT_GPT2_TEST_VOCAB_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/text/gpt2_bpe.h"

namespace lmps {

// UTF-8 of a code point below U+0800 (all ByteToUnicode gives).
inline std::string Utf8(char32_t c) {
  std::string s;
  if (c < 0x80) {
    s.push_back(static_cast<char>(c));
  } else {
    s.push_back(static_cast<char>(0xC0 | (c >> 6)));
    s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
  return s;
}

struct TestVocab {
  std::string encoder_json;  // encoder.json
  std::string vocab_bpe;     // vocab.bpe
};

// `merges` are "a b" pairs written in GPT-2's byte characters, each
// merge's result a new token; `extra` tokens (e.g. "<|endoftext|>", written
// in printable ASCII) come last, with no merge.
inline TestVocab MakeTestVocab(
    const std::vector<std::pair<std::string, std::string>>& merges,
    const std::vector<std::string>& extra = {}) {
  std::string json = "{";
  int next_id = 0;
  for (int b = 0; b < 256; ++b) {
    absl::StrAppend(&json, next_id ? "," : "", "\"",
                    b == '"'    ? "\\\""
                    : b == '\\' ? "\\\\"
                                : Utf8(ByteToUnicode(b)),
                    "\":", next_id);
    ++next_id;
  }
  std::string bpe = "#version: 0.2\n";
  for (const auto& [a, b] : merges) {
    absl::StrAppend(&json, ",\"", a, b, "\":", next_id++);
    absl::StrAppend(&bpe, a, " ", b, "\n");
  }
  for (const std::string& token : extra) {
    absl::StrAppend(&json, ",\"", token, "\":", next_id++);
  }
  json += "}";
  return {json, bpe};
}

}  // namespace lmps

#endif  // LMPS_COMMON_TEXT_GPT2_TEST_VOCAB_H_
