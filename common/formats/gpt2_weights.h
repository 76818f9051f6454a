// lmps's GPT-2 parameters read from a safetensors checkpoint in either
// layout (for lmps_server --init_from and lmps_eval):
//   - lmps's (lmps_export's default): the names of common/model/model_spec.h,
//     matrices out x in, the model in the "lmps.model" metadata;
//   - Hugging Face's (lmps_export --format=hf, transformers'
//     save_pretrained, the Hub's GPT-2 files; common/formats/hf_gpt2.h):
//     names with or without the "transformer." prefix, the blocks'
//     projection matrices in x out (Conv1D), optionally the attention
//     buffers h.{l}.attn.bias and h.{l}.attn.masked_bias (of any dtype;
//     skipped) and lm_head.weight (accepted when equal to wte.weight, which
//     lmps ties it to), the model in config.json beside the file.
//
// A path names a .safetensors file or a directory holding model.safetensors.
//
// The layout is decided once per file: Hugging Face's if any name has the
// "transformer." prefix, is lm_head.weight or an attention buffer, or if
// h.0.attn.c_attn.weight is (C, 3C); lmps's otherwise. (The square
// attn.c_proj cannot tell the layouts apart; c_attn always can.) A tensor
// whose shape then does not match is an error naming it and both shapes.
//
// Thread-safety: Gpt2Weights is immutable once created; const methods may be
// called concurrently.
#ifndef LMPS_COMMON_FORMATS_GPT2_WEIGHTS_H_
#define LMPS_COMMON_FORMATS_GPT2_WEIGHTS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/formats/safetensors.h"
#include "common/model/model_spec.h"
#include "proto/lmps.pb.h"

namespace lmps {

enum class Gpt2Layout { kLmps, kHuggingFace };

// "lmps" or "Hugging Face".
absl::string_view Gpt2LayoutName(Gpt2Layout layout);

struct Gpt2File {
  std::string path;              // the safetensors file read
  SafetensorsContents contents;  // other dtypes listed, not decoded
  // The model the file describes: its "lmps.model" metadata, else
  // config.json in the file's directory; unset if neither exists.
  std::optional<ModelConfig> config;
  std::string config_source;  // where `config` came from, for messages
};

// Reads `path` (a file, or a directory holding model.safetensors). Errors
// name the path: missing file; a directory without model.safetensors (also
// when it holds a sharded checkpoint's model.safetensors.index.json, which
// is not supported); a corrupt file; unparsable "lmps.model" metadata; a
// config.json that does not parse or describes a model lmps does not
// implement (ParseHfGpt2ConfigJson).
absl::StatusOr<Gpt2File> ReadGpt2File(const std::string& path);

class Gpt2Weights {
 public:
  // Maps `file`'s tensors onto the tensors of `model` (GptTensorSpecs
  // order). Errors name the file and the tensor:
  // Two differences are allowed, as nanoGPT's crop_block_size and llm.c's
  // vocabulary padding do (see adaptations()): a job block_size below the
  // file's (wpe's first block_size rows are used) and a job vocab_size above
  // the file's (wte's extra rows are zero: e.g. GPT-2's 50257 tokens in a
  // model padded to 50304).
  //   NotFound: a tensor of the model is missing (named as the layout names
  //     it);
  //   InvalidArgument: the file's config (metadata or config.json) differs
  //     from `model`; a tensor's shape differs from the one `model` needs in
  //     the file's layout (both shapes named); a model tensor of a dtype
  //     other than F32, F16 or BF16 (those two are widened exactly); a
  //     tensor present both with and without the prefix;
  //     lm_head.weight not equal to wte.weight; tensors `model` does not
  //     have (e.g. layers beyond n_layer).
  static absl::StatusOr<Gpt2Weights> Create(Gpt2File file,
                                            const ModelConfig& model);

  // ReadGpt2File(path), then Create for `model`, or for the file's own
  // config when `model` is null (InvalidArgument if the file has none).
  static absl::StatusOr<Gpt2Weights> Load(const std::string& path,
                                          const ModelConfig* model);

  Gpt2Layout layout() const { return layout_; }
  const std::string& path() const { return file_.path; }
  const ModelConfig& model() const { return model_; }
  const std::vector<TensorSpec>& specs() const { return specs_; }

  // How the file was fitted to the model, one line per tensor concerned
  // (empty when it matched exactly): "wpe.weight: the first 64 of its 1024
  // positions (block_size 64)", "wte.weight: its 50257 tokens, then 47 zero
  // rows (vocab_size 50304)", "h.0.ln_1.weight: BF16 widened to F32".
  const std::vector<std::string>& adaptations() const { return adaptations_; }

  // Elements [begin, end) of tensor specs()[i] in lmps's layout (row-major,
  // matrices out x in), copied to out[0, end - begin). Requires
  // 0 <= begin <= end <= specs()[i].num_elements().
  void CopyRange(size_t i, int64_t begin, int64_t end, float* out) const;

  // Every parameter in lmps's canonical flat order and layout.
  std::vector<float> Flat() const;

 private:
  struct Source {
    size_t tensor = 0;        // index in file_.contents.tensors
    bool transposed = false;  // stored in x out: lmps's (r, c) is (c, r)
    // Elements of lmps's tensor the file provides (a prefix); the rest are
    // zero (wte's padding rows). Not transposed when below the total.
    int64_t file_elements = 0;
  };

  Gpt2Weights() = default;

  Gpt2File file_;
  ModelConfig model_;
  Gpt2Layout layout_ = Gpt2Layout::kLmps;
  std::vector<TensorSpec> specs_;
  std::vector<Source> sources_;  // per spec
  std::vector<std::string> adaptations_;
};

}  // namespace lmps

#endif  // LMPS_COMMON_FORMATS_GPT2_WEIGHTS_H_
