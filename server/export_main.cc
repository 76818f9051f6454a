// lmps_export: writes the parameters of one checkpoint step (every shard's
// file, reassembled into whole tensors) as a safetensors file, or as a
// Hugging Face GPT-2 directory. Tensor names and layouts: server/export.h.
//
//   lmps_export --checkpoint_dir=ckpt --out=model.safetensors [--step=N]
//   lmps_export --checkpoint_dir=ckpt --format=hf --out=DIR [--step=N]
//
// --step defaults to the latest step for which every shard's file exists
// and verifies. Exit status 0 on success, 1 with a message otherwise.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "server/export.h"

ABSL_FLAG(std::string, checkpoint_dir, "",
          "Directory holding step_<N>/shard_<id>.ckpt files (required)");
ABSL_FLAG(int64_t, step, -1,
          "Step to export; -1: the latest complete step across all shards");
ABSL_FLAG(std::string, out, "",
          "Output .safetensors path; with --format=hf the output directory "
          "(required)");
ABSL_FLAG(std::string, format, "lmps",
          "lmps: one safetensors file with lmps's tensor names; hf: a "
          "directory with model.safetensors (Hugging Face GPT-2 names and "
          "Conv1D shapes) and config.json, for transformers' "
          "GPT2LMHeadModel.from_pretrained, and GPT-2's tokenizer files "
          "for a job trained on token files");
ABSL_FLAG(std::string, tokenizer_dir, "",
          "--format=hf: the folder with GPT-2's encoder.json and vocab.bpe "
          "(written as vocab.json and merges.txt); default: the job's "
          "data.tokenizer_dir, else where scripts/install_deps.sh installs "
          "them");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Exports a checkpoint step as one safetensors file, or as a Hugging "
      "Face GPT-2 directory.\n"
      "  lmps_export --checkpoint_dir=DIR --out=model.safetensors "
      "[--step=N]\n"
      "  lmps_export --checkpoint_dir=DIR --format=hf --out=OUT_DIR "
      "[--step=N]");
  absl::ParseCommandLine(argc, argv);
  const std::string dir = absl::GetFlag(FLAGS_checkpoint_dir);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (dir.empty() || out.empty()) {
    std::fprintf(stderr,
                 "[export] --checkpoint_dir and --out are required (see "
                 "--help)\n");
    return 1;
  }
  absl::StatusOr<lmps::ExportFormat> format =
      lmps::ParseExportFormat(absl::GetFlag(FLAGS_format));
  if (!format.ok()) {
    std::fprintf(stderr, "[export] --format: %s\n",
                 std::string(format.status().message()).c_str());
    return 1;
  }
  lmps::ExportOptions options;
  options.format = *format;
  options.tokenizer_dir = absl::GetFlag(FLAGS_tokenizer_dir);
  absl::StatusOr<lmps::ExportResult> exported =
      lmps::ExportCheckpoint(dir, absl::GetFlag(FLAGS_step), out, options);
  if (!exported.ok()) {
    std::fprintf(stderr, "[export] %s\n",
                 exported.status().ToString().c_str());
    return 1;
  }
  const lmps::AssembledModel* model = &exported->model;
  int64_t params = 0;
  for (const lmps::SafeTensor& t : model->tensors) params += t.data.size();
  std::fprintf(stderr,
               "[export] wrote step %lld of job '%s' (%zu tensors, %lld "
               "parameters) to %s%s\n",
               static_cast<long long>(model->step), model->spec.name().c_str(),
               model->tensors.size(), static_cast<long long>(params),
               out.c_str(),
               *format == lmps::ExportFormat::kHuggingFace
                   ? " (Hugging Face GPT-2: model.safetensors, config.json)"
                   : "");
  if (!exported->tokenizer.empty()) {
    std::fprintf(stderr, "[export] %s\n", exported->tokenizer.c_str());
  }
  return 0;
}
