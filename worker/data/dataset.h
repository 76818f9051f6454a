// Byte-level text data: tokens are the file's bytes (vocabulary 256), the
// tail `val_fraction` of the file is held out for evaluation.
//
// Batches are pure functions of (seed, step, sample index): sample i of the
// global batch of step t starts at a position drawn from the counter RNG
// keyed by (seed, "train") at index t * batch + i. Data-parallel rank r of
// dp takes samples [r * B/dp, (r+1) * B/dp), so the global batch is the same
// for every layout and a replacement worker reproduces exactly the batches
// its predecessor was given.
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

class TextDataset {
 public:
  // Loads `path`. Fails with NotFound if unreadable and InvalidArgument if a
  // split is shorter than block_size + 1 tokens.
  static absl::StatusOr<std::unique_ptr<TextDataset>> Create(
      const std::string& path, float val_fraction, int block_size);
  // For tests: data given in memory.
  static absl::StatusOr<std::unique_ptr<TextDataset>> FromText(
      std::string text, float val_fraction, int block_size);

  // Fills tokens[n, T] and targets[n, T] (targets = tokens shifted by one)
  // with samples [first, first + n) of the global batch of `step`, where the
  // global batch has `global_batch` samples. T = block_size.
  void Batch(Split split, uint64_t seed, int64_t step, int global_batch,
             int first, int n, int32_t* tokens, int32_t* targets) const;

  int block_size() const { return block_size_; }
  int64_t train_tokens() const { return split_; }
  int64_t val_tokens() const {
    return static_cast<int64_t>(text_.size()) - split_;
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
