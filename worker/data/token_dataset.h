// Token-shard data: llm.c .bin shards (common/formats/token_shard.h),
// memory-mapped. The training split is the concatenation of the shards
// matching the training pattern, in sorted path order; the validation split
// the same for the validation pattern. Batches follow the data order of
// every Dataset (dataset.h, SampleStart): windows of block_size + 1 tokens
// anywhere in a split, across shard boundaries too.
//
// Every shard is validated completely at Create (magic, version, size,
// every token below the model's vocab_size), so a bad shard fails the
// worker (and lmps_local, which creates the dataset once to check the job)
// before training starts.
//
// The prompt and sample go through GPT-2's tokenizer when one is given
// (the prompt after the end-of-text token, as GPT-2 is prompted); without
// one the sample is shown as token ids.
//
// Thread-safety: immutable after Create; const methods are thread-safe.
#ifndef LMPS_WORKER_DATA_TOKEN_DATASET_H_
#define LMPS_WORKER_DATA_TOKEN_DATASET_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/formats/token_shard.h"
#include "common/text/gpt2_bpe.h"
#include "worker/data/dataset.h"

namespace lmps {

class TokenDataset : public Dataset {
 public:
  // `train_pattern` and `val_pattern` are glob(3) patterns (a plain path
  // matches itself). InvalidArgument if a pattern matches no file, a shard
  // is bad (TokenShard::Open) or a split has fewer than block_size + 1
  // tokens; NotFound if a shard cannot be read. `tokenizer` may be null.
  static absl::StatusOr<std::unique_ptr<TokenDataset>> Create(
      const std::string& train_pattern, const std::string& val_pattern,
      int block_size, int vocab_size,
      std::shared_ptr<const Gpt2Bpe> tokenizer,
      TokenShardLayout layout = TokenShardLayout::kLlmc);

  void Batch(Split split, uint64_t seed, int64_t step, int global_batch,
             int first, int n, int32_t* tokens,
             int32_t* targets) const override;
  int block_size() const override { return block_size_; }
  int64_t train_tokens() const override { return train_.total; }
  int64_t val_tokens() const override { return val_.total; }
  std::vector<int32_t> EncodePrompt(const std::string& text) const override;
  std::string DecodeSample(const std::vector<int32_t>& tokens) const override;
  int SampleVocab() const override;

  // Token `i` of a split (for tests).
  uint16_t Token(Split split, int64_t i) const;

 private:
  // One split: its shards and where each starts in the concatenation.
  struct Part {
    std::vector<std::unique_ptr<TokenShard>> shards;
    std::vector<int64_t> starts;  // starts[k] = tokens before shard k
    int64_t total = 0;
  };
  TokenDataset(Part train, Part val, int block_size,
               std::shared_ptr<const Gpt2Bpe> tokenizer)
      : train_(std::move(train)),
        val_(std::move(val)),
        block_size_(block_size),
        tokenizer_(std::move(tokenizer)) {}
  static absl::StatusOr<Part> OpenPart(const std::string& what,
                                       const std::string& pattern,
                                       int vocab_size,
                                       TokenShardLayout layout);
  // Copies tokens [begin, begin + n) of `part` into out (as int32).
  static void Copy(const Part& part, int64_t begin, int n, int32_t* out);

  const Part train_;
  const Part val_;
  const int block_size_;
  const std::shared_ptr<const Gpt2Bpe> tokenizer_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_DATA_TOKEN_DATASET_H_
