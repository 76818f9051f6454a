#include "common/formats/hf_gpt2.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace lmps {
namespace {

constexpr double kLmpsLayerNormEps = 1e-5;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

bool IsHfConv1DWeight(absl::string_view name) {
  if (!absl::StartsWith(name, "h.")) return false;
  return absl::EndsWith(name, ".attn.c_attn.weight") ||
         absl::EndsWith(name, ".attn.c_proj.weight") ||
         absl::EndsWith(name, ".mlp.c_fc.weight") ||
         absl::EndsWith(name, ".mlp.c_proj.weight");
}

std::vector<int64_t> HfGpt2Shape(const TensorSpec& spec) {
  if (!IsHfConv1DWeight(spec.name) || spec.shape.size() != 2) return spec.shape;
  return {spec.shape[1], spec.shape[0]};
}

bool IsHfGpt2AttentionBuffer(absl::string_view name, int64_t* layer) {
  if (!absl::ConsumePrefix(&name, "h.")) return false;
  const size_t dot = name.find('.');
  if (dot == absl::string_view::npos || dot == 0) return false;
  int64_t l = 0;
  if (!absl::SimpleAtoi(name.substr(0, dot), &l) || l < 0) return false;
  for (char c : name.substr(0, dot)) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  const absl::string_view rest = name.substr(dot + 1);
  if (rest != "attn.bias" && rest != "attn.masked_bias") return false;
  if (layer != nullptr) *layer = l;
  return true;
}

std::vector<float> TransposeMatrix(const std::vector<float>& m, int64_t rows,
                                   int64_t cols) {
  std::vector<float> out(m.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[c * rows + r] = m[r * cols + c];
  }
  return out;
}

absl::StatusOr<std::vector<SafeTensor>> LmpsToHfGpt2(
    const ModelConfig& config, const std::vector<SafeTensor>& tensors) {
  const std::vector<TensorSpec> specs = GptTensorSpecs(config);
  if (tensors.size() != specs.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the model ", ModelConfigSummary(config), " has ",
                     specs.size(), " tensors, got ", tensors.size()));
  }
  std::vector<SafeTensor> out;
  out.reserve(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& spec = specs[i];
    const SafeTensor& t = tensors[i];
    if (t.name != spec.name || t.shape != spec.shape ||
        static_cast<int64_t>(t.data.size()) != spec.num_elements()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor ", i, " is '", t.name, "' of shape ", ShapeString(t.shape),
          " with ", t.data.size(), " values; the model needs '", spec.name,
          "' of shape ", ShapeString(spec.shape)));
    }
    SafeTensor hf;
    hf.name = absl::StrCat(kHfGpt2Prefix, spec.name);
    hf.shape = HfGpt2Shape(spec);
    hf.data = IsHfConv1DWeight(spec.name)
                  ? TransposeMatrix(t.data, spec.shape[0], spec.shape[1])
                  : t.data;
    out.push_back(std::move(hf));
  }
  return out;
}

std::string HfGpt2ConfigJson(const ModelConfig& c) {
  // GPT-2's own BPE vocabulary ends with <|endoftext|> (50256), its bos and
  // eos; lmps's byte-level vocabulary has no such token.
  const std::string special =
      c.vocab_size() == 50257 ? std::string("50256") : std::string("null");
  std::string j = "{\n";
  auto field = [&j](absl::string_view key, absl::string_view value) {
    if (j.size() > 2) j.append(",\n");
    absl::StrAppend(&j, "  \"", key, "\": ", value);
  };
  field("activation_function", "\"gelu_new\"");
  field("architectures", "[\n    \"GPT2LMHeadModel\"\n  ]");
  field("attn_pdrop", "0.0");
  field("bos_token_id", special);
  field("embd_pdrop", "0.0");
  field("eos_token_id", special);
  field("initializer_range", "0.02");
  field("layer_norm_epsilon", "1e-05");
  field("model_type", "\"gpt2\"");
  field("n_ctx", absl::StrCat(c.block_size()));
  field("n_embd", absl::StrCat(c.n_embd()));
  field("n_head", absl::StrCat(c.n_head()));
  field("n_inner", "null");
  field("n_layer", absl::StrCat(c.n_layer()));
  field("n_positions", absl::StrCat(c.block_size()));
  field("reorder_and_upcast_attn", "false");
  field("resid_pdrop", "0.0");
  field("scale_attn_by_inverse_layer_idx", "false");
  field("scale_attn_weights", "true");
  field("tie_word_embeddings", "true");
  field("torch_dtype", "\"float32\"");
  field("use_cache", "true");
  field("vocab_size", absl::StrCat(c.vocab_size()));
  j.append("\n}\n");
  return j;
}

absl::StatusOr<ModelConfig> ParseHfGpt2ConfigJson(absl::string_view text,
                                                  absl::string_view source) {
  using json = nlohmann::json;
  const json j = json::parse(text.begin(), text.end(), /*cb=*/nullptr,
                             /*allow_exceptions=*/false);
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
  };
  if (j.is_discarded() || !j.is_object()) {
    return error("not a JSON object (a transformers GPT-2 config.json)");
  }
  auto present = [&](const char* key) -> const json* {
    auto it = j.find(key);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  auto integer = [&](const char* key,
                     int64_t fallback) -> absl::StatusOr<int64_t> {
    const json* v = present(key);
    if (v == nullptr) return fallback;
    if (!v->is_number_integer()) {
      return error(absl::StrCat("\"", key, "\" is not an integer"));
    }
    const int64_t n = v->get<int64_t>();
    if (n <= 0 || n > std::numeric_limits<int32_t>::max()) {
      return error(absl::StrCat("\"", key, "\" = ", n, " is out of range"));
    }
    return n;
  };
  auto boolean = [&](const char* key, bool fallback) -> absl::StatusOr<bool> {
    const json* v = present(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) {
      return error(absl::StrCat("\"", key, "\" is not true or false"));
    }
    return v->get<bool>();
  };
  auto string = [&](const char* key,
                    absl::string_view fallback) -> absl::StatusOr<std::string> {
    const json* v = present(key);
    if (v == nullptr) return std::string(fallback);
    if (!v->is_string()) {
      return error(absl::StrCat("\"", key, "\" is not a string"));
    }
    return v->get<std::string>();
  };
  // GPT2Config's defaults (GPT-2 small).
  ModelConfig c;
  struct IntField {
    const char* key;
    int64_t fallback;
    void (ModelConfig::*set)(int32_t);
  };
  for (const IntField& f :
       {IntField{"n_layer", 12, &ModelConfig::set_n_layer},
        IntField{"n_head", 12, &ModelConfig::set_n_head},
        IntField{"n_embd", 768, &ModelConfig::set_n_embd},
        IntField{"n_positions", 1024, &ModelConfig::set_block_size},
        IntField{"vocab_size", 50257, &ModelConfig::set_vocab_size}}) {
    absl::StatusOr<int64_t> v = integer(f.key, f.fallback);
    if (!v.ok()) return v.status();
    (c.*f.set)(static_cast<int32_t>(*v));
  }
  const std::string unlike = "; lmps implements GPT-2 with ";

  absl::StatusOr<std::string> type = string("model_type", "gpt2");
  if (!type.ok()) return type.status();
  if (*type != "gpt2") {
    return error(absl::StrCat("model_type \"", *type,
                              "\" is not \"gpt2\" (lmps's model is GPT-2)"));
  }
  absl::StatusOr<std::string> act = string("activation_function", "gelu_new");
  if (!act.ok()) return act.status();
  if (*act != "gelu_new" && *act != "gelu_pytorch_tanh" &&
      *act != "gelu_fast") {
    return error(
        absl::StrCat("activation_function \"", *act, "\"", unlike,
                     "GELU in the tanh approximation (\"gelu_new\", also "
                     "\"gelu_pytorch_tanh\" or \"gelu_fast\")"));
  }
  if (const json* eps = present("layer_norm_epsilon")) {
    if (!eps->is_number())
      return error("\"layer_norm_epsilon\" is not a number");
    const double e = eps->get<double>();
    if (std::fabs(e - kLmpsLayerNormEps) > 1e-12) {
      return error(
          absl::StrCat("layer_norm_epsilon ", e, unlike, "LayerNorm eps 1e-5"));
    }
  }
  if (const json* inner = present("n_inner")) {
    if (!inner->is_number_integer() ||
        inner->get<int64_t>() != 4 * static_cast<int64_t>(c.n_embd())) {
      return error(absl::StrCat("n_inner ", inner->dump(), unlike,
                                "an MLP of width 4 n_embd = ", 4 * c.n_embd()));
    }
  }
  struct Flag {
    const char* key;
    bool fallback, lmps;
    const char* what;
  };
  for (const Flag& f : {
           Flag{"scale_attn_weights", true, true,
                "attention scores scaled by 1/sqrt(head size)"},
           Flag{"scale_attn_by_inverse_layer_idx", false, false,
                "attention not scaled by layer"},
           Flag{"add_cross_attention", false, false, "no cross-attention"},
           Flag{"tie_word_embeddings", true, true, "the LM head tied to wte"},
       }) {
    absl::StatusOr<bool> v = boolean(f.key, f.fallback);
    if (!v.ok()) return v.status();
    if (*v != f.lmps) {
      return error(
          absl::StrCat(f.key, " ", *v ? "true" : "false", unlike, f.what));
    }
  }
  if (absl::Status s = ValidateModelConfig(c); !s.ok()) {
    return error(s.message());
  }
  return c;
}

std::string ModelConfigSummary(const ModelConfig& c) {
  return absl::StrCat("n_layer=", c.n_layer(), " n_head=", c.n_head(),
                      " n_embd=", c.n_embd(), " block_size=", c.block_size(),
                      " vocab_size=", c.vocab_size());
}

}  // namespace lmps
