// Hugging Face's layout of lmps's model (transformers' GPT2LMHeadModel):
// tensor names, Conv1D shapes and config.json.
//
// lmps's model (common/model/model_spec.h) is GPT-2 as transformers
// implements it: token and learned position embeddings, pre-LayerNorm
// blocks, a fused qkv projection split into q, k, v (heads contiguous in
// each), biases on every projection, attention scores scaled by
// 1/sqrt(head size) with a causal mask, an MLP of width 4C with GELU in the
// tanh approximation (transformers' "gelu_new"), LayerNorm eps 1e-5, a final
// LayerNorm and an LM head without bias tied to wte. It differs in what does
// not change the function computed: lmps trains without dropout (the
// exported config sets the three dropout rates to 0), and its token ids are
// those of lmps's tokenizer (no tokenizer files are exported).
//
// The layouts differ only in names and in the block's four projection
// matrices:
//   lmps name X            <->  "transformer." + X in GPT2LMHeadModel (its
//                                base model GPT2Model's names are X itself,
//                                as in the Hub's original GPT-2 files)
//   h.{l}.attn.c_attn.weight, h.{l}.attn.c_proj.weight,
//   h.{l}.mlp.c_fc.weight, h.{l}.mlp.c_proj.weight:
//                                lmps stores them out x in (nn.Linear,
//                                y = x W^T + b), transformers' Conv1D in x out
//                                (y = x W + b): each is the other's transpose.
// lm_head.weight is not written: it is tied to wte.weight, and transformers'
// save_pretrained leaves it out too (from_pretrained ties it). Checkpoints
// may also hold the attention buffers h.{l}.attn.bias (the causal mask) and
// h.{l}.attn.masked_bias, which are not parameters.
//
// Reading either layout from a file: common/formats/gpt2_weights.h.
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_FORMATS_HF_GPT2_H_
#define LMPS_COMMON_FORMATS_HF_GPT2_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/formats/safetensors.h"
#include "common/model/model_spec.h"
#include "proto/lmps.pb.h"

namespace lmps {

// GPT2LMHeadModel's base_model_prefix, followed by the dot.
inline constexpr absl::string_view kHfGpt2Prefix = "transformer.";

// Whether lmps tensor `name` is one of a block's four projection matrices:
// a Conv1D weight in Hugging Face's layout, stored transposed.
bool IsHfConv1DWeight(absl::string_view name);

// The shape of `spec` in Hugging Face's layout (Conv1D weights reversed).
std::vector<int64_t> HfGpt2Shape(const TensorSpec& spec);

// Whether `name` (without prefix) is an attention buffer, h.{l}.attn.bias or
// h.{l}.attn.masked_bias; sets *layer to l if not null.
bool IsHfGpt2AttentionBuffer(absl::string_view name, int64_t* layer = nullptr);

// The row-major transpose of a row-major rows x cols matrix.
std::vector<float> TransposeMatrix(const std::vector<float>& m, int64_t rows,
                                   int64_t cols);

// lmps's tensors of `config` (exactly GptTensorSpecs(config): names, order
// and shapes; InvalidArgument naming the first that differs) in Hugging
// Face's layout: "transformer."-prefixed names, Conv1D weights transposed,
// same order, no lm_head.weight.
absl::StatusOr<std::vector<SafeTensor>> LmpsToHfGpt2(
    const ModelConfig& config, const std::vector<SafeTensor>& tensors);

// config.json for transformers' GPT2LMHeadModel of `config` (keys sorted,
// two-space indent, as save_pretrained writes it).
std::string HfGpt2ConfigJson(const ModelConfig& config);

// The model of a transformers GPT-2 config.json: n_layer, n_head, n_embd,
// n_positions (lmps's block_size) and vocab_size, with GPT2Config's defaults
// for absent fields. InvalidArgument naming `source` and the field when the
// text is not a JSON object, a field has the wrong type, or the config
// describes a model lmps does not implement: model_type other than "gpt2",
// activation_function other than the GELU tanh approximation ("gelu_new",
// "gelu_pytorch_tanh", "gelu_fast"), layer_norm_epsilon other than 1e-5,
// n_inner other than 4 n_embd, scale_attn_weights false,
// scale_attn_by_inverse_layer_idx true, add_cross_attention true,
// tie_word_embeddings false. Dropout rates are ignored (inference does not
// use them; lmps trains without).
absl::StatusOr<ModelConfig> ParseHfGpt2ConfigJson(absl::string_view json,
                                                  absl::string_view source);

// "n_layer=4 n_head=4 n_embd=128 block_size=64 vocab_size=256".
std::string ModelConfigSummary(const ModelConfig& config);

}  // namespace lmps

#endif  // LMPS_COMMON_FORMATS_HF_GPT2_H_
