// Text files -> token shards (common/formats/token_shard.h) for the
// TOKEN_SHARDS data format: what lmps_prepare does.
//
// Every input file is a document, or, with a delimiter, every non-empty
// part of a file between delimiters. Each document is tokenized with GPT-2's
// BPE (common/text/gpt2_bpe.h) and preceded by the end-of-text token (50256),
// as llm.c's data scripts do, so one stands between every two documents.
// Of the n tokens of all documents in order, the first
// n - (int64)(n * val_fraction) go to the training shard, the rest to the
// validation shard (the split of byte-level text; val_fraction is a float).
// All tokens are held in memory (2 bytes each) until written.
//
// Thread-safety: PrepareTokenShards is a pure function of its arguments and
// the files it reads and writes.
#ifndef LMPS_TOOLS_PREPARE_H_
#define LMPS_TOOLS_PREPARE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/text/gpt2_bpe.h"

namespace lmps {

struct PrepareOptions {
  std::vector<std::string> inputs;  // text files
  std::string train_out;            // training shard to write
  std::string val_out;              // validation shard to write
  float val_fraction = 0.1f;        // in (0, 1)
  std::string doc_delimiter;        // empty: one document per file
  // Called after each chunk of text: bytes done, bytes in all, tokens so far.
  std::function<void(int64_t done, int64_t total, int64_t tokens)> progress;
};

struct PrepareResult {
  int64_t documents = 0;
  int64_t bytes = 0;
  int64_t train_tokens = 0;
  int64_t val_tokens = 0;
};

// NotFound for an unreadable input; InvalidArgument for a val_fraction out
// of (0, 1), a tokenizer whose ids do not fit in uint16 or that has no
// end-of-text token, or a split that would be empty; errors of the writer.
absl::StatusOr<PrepareResult> PrepareTokenShards(const PrepareOptions& options,
                                                 const Gpt2Bpe& bpe);

}  // namespace lmps

#endif  // LMPS_TOOLS_PREPARE_H_
