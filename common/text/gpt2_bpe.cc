#include "common/text/gpt2_bpe.h"

#include <algorithm>
#include <climits>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/text/gpt2_pretokenizer.h"
#include "nlohmann/json.hpp"

namespace lmps {
namespace {

// Entries at which the cache starts again from empty.
constexpr size_t kMaxCacheEntries = 1 << 18;

void AppendUtf8(char32_t c, std::string* out) {
  if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

// The bytes a vocabulary string stands for: each of its code points must be
// one of ByteToUnicode's. False if not (or if it is not UTF-8 of those).
bool VocabStringToBytes(absl::string_view s, std::string* bytes) {
  // ByteToUnicode's code points are < 0x144: one or two UTF-8 bytes.
  static const auto* const inverse = [] {
    auto* inv = new std::vector<int>(0x144, -1);
    for (int b = 0; b < 256; ++b) (*inv)[ByteToUnicode(b)] = b;
    return inv;
  }();
  bytes->clear();
  for (size_t i = 0; i < s.size();) {
    const auto c0 = static_cast<unsigned char>(s[i]);
    char32_t c;
    if (c0 < 0x80) {
      c = c0;
      i += 1;
    } else if ((c0 & 0xE0) == 0xC0 && i + 1 < s.size() &&
               (static_cast<unsigned char>(s[i + 1]) & 0xC0) == 0x80) {
      c = ((c0 & 0x1F) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3F);
      i += 2;
    } else {
      return false;
    }
    if (c >= inverse->size() || (*inverse)[c] < 0) return false;
    bytes->push_back(static_cast<char>((*inverse)[c]));
  }
  return true;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat(
        "cannot read '", path, "' (GPT-2's vocabulary: scripts/install_deps.sh "
        "installs it in ", DefaultGpt2VocabDir(), ")"));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// Printable form of a vocabulary string for messages.
std::string Quote(absl::string_view s) { return absl::StrCat("'", s, "'"); }

}  // namespace

std::string DefaultGpt2VocabDir() {
  return absl::StrCat(kGpt2InstallDir, "/", kGpt2PackageSubdir);
}

char32_t ByteToUnicode(uint8_t b) {
  // Printable Latin-1 stands for itself; the other 68 bytes, in order, for
  // U+0100 onwards.
  static const auto* const table = [] {
    auto* t = new std::vector<char32_t>(256);
    int n = 0;
    for (int c = 0; c < 256; ++c) {
      const bool printable = (c >= '!' && c <= '~') ||
                             (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE);
      (*t)[c] = printable ? c : 256 + n++;
    }
    return t;
  }();
  return (*table)[b];
}

absl::StatusOr<std::unique_ptr<Gpt2Bpe>> Gpt2Bpe::Create(
    const std::string& encoder_json_path, const std::string& vocab_bpe_path) {
  absl::StatusOr<std::string> encoder = ReadFile(encoder_json_path);
  if (!encoder.ok()) return encoder.status();
  absl::StatusOr<std::string> vocab = ReadFile(vocab_bpe_path);
  if (!vocab.ok()) return vocab.status();
  return FromStrings(*encoder, *vocab, encoder_json_path, vocab_bpe_path);
}

absl::StatusOr<std::unique_ptr<Gpt2Bpe>> Gpt2Bpe::FromDir(
    const std::string& dir) {
  return Create(dir + "/encoder.json", dir + "/vocab.bpe");
}

absl::StatusOr<std::unique_ptr<Gpt2Bpe>> Gpt2Bpe::FromStrings(
    absl::string_view encoder_json, absl::string_view vocab_bpe,
    absl::string_view encoder_name, absl::string_view vocab_name) {
  auto invalid = [](absl::string_view file, auto&&... what) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": ", what...));
  };
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(encoder_json.begin(), encoder_json.end());
  } catch (const nlohmann::json::exception& e) {
    return invalid(encoder_name, "not valid JSON: ", e.what());
  }
  if (!json.is_object() || json.empty()) {
    return invalid(encoder_name,
                   "expected a JSON object of token string -> id");
  }
  std::unique_ptr<Gpt2Bpe> bpe(new Gpt2Bpe());
  const size_t n = json.size();
  bpe->token_bytes_.resize(n);
  std::vector<bool> seen(n, false);
  absl::flat_hash_map<std::string, int32_t> id_of;  // vocabulary string -> id
  id_of.reserve(n);
  std::string bytes;
  for (const auto& [key, value] : json.items()) {
    if (!value.is_number_integer() || value.get<int64_t>() < 0 ||
        value.get<int64_t>() >= static_cast<int64_t>(n)) {
      return invalid(encoder_name, "the id of ", Quote(key), " is ",
                     value.dump(), ", not an integer in [0, ", n, ")");
    }
    const auto id = static_cast<int32_t>(value.get<int64_t>());
    if (seen[id]) {
      return invalid(encoder_name, "id ", id, " is given to two tokens");
    }
    seen[id] = true;
    if (!VocabStringToBytes(key, &bytes)) {
      return invalid(encoder_name, "token ", Quote(key),
                     " is not written in GPT-2's byte characters");
    }
    bpe->token_bytes_[id] = bytes;
    id_of[key] = id;
    if (key == "<|endoftext|>") bpe->eot_ = id;
  }
  for (int b = 0; b < 256; ++b) {
    std::string s;
    AppendUtf8(ByteToUnicode(b), &s);
    auto it = id_of.find(s);
    if (it == id_of.end()) {
      return invalid(encoder_name, "no token for byte ", b, " (", Quote(s),
                     ")");
    }
    bpe->byte_token_[b] = it->second;
  }

  // vocab.bpe: "#version: ..." first, then one merge "a b" per line, by rank.
  std::vector<int32_t> made_by(n, -1);  // id -> rank of the merge making it
  std::vector<std::pair<int32_t, int32_t>> pairs;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(vocab_bpe, '\n')) {
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty() || (line_no == 1 && absl::StartsWith(line, "#"))) {
      continue;
    }
    std::vector<absl::string_view> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (parts.size() != 2) {
      return invalid(vocab_name, "line ", line_no, ": expected two tokens, got ",
                     Quote(line));
    }
    int32_t ids[3];
    const std::string merged = absl::StrCat(parts[0], parts[1]);
    const absl::string_view names[3] = {parts[0], parts[1], merged};
    for (int k = 0; k < 3; ++k) {
      auto it = id_of.find(names[k]);
      if (it == id_of.end()) {
        return invalid(vocab_name, "line ", line_no, ": ", Quote(names[k]),
                       k < 2 ? " is not a token of " : " (the merge) is not a token of ",
                       encoder_name);
      }
      ids[k] = it->second;
    }
    const auto rank = static_cast<int32_t>(pairs.size());
    const uint64_t key =
        (static_cast<uint64_t>(ids[0]) << 32) | static_cast<uint32_t>(ids[1]);
    if (!bpe->merges_.emplace(key, Merge{rank, ids[2]}).second) {
      return invalid(vocab_name, "line ", line_no, ": the merge of ",
                     Quote(parts[0]), " and ", Quote(parts[1]),
                     " appears twice");
    }
    pairs.emplace_back(ids[0], ids[1]);
    made_by[ids[2]] = std::max(made_by[ids[2]], rank);
  }
  // Ordered: every merge's parts are bytes or made by earlier merges only.
  bpe->ordered_ = true;
  for (size_t r = 0; r < pairs.size() && bpe->ordered_; ++r) {
    if (made_by[pairs[r].first] >= static_cast<int32_t>(r) ||
        made_by[pairs[r].second] >= static_cast<int32_t>(r)) {
      bpe->ordered_ = false;
    }
  }
  return bpe;
}

std::vector<int32_t> Gpt2Bpe::Encode(absl::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 1);
  EncodeAppend(text, &out);
  return out;
}

void Gpt2Bpe::EncodeAppend(absl::string_view text,
                           std::vector<int32_t>* out) const {
  Gpt2PreTokenize(text,
                  [&](absl::string_view piece) { EncodePiece(piece, out); });
}

void Gpt2Bpe::EncodePiece(absl::string_view piece,
                          std::vector<int32_t>* out) const {
  if (piece.size() == 1) {
    out->push_back(byte_token_[static_cast<unsigned char>(piece[0])]);
    return;
  }
  const bool cached = piece.size() <= kMaxCachedPiece;
  if (cached) {
    absl::MutexLock lock(&mu_);
    auto it = cache_.find(piece);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = out->size();
  if (ordered_) {
    MergeFast(piece, out);
  } else {
    MergeNaive(piece, out);
  }
  if (cached) {
    absl::MutexLock lock(&mu_);
    if (cache_.size() >= kMaxCacheEntries) cache_.clear();
    cache_.emplace(std::string(piece),
                   std::vector<int32_t>(out->begin() + first, out->end()));
  }
}

void Gpt2Bpe::MergeNaive(absl::string_view piece,
                         std::vector<int32_t>* out) const {
  // encoder.py's bpe(): merge every occurrence of the lowest-ranked pair,
  // left to right, until no pair is a merge.
  std::vector<int32_t> word(piece.size()), next;
  for (size_t i = 0; i < piece.size(); ++i) {
    word[i] = byte_token_[static_cast<unsigned char>(piece[i])];
  }
  while (word.size() > 1) {
    const Merge* best = nullptr;
    int32_t a = 0, b = 0;
    for (size_t i = 0; i + 1 < word.size(); ++i) {
      const Merge* m = FindMerge(word[i], word[i + 1]);
      if (m != nullptr && (best == nullptr || m->rank < best->rank)) {
        best = m;
        a = word[i];
        b = word[i + 1];
      }
    }
    if (best == nullptr) break;
    next.clear();
    for (size_t i = 0; i < word.size();) {
      if (i + 1 < word.size() && word[i] == a && word[i + 1] == b) {
        next.push_back(best->result);
        i += 2;
      } else {
        next.push_back(word[i]);
        i += 1;
      }
    }
    word.swap(next);
  }
  out->insert(out->end(), word.begin(), word.end());
}

void Gpt2Bpe::MergeFast(absl::string_view piece,
                        std::vector<int32_t>* out) const {
  // The symbols as a linked list over their first byte's position; a heap
  // of candidate merges ordered by (rank, position). An entry is stale once
  // its left symbol or that symbol's right neighbour has changed. Because
  // the merges are ordered (merges_ordered()), a merge only creates pairs of
  // higher rank than its own, so this merges exactly what the naive loop
  // does: all occurrences of the lowest rank, left to right, then the next.
  const int n = static_cast<int>(piece.size());
  if (n == 0) return;
  struct Candidate {
    int32_t rank, pos, left, right, result;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::vector<int32_t> id(n), prev(n), next(n);
  std::vector<Candidate> heap;
  heap.reserve(n);
  for (int i = 0; i < n; ++i) {
    id[i] = byte_token_[static_cast<unsigned char>(piece[i])];
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  auto consider = [&](int p) {
    if (p < 0 || next[p] < 0) return;
    if (const Merge* m = FindMerge(id[p], id[next[p]])) {
      heap.push_back({m->rank, p, id[p], id[next[p]], m->result});
      std::push_heap(heap.begin(), heap.end(), std::greater<Candidate>());
    }
  };
  for (int i = 0; i + 1 < n; ++i) consider(i);
  std::vector<bool> dead(n, false);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<Candidate>());
    const Candidate c = heap.back();
    heap.pop_back();
    const int p = c.pos;
    if (dead[p] || id[p] != c.left) continue;
    const int q = next[p];
    if (q < 0 || id[q] != c.right) continue;
    id[p] = c.result;
    dead[q] = true;
    next[p] = next[q];
    if (next[q] >= 0) prev[next[q]] = p;
    consider(prev[p]);
    consider(p);
  }
  for (int i = 0; i >= 0; i = next[i]) out->push_back(id[i]);
}

absl::StatusOr<std::string> Gpt2Bpe::Decode(
    absl::Span<const int32_t> ids) const {
  std::string out;
  out.reserve(ids.size() * 4);
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ", ids[i], " (at ", i,
                       ") is not in the vocabulary of ", vocab_size()));
    }
    out += token_bytes_[ids[i]];
  }
  return out;
}

}  // namespace lmps
