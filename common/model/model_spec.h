// GPT-2 parameter inventory: the name, shape, initialisation and weight-decay
// flag of every parameter tensor, as a pure function of the model config.
// Servers, the scheduler and workers all derive the same list from it.
//
// Tensor names and shapes (L = n_layer, C = n_embd, V = vocab, T = block):
//   wte.weight              (V, C)     token embedding, tied to the LM head
//   wpe.weight              (T, C)     learned position embedding
//   h.{l}.ln_1.weight/bias  (C)
//   h.{l}.attn.c_attn.weight (3C, C)  qkv projection, out x in (nn.Linear)
//   h.{l}.attn.c_attn.bias  (3C)
//   h.{l}.attn.c_proj.weight (C, C)   residual projection
//   h.{l}.attn.c_proj.bias  (C)
//   h.{l}.ln_2.weight/bias  (C)
//   h.{l}.mlp.c_fc.weight   (4C, C)
//   h.{l}.mlp.c_fc.bias     (4C)
//   h.{l}.mlp.c_proj.weight (C, 4C)   residual projection
//   h.{l}.mlp.c_proj.bias   (C)
//   ln_f.weight/bias        (C)
// Matrices are stored out x in (PyTorch nn.Linear layout): y = x W^T + b.
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_MODEL_MODEL_SPEC_H_
#define LMPS_COMMON_MODEL_MODEL_SPEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "proto/lmps.pb.h"

namespace lmps {

enum class InitKind { kNormal, kZeros, kOnes };

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  InitKind init = InitKind::kNormal;
  float init_std = 0.02f;     // for kNormal
  bool weight_decay = false;  // true for rank >= 2 tensors
  int64_t num_elements() const;
};

// Checks the model hyper-parameters (positive, n_embd % n_head == 0).
absl::Status ValidateModelConfig(const ModelConfig& config);

// Every parameter tensor of the GPT-2 model, in the canonical order above.
// GPT-2 initialisation: normal(0, 0.02); residual projections (c_proj)
// normal(0, 0.02 / sqrt(2 L)); biases 0; LayerNorm gains 1.
std::vector<TensorSpec> GptTensorSpecs(const ModelConfig& config);

// Total number of parameters.
int64_t GptNumParameters(const ModelConfig& config);

}  // namespace lmps

#endif  // LMPS_COMMON_MODEL_MODEL_SPEC_H_
