#include "worker/data/token_dataset.h"

#include <glob.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace lmps {

absl::StatusOr<TokenDataset::Part> TokenDataset::OpenPart(
    const std::string& what, const std::string& pattern, int vocab_size,
    TokenShardLayout layout) {
  if (pattern.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("data.", what, "_shards is empty: give the ", what,
                     " shards' path or glob pattern"));
  }
  glob_t g;
  const int rc = glob(pattern.c_str(), GLOB_ERR, nullptr, &g);
  std::vector<std::string> paths;
  if (rc == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
  }
  globfree(&g);
  if (paths.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data.", what, "_shards '", pattern, "' matches no file"));
  }
  std::sort(paths.begin(), paths.end());
  Part part;
  for (const std::string& path : paths) {
    absl::StatusOr<std::unique_ptr<TokenShard>> shard =
        TokenShard::Open(path, vocab_size, layout);
    if (!shard.ok()) return shard.status();
    part.starts.push_back(part.total);
    part.total += (*shard)->size();
    part.shards.push_back(std::move(*shard));
  }
  return part;
}

absl::StatusOr<std::unique_ptr<TokenDataset>> TokenDataset::Create(
    const std::string& train_pattern, const std::string& val_pattern,
    int block_size, int vocab_size, std::shared_ptr<const Gpt2Bpe> tokenizer,
    TokenShardLayout layout) {
  if (block_size <= 0) {
    return absl::InvalidArgumentError("block_size must be positive");
  }
  if (vocab_size <= 0 || vocab_size > 65536) {
    return absl::InvalidArgumentError(absl::StrCat(
        "token shards hold uint16 tokens: vocab_size must be in [1, 65536], "
        "got ", vocab_size));
  }
  absl::StatusOr<Part> train = OpenPart("train", train_pattern, vocab_size, layout);
  if (!train.ok()) return train.status();
  absl::StatusOr<Part> val = OpenPart("val", val_pattern, vocab_size, layout);
  if (!val.ok()) return val.status();
  for (const auto& [name, part, pattern] :
       {std::tuple<const char*, const Part*, const std::string*>{
            "train", &*train, &train_pattern},
        {"val", &*val, &val_pattern}}) {
    if (part->total < block_size + 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "data.", name, "_shards '", *pattern, "' hold ", part->total,
          " tokens: a split needs at least block_size + 1 = ", block_size + 1));
    }
  }
  return std::unique_ptr<TokenDataset>(new TokenDataset(
      std::move(*train), std::move(*val), block_size, std::move(tokenizer)));
}

void TokenDataset::Copy(const Part& part, int64_t begin, int n, int32_t* out) {
  // The shard holding `begin`: the last one starting at or before it.
  size_t k = static_cast<size_t>(
      std::upper_bound(part.starts.begin(), part.starts.end(), begin) -
      part.starts.begin() - 1);
  int64_t offset = begin - part.starts[k];
  while (n > 0) {
    const TokenShard& shard = *part.shards[k];
    const int take =
        static_cast<int>(std::min<int64_t>(n, shard.size() - offset));
    const uint16_t* src = shard.tokens() + offset;
    for (int i = 0; i < take; ++i) out[i] = src[i];
    out += take;
    n -= take;
    ++k;
    offset = 0;
  }
}

void TokenDataset::Batch(Split split, uint64_t seed, int64_t step,
                         int global_batch, int first, int n, int32_t* tokens,
                         int32_t* targets) const {
  const Part& part = split == Split::kTrain ? train_ : val_;
  const int T = block_size_;
  std::vector<int32_t> window(T + 1);
  for (int i = 0; i < n; ++i) {
    const int64_t start = SampleStart(split, seed, step, global_batch,
                                      first + i, part.total - T);
    Copy(part, start, T + 1, window.data());
    std::copy(window.begin(), window.begin() + T, tokens + i * T);
    std::copy(window.begin() + 1, window.end(), targets + i * T);
  }
}

uint16_t TokenDataset::Token(Split split, int64_t i) const {
  int32_t t;
  Copy(split == Split::kTrain ? train_ : val_, i, 1, &t);
  return static_cast<uint16_t>(t);
}

std::vector<int32_t> TokenDataset::EncodePrompt(const std::string& text) const {
  if (tokenizer_ == nullptr) return {0};
  std::vector<int32_t> out;
  if (tokenizer_->eot_token() >= 0) out.push_back(tokenizer_->eot_token());
  tokenizer_->EncodeAppend(text, &out);
  if (out.empty()) out.push_back(0);
  return out;
}

int TokenDataset::SampleVocab() const {
  return tokenizer_ != nullptr ? tokenizer_->vocab_size() : 0;
}

std::string TokenDataset::DecodeSample(
    const std::vector<int32_t>& tokens) const {
  std::string out;
  for (int32_t t : tokens) {
    if (tokenizer_ != nullptr && t >= 0 && t < tokenizer_->vocab_size()) {
      out += tokenizer_->token_bytes(t);
    } else {
      absl::StrAppend(&out, tokenizer_ == nullptr ? " " : "", "<", t, ">");
    }
  }
  return out;
}

}  // namespace lmps
