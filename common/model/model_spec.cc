#include "common/model/model_spec.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace lmps {

int64_t TensorSpec::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::Status ValidateModelConfig(const ModelConfig& c) {
  if (c.n_layer() <= 0 || c.n_head() <= 0 || c.n_embd() <= 0 ||
      c.block_size() <= 0 || c.vocab_size() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model: n_layer, n_head, n_embd, block_size and vocab_size must be "
        "positive (got n_layer=",
        c.n_layer(), " n_head=", c.n_head(), " n_embd=", c.n_embd(),
        " block_size=", c.block_size(), " vocab_size=", c.vocab_size(), ")"));
  }
  if (c.n_embd() % c.n_head() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model: n_embd (", c.n_embd(),
                     ") must be divisible by n_head (", c.n_head(), ")"));
  }
  return absl::OkStatus();
}

std::vector<TensorSpec> GptTensorSpecs(const ModelConfig& c) {
  const int64_t C = c.n_embd(), V = c.vocab_size(), T = c.block_size();
  const float proj_std = 0.02f / std::sqrt(2.0f * c.n_layer());
  std::vector<TensorSpec> specs;
  auto matrix = [&](std::string name, int64_t out, int64_t in, float std) {
    specs.push_back({std::move(name), {out, in}, InitKind::kNormal, std, true});
  };
  auto vec = [&](std::string name, int64_t n, InitKind init) {
    specs.push_back({std::move(name), {n}, init, 0.0f, false});
  };
  matrix("wte.weight", V, C, 0.02f);
  matrix("wpe.weight", T, C, 0.02f);
  for (int l = 0; l < c.n_layer(); ++l) {
    const std::string p = absl::StrCat("h.", l, ".");
    vec(p + "ln_1.weight", C, InitKind::kOnes);
    vec(p + "ln_1.bias", C, InitKind::kZeros);
    matrix(p + "attn.c_attn.weight", 3 * C, C, 0.02f);
    vec(p + "attn.c_attn.bias", 3 * C, InitKind::kZeros);
    matrix(p + "attn.c_proj.weight", C, C, proj_std);
    vec(p + "attn.c_proj.bias", C, InitKind::kZeros);
    vec(p + "ln_2.weight", C, InitKind::kOnes);
    vec(p + "ln_2.bias", C, InitKind::kZeros);
    matrix(p + "mlp.c_fc.weight", 4 * C, C, 0.02f);
    vec(p + "mlp.c_fc.bias", 4 * C, InitKind::kZeros);
    matrix(p + "mlp.c_proj.weight", C, 4 * C, proj_std);
    vec(p + "mlp.c_proj.bias", C, InitKind::kZeros);
  }
  vec("ln_f.weight", C, InitKind::kOnes);
  vec("ln_f.bias", C, InitKind::kZeros);
  return specs;
}

int64_t GptNumParameters(const ModelConfig& c) {
  int64_t n = 0;
  for (const TensorSpec& s : GptTensorSpecs(c)) n += s.num_elements();
  return n;
}

}  // namespace lmps
