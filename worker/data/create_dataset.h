// The dataset a job spec names (DataConfig, proto/lmps.proto):
// - BYTE_TEXT (the default): TextDataset over data.path, the tail
//   data.val_fraction held out;
// - TOKEN_SHARDS: TokenDataset over data.train_shards and data.val_shards,
//   every token checked against model.vocab_size, with GPT-2's tokenizer for
//   the sample read from data.tokenizer_dir. When tokenizer_dir is not set
//   and scripts/install_deps.sh's copy (DefaultGpt2VocabDir()) is not
//   there either, the sample is shown as token ids; a tokenizer_dir that is
//   set but unreadable is an error.
// Errors are those of the datasets' Create, prefixed with what was read.
//
// Thread-safety: a pure function.
#ifndef LMPS_WORKER_DATA_CREATE_DATASET_H_
#define LMPS_WORKER_DATA_CREATE_DATASET_H_

#include <memory>

#include "absl/status/statusor.h"
#include "proto/lmps.pb.h"
#include "worker/data/dataset.h"

namespace lmps {

// `spec` with ApplyJobSpecDefaults applied.
absl::StatusOr<std::unique_ptr<Dataset>> CreateDataset(const JobSpec& spec);

}  // namespace lmps

#endif  // LMPS_WORKER_DATA_CREATE_DATASET_H_
