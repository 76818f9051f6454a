// Training data: the Dataset interface the trainers read batches from, and
// TextDataset, byte-level text: tokens are the file's bytes (vocabulary
// 256), the tail `val_fraction` of the file is held out for evaluation.
// The other implementation, TokenDataset (token_dataset.h), reads llm.c
// token shards; CreateDataset (create_dataset.h) picks one from the job's
// DataConfig.
//
// Batches are pure functions of (seed, step, sample index), the same for
// every implementation (SampleStart): a split is one sequence of tokens;
// sample i of the global batch of step t starts at a position drawn from
// the counter RNG keyed by (seed, "data.train" or "data.val") at index
// t * batch + i. Data-parallel rank r of dp takes samples
// [r * B/dp, (r+1) * B/dp), so the global batch is the same for every
// layout and a replacement worker reproduces exactly the batches its
// predecessor was given. docs/architecture.md ("Data order") has the
// arithmetic.
//
// Thread-safety: immutable after Create; const methods are thread-safe.
#ifndef LMPS_WORKER_DATA_DATASET_H_
#define LMPS_WORKER_DATA_DATASET_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace lmps {

enum class Split { kTrain, kVal };

// Where sample `first + i`'s window (block_size + 1 tokens) of the global
// batch of `step` starts within its split, for a split with
// `positions` = tokens - block_size valid starts.
int64_t SampleStart(Split split, uint64_t seed, int64_t step,
                    int global_batch, int sample, int64_t positions);

class Dataset {
 public:
  virtual ~Dataset() = default;

  // Fills tokens[n, T] and targets[n, T] (targets = tokens shifted by one)
  // with samples [first, first + n) of the global batch of `step`, where the
  // global batch has `global_batch` samples. T = block_size.
  virtual void Batch(Split split, uint64_t seed, int64_t step,
                     int global_batch, int first, int n, int32_t* tokens,
                     int32_t* targets) const = 0;

  virtual int block_size() const = 0;
  virtual int64_t train_tokens() const = 0;
  virtual int64_t val_tokens() const = 0;

  // The data's tokenizer, for the sample: a prompt's tokens, and generated
  // tokens as text.
  virtual std::vector<int32_t> EncodePrompt(const std::string& text) const = 0;
  virtual std::string DecodeSample(const std::vector<int32_t>& tokens) const = 0;
  // How many of the model's token ids the tokenizer has (the sample draws
  // only from those: a vocabulary padded for speed never yields a padding
  // row); 0: every id.
  virtual int SampleVocab() const { return 0; }
};

class TextDataset : public Dataset {
 public:
  // Loads `path`. Fails with NotFound if unreadable and InvalidArgument if a
  // split is shorter than block_size + 1 tokens.
  static absl::StatusOr<std::unique_ptr<TextDataset>> Create(
      const std::string& path, float val_fraction, int block_size);
  // For tests: data given in memory.
  static absl::StatusOr<std::unique_ptr<TextDataset>> FromText(
      std::string text, float val_fraction, int block_size);

  void Batch(Split split, uint64_t seed, int64_t step, int global_batch,
             int first, int n, int32_t* tokens,
             int32_t* targets) const override;

  int block_size() const override { return block_size_; }
  int64_t train_tokens() const override { return split_; }
  int64_t val_tokens() const override {
    return static_cast<int64_t>(text_.size()) - split_;
  }
  std::vector<int32_t> EncodePrompt(const std::string& text) const override {
    return Encode(text);
  }
  std::string DecodeSample(const std::vector<int32_t>& tokens) const override {
    return Decode(tokens);
  }

  // Byte-level tokenizer.
  static std::vector<int32_t> Encode(const std::string& text);
  static std::string Decode(const std::vector<int32_t>& tokens);

 private:
  TextDataset(std::string text, int64_t split, int block_size)
      : text_(std::move(text)), split_(split), block_size_(block_size) {}

  const std::string text_;
  const int64_t split_;  // first validation byte
  const int block_size_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_DATA_DATASET_H_
