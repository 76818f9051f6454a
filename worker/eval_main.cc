// lmps_eval: loads an exported model and either prints the mean next-token
// loss of a text or generates text from a prompt. The model is lmps_export's
// safetensors file (its metadata "lmps.model" holds the ModelConfig), or a
// Hugging Face GPT-2 checkpoint: lmps_export --format=hf's directory, or any
// GPT-2 model.safetensors with a config.json beside it
// (common/formats/gpt2_weights.h).
//
//   lmps_eval --model=model.safetensors --text_file=FILE   -> "loss: 2.1234"
//   lmps_eval --model=hf_dir --text_file=FILE
//   lmps_eval --model=model.safetensors --prompt="The " --generate=200
//
// Tokens are bytes, or GPT-2's BPE with --gpt2_vocab_dir (models trained on
// token shards; the prompt then follows the end-of-text token).
//
// Exit status: 0 on success, 1 on an error (printed), 2 on bad flags.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "common/formats/gpt2_weights.h"
#include "common/model/model_spec.h"
#include "common/rpc/status_util.h"
#include "common/text/gpt2_bpe.h"
#include "worker/backend_factory.h"
#include "worker/data/dataset.h"
#include "worker/model/gpt.h"

ABSL_FLAG(std::string, model, "",
          "exported model: a safetensors file, or a directory holding "
          "model.safetensors (lmps's or Hugging Face's GPT-2 layout)");
ABSL_FLAG(std::string, text_file, "", "text whose loss to print");
ABSL_FLAG(std::string, prompt, "", "prompt for --generate");
ABSL_FLAG(int, generate, 0, "tokens to generate after --prompt");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature (0: greedy)");
ABSL_FLAG(int, top_k, 0, "top-k for sampling (0: all)");
ABSL_FLAG(std::string, generate_out, "",
          "write the prompt and the generated text to this file instead of "
          "stdout");
ABSL_FLAG(uint64_t, seed, 1, "sampling seed");
ABSL_FLAG(int, threads, 1, "compute threads");
ABSL_FLAG(std::string, gpt2_vocab_dir, "",
          "folder with GPT-2's encoder.json and vocab.bpe: tokenize with "
          "GPT-2's BPE (a model trained on token shards) instead of bytes");

namespace lmps {
namespace {

absl::Status Run() {
  std::unique_ptr<Gpt2Bpe> bpe;
  if (!absl::GetFlag(FLAGS_gpt2_vocab_dir).empty()) {
    LMPS_ASSIGN_OR_RETURN(bpe,
                          Gpt2Bpe::FromDir(absl::GetFlag(FLAGS_gpt2_vocab_dir)));
  }
  auto encode = [&](const std::string& text, bool prompt) {
    if (bpe == nullptr) return TextDataset::Encode(text);
    std::vector<int32_t> ids;
    if (prompt && bpe->eot_token() >= 0) ids.push_back(bpe->eot_token());
    bpe->EncodeAppend(text, &ids);
    return ids;
  };
  auto decode = [&](const std::vector<int32_t>& ids) {
    if (bpe == nullptr) return TextDataset::Decode(ids);
    std::string out;
    for (int32_t t : ids) {
      out += t >= 0 && t < bpe->vocab_size() ? bpe->token_bytes(t)
                                             : absl::StrCat("<", t, ">");
    }
    return out;
  };
  // lmps_export's file (either format) or a Hugging Face GPT-2 checkpoint;
  // the model from its lmps.model metadata or config.json.
  LMPS_ASSIGN_OR_RETURN(
      Gpt2Weights weights,
      Gpt2Weights::Load(absl::GetFlag(FLAGS_model), /*model=*/nullptr));
  const ModelConfig config = weights.model();
  // Parameters in the canonical flat order.
  const std::vector<float> flat = weights.Flat();
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                        CreateBackend("cpu", absl::GetFlag(FLAGS_threads)));
  const int T = config.block_size();
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<GptModel> model,
                        GptModel::Create(config, backend.get(), 1, T));
  LMPS_RETURN_IF_ERROR(model->SetParametersFromHost(flat.data()));

  if (!absl::GetFlag(FLAGS_text_file).empty()) {
    std::ifstream in(absl::GetFlag(FLAGS_text_file), std::ios::binary);
    if (!in) return absl::NotFoundError("cannot read --text_file");
    std::stringstream buf;
    buf << in.rdbuf();
    std::vector<int32_t> tokens = encode(buf.str(), /*prompt=*/false);
    if (tokens.size() < 2) return absl::InvalidArgumentError("text too short");
    // Non-overlapping windows of up to T tokens; loss averaged per token.
    double sum = 0;
    int64_t count = 0;
    for (size_t start = 0; start + 1 < tokens.size(); start += T) {
      const int n = static_cast<int>(std::min<size_t>(T, tokens.size() - 1 - start));
      LMPS_ASSIGN_OR_RETURN(float loss, model->Forward(&tokens[start],
                                                       &tokens[start + 1], 1, n));
      sum += static_cast<double>(loss) * n;
      count += n;
    }
    std::printf("loss: %.8f\n", sum / static_cast<double>(count));
  }
  if (absl::GetFlag(FLAGS_generate) > 0) {
    LMPS_ASSIGN_OR_RETURN(
        std::vector<int32_t> out,
        model->Generate(encode(absl::GetFlag(FLAGS_prompt), /*prompt=*/true),
                        absl::GetFlag(FLAGS_generate),
                        SamplingOptions{
                            .temperature = static_cast<float>(
                                absl::GetFlag(FLAGS_temperature)),
                            .top_k = absl::GetFlag(FLAGS_top_k),
                            // Only the tokenizer's ids (not padding rows).
                            .vocab_limit =
                                bpe == nullptr
                                    ? 0
                                    : std::min(bpe->vocab_size(),
                                               config.vocab_size())},
                        absl::GetFlag(FLAGS_seed)));
    const std::string text =
        absl::GetFlag(FLAGS_prompt) + decode(out);
    if (absl::GetFlag(FLAGS_generate_out).empty()) {
      std::printf("%s\n", text.c_str());
    } else {
      std::ofstream f(absl::GetFlag(FLAGS_generate_out), std::ios::binary);
      f << text;
      if (!f) {
        return absl::InternalError(absl::StrCat(
            "cannot write ", absl::GetFlag(FLAGS_generate_out)));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_model).empty()) {
    std::fprintf(stderr, "lmps_eval: --model is required\n");
    return 2;
  }
  absl::Status s = lmps::Run();
  if (!s.ok()) {
    std::fprintf(stderr, "lmps_eval: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
