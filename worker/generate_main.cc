// lmps_generate: prints text that a trained model writes after a prompt.
//
//   lmps_generate --model=lmps_run/model.safetensors --prompt="And God said"
//       [--max_new_tokens=200] [--temperature=0.8] [--top_k=40]
//       [--top_p=0.95] [--seed=1] [--tokenizer=auto|bytes|gpt2]
//
// The model is a safetensors file or a directory in lmps's or Hugging
// Face's GPT-2 layout (common/formats/gpt2_weights.h). Its text codec:
//   bytes  tokens are bytes (vocabulary 256: lmps's byte-level jobs);
//   gpt2   GPT-2's BPE (common/text/gpt2_bpe.h) from --vocab_dir, installed
//          by scripts/install_deps.sh; a vocabulary padded past GPT-2's
//          50257 tokens (e.g. 50304) never yields a padding row, and
//          generation stops at <|endoftext|> (--stop_at_eot).
//   auto   bytes for a vocabulary of 256, gpt2 for one of 50257..50304.
// Sampling (worker/model/sampling.h): greedy at temperature 0, else
// temperature, top-k and top-p; the text is a pure function of the model,
// the prompt, the options and --seed. The prompt's tokens are cropped to
// the model's context from the left.
//
// Exit status: 0 on success, 1 on an error (printed), 2 on bad flags.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "common/formats/gpt2_weights.h"
#include "common/rpc/status_util.h"
#include "common/text/gpt2_bpe.h"
#include "worker/backend_factory.h"
#include "worker/data/dataset.h"
#include "worker/model/gpt.h"
#include "worker/model/sampling.h"

ABSL_FLAG(std::string, model, "",
          "a safetensors file, or a directory holding model.safetensors "
          "(lmps's or Hugging Face's GPT-2 layout)");
ABSL_FLAG(std::string, prompt, "\n", "the text to continue (not empty)");
ABSL_FLAG(int, max_new_tokens, 200, "tokens to generate at most");
ABSL_FLAG(double, temperature, 0.8, "sampling temperature (0: greedy)");
ABSL_FLAG(int, top_k, 40, "keep the k most likely tokens (0: all)");
ABSL_FLAG(double, top_p, 1.0,
          "keep the most likely tokens up to this probability mass (1: all)");
ABSL_FLAG(uint64_t, seed, 1, "sampling seed");
ABSL_FLAG(std::string, tokenizer, "auto", "auto, bytes or gpt2");
ABSL_FLAG(std::string, vocab_dir, "",
          "GPT-2's encoder.json and vocab.bpe (empty: where "
          "scripts/install_deps.sh installs them)");
ABSL_FLAG(bool, stop_at_eot, true,
          "gpt2: stop when the model writes <|endoftext|>");
ABSL_FLAG(int, threads, 1, "compute threads");

namespace lmps {
namespace {

constexpr int kGpt2Vocab = 50257;
constexpr int kGpt2PaddedVocabMax = 50304;

absl::Status Run() {
  LMPS_ASSIGN_OR_RETURN(
      Gpt2Weights weights,
      Gpt2Weights::Load(absl::GetFlag(FLAGS_model), /*model=*/nullptr));
  const ModelConfig config = weights.model();
  const int V = config.vocab_size();
  std::string codec = absl::GetFlag(FLAGS_tokenizer);
  if (codec == "auto") {
    if (V == 256) {
      codec = "bytes";
    } else if (V >= kGpt2Vocab && V <= kGpt2PaddedVocabMax) {
      codec = "gpt2";
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "the model's vocabulary has ", V,
          " tokens, neither bytes (256) nor GPT-2's (50257, padded up to ",
          kGpt2PaddedVocabMax, "): say --tokenizer=bytes or gpt2"));
    }
  }
  std::unique_ptr<Gpt2Bpe> bpe;
  SamplingOptions sampling{
      .temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature)),
      .top_k = absl::GetFlag(FLAGS_top_k),
      .top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p))};
  int32_t stop = -1;
  std::vector<int32_t> prompt;
  const std::string& text = absl::GetFlag(FLAGS_prompt);
  if (codec == "bytes") {
    if (V < 256) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tokenizer=bytes needs a vocabulary of at least 256, the model "
          "has ", V));
    }
    prompt = TextDataset::Encode(text);
  } else if (codec == "gpt2") {
    std::string dir = absl::GetFlag(FLAGS_vocab_dir);
    if (dir.empty()) dir = DefaultGpt2VocabDir();
    LMPS_ASSIGN_OR_RETURN(bpe, Gpt2Bpe::FromDir(dir));
    if (V < bpe->vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tokenizer=gpt2 needs a vocabulary of at least ",
          bpe->vocab_size(), " tokens, the model has ", V));
    }
    sampling.vocab_limit = bpe->vocab_size();
    if (absl::GetFlag(FLAGS_stop_at_eot)) stop = bpe->eot_token();
    prompt = bpe->Encode(text);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tokenizer must be auto, bytes or gpt2, got '", codec, "'"));
  }
  if (prompt.empty()) {
    return absl::InvalidArgumentError("--prompt must not be empty");
  }
  LMPS_RETURN_IF_ERROR(ValidateSampling(sampling, V));
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                        CreateBackend("cpu", absl::GetFlag(FLAGS_threads)));
  LMPS_ASSIGN_OR_RETURN(
      std::unique_ptr<GptModel> model,
      GptModel::Create(config, backend.get(), 1, config.block_size()));
  const std::vector<float> flat = weights.Flat();
  LMPS_RETURN_IF_ERROR(model->SetParametersFromHost(flat.data()));
  LMPS_ASSIGN_OR_RETURN(
      std::vector<int32_t> out,
      model->Generate(prompt, absl::GetFlag(FLAGS_max_new_tokens), sampling,
                      absl::GetFlag(FLAGS_seed), stop));
  std::string generated;
  if (bpe != nullptr) {
    LMPS_ASSIGN_OR_RETURN(generated, bpe->Decode(out));
  } else {
    generated = TextDataset::Decode(out);
  }
  const std::string all = text + generated;
  std::fwrite(all.data(), 1, all.size(), stdout);
  std::fputc('\n', stdout);
  return absl::OkStatus();
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "lmps_generate --model=PATH --prompt=TEXT [--max_new_tokens=N] "
      "[--temperature=T] [--top_k=K] [--top_p=P] [--seed=S]");
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_model).empty()) {
    std::fprintf(stderr, "lmps_generate: --model is required\n");
    return 2;
  }
  if (absl::GetFlag(FLAGS_max_new_tokens) < 0) {
    std::fprintf(stderr, "lmps_generate: --max_new_tokens must be >= 0\n");
    return 2;
  }
  absl::Status s = lmps::Run();
  if (!s.ok()) {
    std::fprintf(stderr, "lmps_generate: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
