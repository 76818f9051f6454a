#include "worker/data/dataset.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/model/rng.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<TextDataset>> TextDataset::Create(
    const std::string& path, float val_fraction, int block_size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("cannot read data file '", path, "'"));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  absl::StatusOr<std::unique_ptr<TextDataset>> ds =
      FromText(buf.str(), val_fraction, block_size);
  if (!ds.ok()) {
    return absl::Status(ds.status().code(),
                        absl::StrCat(path, ": ", ds.status().message()));
  }
  return ds;
}

absl::StatusOr<std::unique_ptr<TextDataset>> TextDataset::FromText(
    std::string text, float val_fraction, int block_size) {
  if (!(val_fraction > 0 && val_fraction < 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "val_fraction must be in (0, 1), got ", val_fraction));
  }
  if (block_size <= 0) {
    return absl::InvalidArgumentError("block_size must be positive");
  }
  const int64_t n = static_cast<int64_t>(text.size());
  const int64_t split = n - static_cast<int64_t>(n * val_fraction);
  if (split < block_size + 1 || n - split < block_size + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data of ", n, " bytes is too short: each split needs at least "
        "block_size + 1 = ", block_size + 1, " bytes (train ", split,
        ", val ", n - split, ")"));
  }
  return std::unique_ptr<TextDataset>(
      new TextDataset(std::move(text), split, block_size));
}

int64_t SampleStart(Split split, uint64_t seed, int64_t step,
                    int global_batch, int sample, int64_t positions) {
  const uint64_t key =
      StableKey(seed, split == Split::kTrain ? "data.train" : "data.val");
  const uint64_t index =
      static_cast<uint64_t>(step) * static_cast<uint64_t>(global_batch) +
      static_cast<uint64_t>(sample);
  return static_cast<int64_t>(RandomBits(key, index) %
                              static_cast<uint64_t>(positions));
}

void TextDataset::Batch(Split split, uint64_t seed, int64_t step,
                        int global_batch, int first, int n, int32_t* tokens,
                        int32_t* targets) const {
  const int64_t base = split == Split::kTrain ? 0 : split_;
  const int64_t len = split == Split::kTrain ? split_ : val_tokens();
  const int64_t positions = len - block_size_;  // valid start positions
  const auto* bytes = reinterpret_cast<const unsigned char*>(text_.data());
  for (int i = 0; i < n; ++i) {
    const int64_t start =
        base + SampleStart(split, seed, step, global_batch, first + i, positions);
    for (int t = 0; t < block_size_; ++t) {
      tokens[i * block_size_ + t] = bytes[start + t];
      targets[i * block_size_ + t] = bytes[start + t + 1];
    }
  }
}

std::vector<int32_t> TextDataset::Encode(const std::string& text) {
  std::vector<int32_t> out(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    out[i] = static_cast<unsigned char>(text[i]);
  }
  return out;
}

std::string TextDataset::Decode(const std::vector<int32_t>& tokens) {
  std::string out;
  out.reserve(tokens.size());
  for (int32_t t : tokens) out.push_back(static_cast<char>(t & 0xff));
  return out;
}

}  // namespace lmps
