#include "tools/prepare.h"

#include <sys/stat.h>

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/formats/token_shard.h"
#include "common/text/gpt2_pretokenizer.h"

namespace lmps {
namespace {

// Text is encoded in chunks of about this many bytes, cut where no piece
// spans the cut (Gpt2SafeCut), so the progress moves within a large file.
constexpr size_t kChunkBytes = 1 << 20;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read '", path, "'"));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

}  // namespace

absl::StatusOr<PrepareResult> PrepareTokenShards(const PrepareOptions& options,
                                                 const Gpt2Bpe& bpe) {
  if (!(options.val_fraction > 0 && options.val_fraction < 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "val_fraction must be in (0, 1), got ", options.val_fraction));
  }
  if (bpe.vocab_size() > 65536 || bpe.eot_token() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the tokenizer must have at most 65536 tokens (uint16 shards) and an "
        "end-of-text token; it has ", bpe.vocab_size(), " tokens",
        bpe.eot_token() < 0 ? " and no <|endoftext|>" : ""));
  }
  if (options.inputs.empty()) {
    return absl::InvalidArgumentError("no input files");
  }
  int64_t total = 0;
  for (const std::string& path : options.inputs) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) {
      return absl::NotFoundError(absl::StrCat("cannot read '", path, "'"));
    }
    total += static_cast<int64_t>(st.st_size);
  }

  PrepareResult result;
  std::vector<uint16_t> tokens;
  std::vector<int32_t> chunk_ids;
  auto encode_document = [&](absl::string_view doc) {
    ++result.documents;
    tokens.push_back(static_cast<uint16_t>(bpe.eot_token()));
    for (size_t start = 0; start < doc.size();) {
      const size_t cut = Gpt2SafeCut(doc, start + kChunkBytes);
      chunk_ids.clear();
      bpe.EncodeAppend(doc.substr(start, cut - start), &chunk_ids);
      for (int32_t id : chunk_ids) tokens.push_back(static_cast<uint16_t>(id));
      result.bytes += static_cast<int64_t>(cut - start);
      start = cut;
      if (options.progress) {
        options.progress(result.bytes, total,
                         static_cast<int64_t>(tokens.size()));
      }
    }
  };
  for (const std::string& path : options.inputs) {
    absl::StatusOr<std::string> text = ReadFile(path);
    if (!text.ok()) return text.status();
    if (options.doc_delimiter.empty()) {
      if (!text->empty()) encode_document(*text);
      continue;
    }
    for (absl::string_view doc :
         absl::StrSplit(*text, options.doc_delimiter, absl::SkipEmpty())) {
      encode_document(doc);
    }
  }
  // Delimiters are not encoded: the end counts them as done.
  if (options.progress) {
    options.progress(total, total, static_cast<int64_t>(tokens.size()));
  }

  const auto n = static_cast<int64_t>(tokens.size());
  const int64_t split = n - static_cast<int64_t>(n * options.val_fraction);
  if (split <= 0 || split >= n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the text has ", n, " tokens: too few for a training and a "
        "validation split with val_fraction ", options.val_fraction));
  }
  absl::Span<const uint16_t> all(tokens);
  if (absl::Status s = WriteTokenShard(options.train_out, all.subspan(0, split));
      !s.ok()) {
    return s;
  }
  if (absl::Status s = WriteTokenShard(options.val_out, all.subspan(split));
      !s.ok()) {
    return s;
  }
  result.train_tokens = split;
  result.val_tokens = n - split;
  return result;
}

}  // namespace lmps
