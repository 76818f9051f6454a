#include "worker/data/create_dataset.h"

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "common/model/job_spec.h"
#include "common/text/gpt2_bpe.h"
#include "worker/data/token_dataset.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<Dataset>> CreateDataset(const JobSpec& spec) {
  const DataConfig& d = spec.data();
  const int block_size = spec.model().block_size();
  if (!IsTokenData(d)) {
    absl::StatusOr<std::unique_ptr<TextDataset>> text =
        TextDataset::Create(d.path(), d.val_fraction(), block_size);
    if (!text.ok()) return text.status();
    return std::unique_ptr<Dataset>(std::move(*text));
  }
  absl::StatusOr<std::unique_ptr<TokenDataset>> tokens;
  std::shared_ptr<const Gpt2Bpe> tokenizer;
  std::string dir = d.tokenizer_dir();
  const bool explicit_dir = !dir.empty();
  if (!explicit_dir) dir = DefaultGpt2VocabDir();
  if (explicit_dir || access((dir + "/encoder.json").c_str(), R_OK) == 0) {
    absl::StatusOr<std::unique_ptr<Gpt2Bpe>> bpe = Gpt2Bpe::FromDir(dir);
    if (!bpe.ok()) {
      return absl::Status(
          bpe.status().code(),
          absl::StrCat("data.tokenizer_dir: ", bpe.status().message()));
    }
    tokenizer = std::move(*bpe);
  }
  tokens = TokenDataset::Create(d.train_shards(), d.val_shards(), block_size,
                                spec.model().vocab_size(), std::move(tokenizer),
                                d.format() == RAW_TOKENS
                                    ? TokenShardLayout::kRaw
                                    : TokenShardLayout::kLlmc);
  if (!tokens.ok()) return tokens.status();
  return std::unique_ptr<Dataset>(std::move(*tokens));
}

}  // namespace lmps
