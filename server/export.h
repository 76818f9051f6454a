// Exporting a job's shard checkpoints of one step as a single safetensors
// file of whole tensors (common/formats/safetensors.h), e.g. for inference, analysis
// or as initial weights of another job (lmps_server --init_from), in one of
// two formats:
//
// ExportFormat::kLmps (the default), one file. Tensor names are the
// canonical names of common/model/model_spec.h, in that
// order (L = n_layer, C = n_embd, V = vocab_size, T = block_size):
//   wte.weight (V, C)  wpe.weight (T, C)
//   h.{l}.ln_1.weight (C)  h.{l}.ln_1.bias (C)
//   h.{l}.attn.c_attn.weight (3C, C)  h.{l}.attn.c_attn.bias (3C)
//   h.{l}.attn.c_proj.weight (C, C)   h.{l}.attn.c_proj.bias (C)
//   h.{l}.ln_2.weight (C)  h.{l}.ln_2.bias (C)
//   h.{l}.mlp.c_fc.weight (4C, C)     h.{l}.mlp.c_fc.bias (4C)
//   h.{l}.mlp.c_proj.weight (C, 4C)   h.{l}.mlp.c_proj.bias (C)
//   ln_f.weight (C)  ln_f.bias (C)
// all F32, matrices out x in (PyTorch nn.Linear layout); the LM head is tied
// to wte.weight and not stored. __metadata__ holds "format": "pt",
// "lmps.step", "lmps.job" and "lmps.model" (the ModelConfig in text form).
//
// ExportFormat::kHuggingFace, a directory that transformers'
// GPT2LMHeadModel.from_pretrained loads: model.safetensors with Hugging
// Face's names and Conv1D shapes (common/formats/hf_gpt2.h: the names above
// prefixed "transformer.", the four projection matrices of each block
// transposed to in x out, no lm_head.weight: it is tied) and the same
// metadata, and config.json (HfGpt2ConfigJson). For a job trained on token
// files (data.format TOKEN_SHARDS or RAW_TOKENS) it also holds GPT-2's
// tokenizer as GPT2Tokenizer(Fast).from_pretrained reads it: vocab.json and
// merges.txt (OpenAI's encoder.json and vocab.bpe, checked and copied) and
// tokenizer_config.json (model_max_length = block_size, <|endoftext|> as
// bos, eos and unk), when the vocabulary files are found and fit the model
// (no more tokens than model.vocab_size: a character-level nanoGPT
// vocabulary gets none); a job on bytes (BYTE_TEXT) gets none.
//
// Optimizer state is not exported.
//
// Thread-safety: pure functions over the file system.
#ifndef LMPS_SERVER_EXPORT_H_
#define LMPS_SERVER_EXPORT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/formats/safetensors.h"
#include "proto/lmps.pb.h"

namespace lmps {

// The latest step under `dir` whose shard files all exist and verify (the
// number of shards is read from shard 0's file). NotFound if none.
absl::StatusOr<int64_t> LatestCompleteStep(absl::string_view dir);

struct AssembledModel {
  int64_t step = 0;
  JobSpec spec;
  std::vector<SafeTensor> tensors;  // canonical order
};

// Reads every shard file of `step` and reassembles whole tensors. Errors
// name the file: missing shard, corrupt file, shards of different jobs or
// partitions, chunks that do not tile a tensor.
absl::StatusOr<AssembledModel> AssembleCheckpoint(absl::string_view dir,
                                                  int64_t step);

enum class ExportFormat { kLmps, kHuggingFace };

struct ExportOptions {
  ExportFormat format = ExportFormat::kLmps;
  // kHuggingFace: the folder with GPT-2's encoder.json and vocab.bpe; they
  // must be there and fit the model. Empty: the job's data.tokenizer_dir,
  // else DefaultGpt2VocabDir() (common/text/gpt2_bpe.h), where their absence
  // only leaves the tokenizer out (said in ExportResult::tokenizer).
  std::string tokenizer_dir;
};

struct ExportResult {
  AssembledModel model;  // in lmps's layout
  // kHuggingFace: what became of the tokenizer, for the log ("GPT-2's
  // tokenizer from DIR: vocab.json, merges.txt, tokenizer_config.json" or
  // why there is none). Empty for kLmps.
  std::string tokenizer;
};

// "lmps" or "hf"; InvalidArgument naming the valid values otherwise.
absl::StatusOr<ExportFormat> ParseExportFormat(absl::string_view name);

// AssembleCheckpoint of `step` (-1: LatestCompleteStep) written to
// `out_path`: the safetensors file (kLmps), or the directory, created if
// missing, with model.safetensors, config.json and the tokenizer's files
// (kHuggingFace, see above). Files are written atomically. A tokenizer
// folder named in `options` that lacks the files, or files that are
// malformed or do not fit the model, are errors (InvalidArgument or
// NotFound naming the file) before anything is written.
absl::StatusOr<ExportResult> ExportCheckpoint(
    absl::string_view dir, int64_t step, const std::string& out_path,
    const ExportOptions& options = {});

}  // namespace lmps

#endif  // LMPS_SERVER_EXPORT_H_
