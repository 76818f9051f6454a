// GptModel: a GPT-2 (pre-LayerNorm, GELU-tanh MLP, learned positions, LM
// head tied to the token embedding) whose forward and backward passes run
// on a Backend.
//
// Memory: the model owns, in backend memory,
// - a flat parameter buffer and a flat gradient buffer, both laid out
//   exactly as GptTensorSpecs(config) (common/model/model_spec.h): tensors in
//   that order, each row-major with that shape, matrices out x in;
// - the activations of one forward pass of up to max_batch x max_seq
//   tokens (what the backward pass needs), and the activation gradients.
//
// Training protocol:
//   model->ZeroGrad();
//   for each micro-batch m of M:
//     loss = model->Forward(tokens_m, targets_m, B, T);   // mean over B*T
//     model->Backward(/*grad_scale=*/1.0f / M);
//   ... apply an optimiser to params() using grads() ...
// Backward ACCUMULATES grad_scale * d(mean loss)/d(params) into grads(), so
// the caller decides the scale of the accumulated gradient (1/M above gives
// the gradient of the mean loss over all micro-batches).
//
// Host pointers (tokens, targets, the *Host functions) are ordinary host
// memory; the model copies them to and from the backend.
//
// Why this is not a facade over StageModel (stage_model.h), which
// generalises it: GptModel is the independent one-process reference that
// StageModel is proven against. stage_model_test checks that a single-stage,
// single-rank StageModel equals it bit for bit and that every pipeline and
// tensor-parallel layout reproduces its loss and gradients, and
// worker/testing/full_batch_gradient.h uses it as the one-process truth of
// the trainer tests; as a facade those checks would compare StageModel with
// itself. It also keeps the logits (LogitsToHost: sampling, evaluation),
// where StageModel's head keeps only the probabilities.
//
// Thread-safety: not thread-safe; one thread uses a model (and its backend)
// at a time.
#ifndef LMPS_WORKER_MODEL_GPT_H_
#define LMPS_WORKER_MODEL_GPT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "common/model/model_spec.h"
#include "proto/lmps.pb.h"
#include "worker/backend/backend.h"
#include "worker/model/gradient_ready.h"
#include "worker/model/sampling.h"

namespace lmps {

class GptModel {
 public:
  // `backend` must outlive the model. max_batch >= 1 and
  // 1 <= max_seq <= config.block_size() bound the B and T of Forward.
  // InvalidArgumentError for a bad config or bounds; the backend's error
  // when allocation fails. Parameters and gradients start at zero (see
  // InitParameters / SetParametersFromHost).
  static absl::StatusOr<std::unique_ptr<GptModel>> Create(
      const ModelConfig& config, Backend* backend, int max_batch,
      int max_seq);

  GptModel(const GptModel&) = delete;
  GptModel& operator=(const GptModel&) = delete;
  ~GptModel();

  const ModelConfig& config() const { return config_; }
  Backend* backend() const { return backend_; }
  int max_batch() const { return max_batch_; }
  int max_seq() const { return max_seq_; }

  // Parameters, in GptTensorSpecs order.
  const std::vector<TensorSpec>& tensor_specs() const { return specs_; }
  int64_t num_parameters() const { return num_parameters_; }
  // Flat buffers of num_parameters() floats in backend memory.
  float* params() { return params_; }
  const float* params() const { return params_; }
  float* grads() { return grads_; }
  const float* grads() const { return grads_; }
  // Offset (in floats) of a tensor in params()/grads(); NotFoundError for
  // an unknown name.
  absl::StatusOr<int64_t> TensorOffset(std::string_view name) const;

  // Host <-> backend copies of whole buffers (num_parameters() floats).
  absl::Status SetParametersFromHost(const float* host);
  absl::Status ParametersToHost(float* host) const;
  absl::Status GradientsToHost(float* host) const;

  // GPT-2 initialisation from the specs (normal(0, init_std), zeros, ones).
  // Element i of tensor `name` is init_std * StandardNormal(StableKey(seed,
  // name), i) (common/model/rng.h), so any process can reproduce any slice.
  absl::Status InitParameters(uint64_t seed);

  // Runs the forward pass on host tokens[B,T] (values in [0, V)). With
  // host targets[B,T] (in [0, V)) it also computes the cross-entropy and
  // returns its mean over B*T and enables Backward(); with targets ==
  // nullptr it only computes the logits and returns 0.
  // InvalidArgumentError for B outside [1, max_batch], T outside
  // [1, max_seq], or a token/target outside [0, V).
  //
  // `params_ready` (may be empty; layer-wise pulls, worker/layerwise_pull.h)
  // is called with `end` before the pass first reads params()[0, end),
  // with growing ends in forward order: the end of wpe (before the
  // embedding), of block l (before block l), and num_parameters() (before
  // ln_f and the tied head); the caller puts those parameters in place
  // (e.g. with backend()->CopyToBackend) before returning OK. A non-OK
  // status stops the pass, which returns it.
  using ParametersReadyFn = std::function<absl::Status(int64_t end)>;
  absl::StatusOr<float> Forward(const int32_t* tokens, const int32_t* targets,
                                int B, int T,
                                const ParametersReadyFn& params_ready = nullptr);

  // Copies the logits [B,T,V] of the last Forward to host memory.
  // FailedPreconditionError before any Forward.
  absl::Status LogitsToHost(float* host) const;

  // Called by Backward each time a range [begin, end) of elements of
  // grads() has received its last contribution of that Backward: on the
  // last micro-batch of a step, that range of the accumulated gradient is
  // final while the backward pass goes on (a caller overlaps sending it with
  // the rest of the pass). The ranges of one Backward are disjoint, come in
  // decreasing order and together cover [0, num_parameters()): ln_f, then
  // the blocks from the last to the first, then wte and wpe (wte last: the
  // tied head's gradient lands there too). Called on the thread running
  // Backward, after the work writing the range was issued: it may read the
  // range with backend()->CopyToHost (which waits for that work), must not
  // write grads() or call other GptModel methods. A non-OK status stops
  // Backward, which returns it (grads() is then partly accumulated).
  using GradientReadyFn = ::lmps::GradientReadyFn;  // gradient_ready.h

  // Accumulates grad_scale * d(mean loss of the last Forward)/d(params)
  // into grads() (+=), calling `on_ready` (if not empty) as ranges of it
  // are done (see GradientReadyFn). FailedPreconditionError unless the last
  // Forward had targets. Backward may be called once per Forward.
  absl::Status Backward(float grad_scale = 1.0f,
                        const GradientReadyFn& on_ready = nullptr);

  // grads() = 0.
  void ZeroGrad();

  // Autoregressive sampling of n_new tokens after `prompt` (non-empty, in
  // [0, V)); returns the n_new new tokens. The context is cropped to the
  // last max_seq tokens. temperature == 0: greedy (argmax, lowest index on
  // ties). temperature > 0: sample from softmax(logits / temperature),
  // restricted to the top_k most likely tokens when top_k > 0 (tokens tied
  // with the k-th are kept too), using the counter RNG keyed by `seed`: the
  // result is a pure function of the parameters, prompt and arguments.
  // Overwrites the activations, so the next Backward needs a new Forward.
  // InvalidArgumentError for bad arguments.
  absl::StatusOr<std::vector<int32_t>> Generate(
      absl::Span<const int32_t> prompt, int n_new, float temperature,
      int top_k, uint64_t seed);
  // The same with every sampling option (sampling.h: top_p, a vocabulary
  // limit for padded vocabularies). With stop_token >= 0, generation ends
  // early after producing it (it is not returned).
  absl::StatusOr<std::vector<int32_t>> Generate(
      absl::Span<const int32_t> prompt, int n_new,
      const SamplingOptions& sampling, uint64_t seed,
      int32_t stop_token = -1);

 private:
  // Pointers to the tensors of one flat buffer (parameters or gradients).
  struct LayerTensors {
    float* ln1w;      // (C)
    float* ln1b;      // (C)
    float* qkvw;      // (3C, C)
    float* qkvb;      // (3C)
    float* attprojw;  // (C, C)
    float* attprojb;  // (C)
    float* ln2w;      // (C)
    float* ln2b;      // (C)
    float* fcw;       // (4C, C)
    float* fcb;       // (4C)
    float* fcprojw;   // (C, 4C)
    float* fcprojb;   // (C)
  };
  struct Tensors {
    float* wte;  // (V, C)
    float* wpe;  // (maxT, C)
    std::vector<LayerTensors> layers;
    float* lnfw;  // (C)
    float* lnfb;  // (C)
  };
  // Forward activations of one layer, sized for max_batch x max_seq.
  struct LayerActivations {
    float* ln1;        // (B, T, C)
    float* ln1_mean;   // (B, T)
    float* ln1_rstd;   // (B, T)
    float* qkv;        // (B, T, 3C)
    float* atty;       // (B, T, C)
    float* att;        // (B, NH, T, T)
    float* attproj;    // (B, T, C)
    float* residual2;  // (B, T, C)
    float* ln2;        // (B, T, C)
    float* ln2_mean;   // (B, T)
    float* ln2_rstd;   // (B, T)
    float* fch;        // (B, T, 4C)
    float* fch_gelu;   // (B, T, 4C)
    float* fcproj;     // (B, T, C)
    float* residual3;  // (B, T, C)
  };

  GptModel(const ModelConfig& config, Backend* backend, int max_batch,
           int max_seq);
  absl::Status Allocate();
  // Allocates `n` floats of backend memory owned by the model.
  absl::StatusOr<float*> AllocOwned(size_t n);
  Tensors BindTensors(float* base) const;
  absl::Status CheckTokens(const int32_t* tokens, const char* what,
                           size_t n) const;

  const ModelConfig config_;
  Backend* const backend_;
  const int max_batch_;
  const int max_seq_;
  const std::vector<TensorSpec> specs_;
  std::vector<int64_t> offsets_;  // parallel to specs_
  int64_t num_parameters_ = 0;

  std::vector<float*> owned_;  // every float buffer, freed in ~GptModel
  float* params_ = nullptr;
  float* grads_ = nullptr;
  Tensors p_;  // into params_
  Tensors g_;  // into grads_

  // Forward activations.
  int32_t* tokens_ = nullptr;   // (B, T)
  int32_t* targets_ = nullptr;  // (B, T)
  float* encoded_ = nullptr;    // (B, T, C)
  std::vector<LayerActivations> acts_;
  float* lnf_ = nullptr;        // (B, T, C)
  float* lnf_mean_ = nullptr;   // (B, T)
  float* lnf_rstd_ = nullptr;   // (B, T)
  float* logits_ = nullptr;     // (B, T, V)
  float* probs_ = nullptr;      // (B, T, V)
  float* losses_ = nullptr;     // (B, T)

  // Activation gradients, shared by all layers (each layer consumes its own
  // before the next one is computed).
  float* dresidual_ = nullptr;  // (B, T, C) the residual stream
  float* dln_ = nullptr;        // (B, T, C) LayerNorm outputs
  float* dqkv_ = nullptr;       // (B, T, 3C)
  float* datty_ = nullptr;      // (B, T, C)
  float* datt_ = nullptr;       // (B, NH, T, T) attention scratch
  float* dfch_ = nullptr;       // (B, T, 4C)
  float* dfch_gelu_ = nullptr;  // (B, T, 4C)
  float* dlogits_ = nullptr;    // (B, T, V)

  // Shape of the last Forward; 0 before any.
  int last_B_ = 0;
  int last_T_ = 0;
  bool backward_ready_ = false;  // last Forward had targets, no Backward yet
  std::vector<float> host_losses_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_MODEL_GPT_H_
