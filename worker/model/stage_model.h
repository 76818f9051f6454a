// StageModel: the part of a GPT-2 (see gpt.h) that one worker of a
// pipeline-parallel x tensor-parallel layout computes. It generalises
// GptModel: with the whole layer range, both ends and tp_size == 1 it
// computes exactly what GptModel computes (same tensors, same order, same
// backend calls).
//
// Pipeline parallelism: a stage holds the transformer blocks
// [layer_begin, layer_end); the first stage (has_embedding) also holds the
// token/position embedding and reads tokens, the last stage (has_head) holds
// ln_f and the LM head tied to wte and computes the loss. Between stages the
// residual stream [B,T,C] travels in host memory (Forward's output is the
// next stage's input; Backward's dinput is the previous stage's doutput).
// Several micro-batches can be in flight (1F1B, GPipe): each one lives in an
// activation slot until its Backward (or ReleaseSlot).
//
// Tensor parallelism (Megatron-LM, arXiv:1909.08053): inside each block the
// tp ranks split the heads and the MLP hidden units, tp = tp_size,
// r = tp_rank, C = n_embd, Cl = C/tp, NH = n_head (NH % tp == 0):
//   attn.c_attn  (3C, C)  column-parallel -> local (3Cl, C): rows
//                         [r*Cl, (r+1)*Cl) of the q block, then the same rows
//                         of the k block (+C), then of the v block (+2C);
//                         bias (3C) -> (3Cl) likewise. The rank owns heads
//                         [r*NH/tp, (r+1)*NH/tp) whole (head size unchanged).
//   attn.c_proj  (C, C)   row-parallel -> local (C, Cl): columns
//                         [r*Cl, (r+1)*Cl) of every row; bias (C) replicated.
//   mlp.c_fc     (4C, C)  column-parallel -> local (4C/tp, C): rows
//                         [r*4C/tp, (r+1)*4C/tp); bias (4C) -> (4C/tp).
//   mlp.c_proj   (C, 4C)  row-parallel -> local (C, 4C/tp): columns
//                         [r*4C/tp, (r+1)*4C/tp); bias (C) replicated.
//   wte, wpe, ln_1, ln_2, ln_f: replicated (full shape on every rank).
// The output of a row-parallel layer is a partial sum, all-reduced (sum)
// over the tp group; its replicated bias is added once, by tp rank 0, and
// only tp rank 0 accumulates its gradient (the others' stays 0). Backward
// uses the conjugate operators: the replicated input of a column-parallel
// layer (the ln_1/ln_2 output) gets a partial gradient on each rank, which
// is all-reduced before the LayerNorm backward. Embeddings, LayerNorms and
// the head run redundantly on every tp rank on identical inputs, so their
// gradients are identical on every rank. Collectives per micro-batch: two
// all-reduces of N*C floats per block in Forward and two in Backward, in a
// fixed order.
//
// Sequence parallelism (sequence_parallel, tp > 1; Korthikanti et al.
// 2022): outside the column/row-parallel pairs the activations are split
// along the tokens (worker/model/tp_collectives.h: rank r holds tokens
// [r*N/tp, (r+1)*N/tp) of the flattened [B,T]). The residual stream, the
// LayerNorms and their outputs live at 1/tp; a column-parallel layer's input
// is the all-gather of the local LayerNorm output (re-gathered in Backward
// rather than kept), a row-parallel layer's output is reduce-scattered
// instead of all-reduced; Backward uses the conjugates (reduce-scatter of
// the partial input gradient, all-gather of the output gradient). The
// LayerNorm parameters' gradients are partial sums over the local tokens:
// each micro-batch's are all-reduced (one 4C all-reduce per block, 2C for
// ln_f) before they are accumulated, so every rank holds the full gradient
// (and tp rank 0 pushes it, as without sequence parallelism). Forward's
// input/output and Backward's doutput/dinput are the rank's token chunk
// [B*T/tp, C] (stages exchange chunks rank to rank). The first stage's
// embedding is computed for all tokens and reduce-scattered (vocab
// parallel) or sliced. Requires max_seq % tp == 0 and B*T % tp == 0.
//
// Vocabulary parallelism (vocab_parallel, tp > 1; Megatron-LM's
// VocabParallelEmbedding and vocab-parallel cross-entropy): wte (V, C) is
// split by rows, rank r holding rows [r*V/tp, (r+1)*V/tp) -> (V/tp, C)
// (V % tp == 0). The embedding masks the tokens other ranks hold and sums
// the partial embeddings over the group (all-reduce, or reduce-scatter with
// sequence parallelism); the tied head computes its logit columns
// [N, V/tp] only, and the cross-entropy all-reduces the per-token max, sum
// of exponentials and target logit (tp_collectives.h); the head's input
// gradient is a partial sum, all-reduced (reduce-scattered with sequence
// parallelism). The wte gradient of each rank is its slice's, pushed by
// every rank. LogitsToHost then copies the rank's [B,T,V/tp] columns.
//
// Memory (backend memory, owned by the model):
// - a flat parameter buffer and a flat gradient buffer holding only this
//   worker's local tensors (local_tensors(): canonical GptTensorSpecs order
//   restricted to the stage, local shapes, back to back);
// - per activation slot, the forward activations the backward pass needs
//   for max_batch x max_seq tokens (GptModel's set with local widths; the
//   head keeps probs, not logits); activation_memory() reports them;
// - shared scratch: the row-parallel outputs before the residual add, the
//   logits/dlogits, and the activation gradients (one Backward at a time).
//
// Training protocol (one step, M micro-batches, any schedule):
//   model->ZeroGrad();
//   Forward(slot, ...) of micro-batch m into a free slot ... ;
//   Backward(slot, doutput, /*grad_scale=*/1.0f / M, dinput) ... ;
// Backward ACCUMULATES grad_scale * d(mean loss)/d(local params) (+=).
//
// Thread-safety: not thread-safe; one thread uses a model (and its backend
// and TpComm) at a time.
#ifndef LMPS_WORKER_MODEL_STAGE_MODEL_H_
#define LMPS_WORKER_MODEL_STAGE_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "proto/lmps.pb.h"
#include "worker/backend/backend.h"
#include "worker/model/gradient_ready.h"
#include "worker/model/tp_collectives.h"
#include "worker/model/tp_comm.h"

namespace lmps {

struct StageModelOptions {
  ModelConfig config;
  int layer_begin = 0, layer_end = 0;  // transformer blocks [begin, end)
  bool has_embedding = false;  // first stage: wte/wpe lookup from tokens
  bool has_head = false;       // last stage: ln_f, tied LM head, loss
  int tp_size = 1, tp_rank = 0;
  bool sequence_parallel = false;  // see above; no-op when tp_size == 1
  bool vocab_parallel = false;     // see above; no-op when tp_size == 1
  int max_batch = 1, max_seq = 1;  // bounds of B and T
  int activation_slots = 1;  // micro-batches whose activations may coexist
};

// One local tensor of a stage.
struct LocalTensor {
  std::string name;  // global name, e.g. "h.3.attn.c_attn.weight"
  std::vector<int64_t> local_shape;  // this tp rank's part (see above)
  int64_t offset = 0;                // in floats, in params()/grads()
  int64_t num_elements() const;
};

class StageModel {
 public:
  // `backend` (and `comm`) must outlive the model. `comm` may be null iff
  // options.tp_size == 1; otherwise its size()/rank() must equal
  // tp_size/tp_rank. InvalidArgumentError for a bad config, layer range
  // (0 <= begin <= end <= n_layer, and the stage must hold something),
  // tp layout (n_head % tp_size == 0, 0 <= tp_rank < tp_size; with
  // sequence_parallel max_seq % tp_size == 0, with vocab_parallel
  // vocab_size % tp_size == 0), bounds
  // (max_batch >= 1, 1 <= max_seq <= block_size, activation_slots >= 1);
  // the backend's error when allocation fails. Parameters and gradients
  // start at zero.
  static absl::StatusOr<std::unique_ptr<StageModel>> Create(
      const StageModelOptions& options, Backend* backend, TpComm* comm);

  StageModel(const StageModel&) = delete;
  StageModel& operator=(const StageModel&) = delete;
  ~StageModel();

  const StageModelOptions& options() const { return options_; }
  const ModelConfig& config() const { return options_.config; }
  Backend* backend() const { return backend_; }

  // Local parameters.
  const std::vector<LocalTensor>& local_tensors() const { return tensors_; }
  int64_t num_parameters() const { return num_parameters_; }
  // Flat buffers of num_parameters() floats in backend memory.
  float* params() { return params_; }
  const float* params() const { return params_; }
  float* grads() { return grads_; }
  const float* grads() const { return grads_; }
  // Offset (in floats) of local tensor `name` (global name) in
  // params()/grads(); NotFoundError if this stage does not hold it.
  absl::StatusOr<int64_t> TensorOffset(std::string_view name) const;

  // Host <-> backend copies of the whole local buffers (num_parameters()
  // floats).
  absl::Status SetParametersFromHost(const float* host);
  absl::Status ParametersToHost(float* host) const;
  absl::Status GradientsToHost(float* host) const;
  // grads() = 0.
  void ZeroGrad();

  // Forward of one micro-batch into activation slot `slot` (in
  // [0, activation_slots), not holding a forward).
  // tokens: host [B,T] in [0, V), required when has_embedding (else
  //   ignored); input: host [B,T,C] (the rank's [B*T/tp, C] chunk with
  //   sequence parallelism, as output, doutput and dinput), the previous
  //   stage's output, required when !has_embedding (else ignored).
  // targets: host [B,T] in [0, V), used when has_head (ignored otherwise);
  //   may be null there to compute the logits only (see LogitsToHost; such
  //   a forward cannot be backwarded).
  // has_head: returns the mean loss over B*T (0 without targets) and
  //   ignores `output`. Otherwise writes output: host [B,T,C] (the residual
  //   stream after block layer_end-1) and returns 0.
  // The slot holds the micro-batch until Backward or ReleaseSlot.
  // InvalidArgumentError for a bad slot, B outside [1, max_batch], T
  // outside [1, max_seq], a null required pointer or a token/target outside
  // [0, V); FailedPreconditionError when the slot is busy; the TpComm's
  // error (the slot stays free then).
  absl::StatusOr<float> Forward(int slot, const int32_t* tokens,
                                const float* input, const int32_t* targets,
                                float* output, int B, int T);

  // Backward of the micro-batch in `slot`, which is freed.
  // has_head: starts from the mean loss scaled by grad_scale (d objective /
  //   d mean loss, e.g. 1/M) and ignores doutput. Otherwise doutput: host
  //   [B,T,C], the gradient of the objective w.r.t. this stage's output
  //   (already scaled; grad_scale is ignored).
  // Accumulates (+=) the local parameter gradients. When !has_embedding
  // writes dinput: host [B,T,C], the gradient w.r.t. the input activation;
  // otherwise it goes into the wte/wpe gradients and dinput is ignored.
  // InvalidArgumentError for a bad slot or a null required pointer;
  // FailedPreconditionError when the slot holds no forward or (has_head) a
  // forward without targets. On a TpComm error the slot is freed and the
  // gradients are partial: the step must be abandoned.
  // `on_ready` (may be empty), for the step's last Backward: called as in
  // GptModel::GradientReadyFn each time a range of grads() is final: the
  // head's ln_f (has_head), then each block from the last to the first,
  // then the front of the buffer (wte/wpe), in decreasing disjoint ranges
  // covering [0, num_parameters()).
  using GradientReadyFn = ::lmps::GradientReadyFn;  // gradient_ready.h
  absl::Status Backward(int slot, const float* doutput, float grad_scale,
                        float* dinput,
                        const GradientReadyFn& on_ready = nullptr);

  // has_head: copies the logits [B,T,V] of the targets-less Forward held by
  // `slot` to host memory. FailedPreconditionError otherwise.
  absl::Status LogitsToHost(int slot, float* host) const;

  // Forgets the forward held by `slot` (evaluation); no-op if it is free or
  // out of range.
  void ReleaseSlot(int slot);
  bool slot_in_use(int slot) const;
  int slots_in_use() const;
  // The most slots in use at once since Create / ResetMaxSlotsInUse.
  int max_slots_in_use() const { return max_slots_in_use_; }
  void ResetMaxSlotsInUse();

  // Bytes of backend memory for activations (not parameters/gradients).
  struct ActivationMemory {
    int64_t per_slot = 0;  // one activation slot (max_batch x max_seq)
    // Of per_slot: the LayerNorm region (the stage input / residual
    // stream, the LayerNorm outputs and their mean/rstd) -- what sequence
    // parallelism divides by tp.
    int64_t layernorm_region_per_slot = 0;
    int64_t scratch = 0;   // shared by all slots (gathers, gradients, logits)
  };
  const ActivationMemory& activation_memory() const { return memory_; }
  // max_slots_in_use() * per_slot + scratch: the activation bytes the
  // schedule since ResetMaxSlotsInUse needed at its peak.
  int64_t peak_activation_bytes() const {
    return max_slots_in_use_ * memory_.per_slot + memory_.scratch;
  }

 private:
  // Pointers to the local tensors of one flat buffer (parameters or
  // gradients); null for tensors the stage does not hold. Local shapes.
  struct LayerTensors {
    float* ln1w;      // (C)
    float* ln1b;      // (C)
    float* qkvw;      // (3Cl, C)
    float* qkvb;      // (3Cl)
    float* attprojw;  // (C, Cl)
    float* attprojb;  // (C)
    float* ln2w;      // (C)
    float* ln2b;      // (C)
    float* fcw;       // (4Cl, C)
    float* fcb;       // (4Cl)
    float* fcprojw;   // (C, 4Cl)
    float* fcprojb;   // (C)
  };
  struct Tensors {
    float* wte = nullptr;  // (V, C)
    float* wpe = nullptr;  // (maxT, C)
    std::vector<LayerTensors> layers;  // index l - layer_begin
    float* lnfw = nullptr;  // (C)
    float* lnfb = nullptr;  // (C)
  };
  // Forward activations of one block in one slot, sized for max_batch x
  // max_seq (Cl = C/tp, NHl = NH/tp).
  struct LayerActivations {
    float* ln1;        // (B, T, C)
    float* ln1_mean;   // (B, T)
    float* ln1_rstd;   // (B, T)
    float* qkv;        // (B, T, 3Cl)
    float* atty;       // (B, T, Cl)
    float* att;        // (B, NHl, T, T)
    float* residual2;  // (B, T, C)
    float* ln2;        // (B, T, C)
    float* ln2_mean;   // (B, T)
    float* ln2_rstd;   // (B, T)
    float* fch;        // (B, T, 4Cl)
    float* fch_gelu;   // (B, T, 4Cl)
    float* residual3;  // (B, T, C)
  };
  enum class SlotState { kFree, kForward, kForwardNoTargets };
  struct Slot {
    SlotState state = SlotState::kFree;
    int B = 0, T = 0;
    int32_t* tokens = nullptr;   // (B, T) when has_embedding
    int32_t* targets = nullptr;  // (B, T) when has_head
    float* input = nullptr;      // (B, T, C) encoded or received
    std::vector<LayerActivations> layers;  // index l - layer_begin
    float* lnf = nullptr;        // (B, T, C)
    float* lnf_mean = nullptr;   // (B, T)
    float* lnf_rstd = nullptr;   // (B, T)
    float* probs = nullptr;      // (B, T, V); the logits without targets
    float* losses = nullptr;     // (B, T)
    // vocab_parallel: the host tokens/targets (masks), local wte rows.
    std::vector<int32_t> host_tokens, host_targets;
    int32_t* local_ids = nullptr;  // (B, T) when has_embedding
  };

  StageModel(const StageModelOptions& options, Backend* backend,
             TpComm* comm);
  absl::Status Allocate();
  Tensors BindTensors(float* base) const;
  absl::Status CheckTokens(const int32_t* tokens, const char* what,
                           size_t n) const;
  absl::Status CheckSlot(int slot) const;
  // Sum all-reduce of n floats of backend memory over the tp group (no-op
  // for tp_size == 1).
  absl::Status AllReduce(float* data, size_t n);
  // Tokens this rank holds in the residual stream: N / tp with sequence
  // parallelism, else N.
  int LocalTokens(int N) const { return sp_ ? N / options_.tp_size : N; }
  // The embedding of s.tokens into s.input (local tokens).
  absl::Status EmbeddingForward(Slot& s, int B, int T);
  // The gradient of s.input (dresidual_, local tokens) into wte/wpe.
  absl::Status EmbeddingBackward(Slot& s, int B, int T);
  // ln_f, tied head and loss of slot s; sets *loss and s's state.
  absl::Status HeadForward(Slot& s, const int32_t* targets, int B, int T,
                           float* loss, SlotState* state);
  // From the loss to dresidual_ (local tokens).
  absl::Status HeadBackward(Slot& s, float grad_scale, GradientSuffix& ready);
  // Sequence parallel: the full [N,C] of a local LayerNorm output into
  // gather_ (returns gather_); else returns `local` itself.
  absl::StatusOr<const float*> FullTokens(const float* local, int N);
  // The row-parallel partial output proj_ [N,C] summed over the group into
  // the local tokens: reduce-scatter into scatter_ (sequence parallel) or
  // all-reduce in place. Returns the local sum.
  absl::StatusOr<const float*> SumPartialOutput(int N);
  // The partial gradient dln_ [N,C] of a replicated/gathered input summed
  // over the group, local tokens (reduce-scatter into dln_local_, or
  // all-reduce in place). Returns it.
  absl::StatusOr<const float*> SumPartialInputGrad(int N);
  // Sequence parallel: the full output gradient [N,C] from dresidual_'s
  // local tokens, into dgather_; else dresidual_.
  absl::StatusOr<float*> FullOutputGrad(int N);
  // Sequence parallel: the partial LayerNorm gradients in ln_grad_ [0, 2n)
  // all-reduced and added to a[0, n) and b[0, n) (b may be null when
  // n covers one contiguous pair).
  absl::Status AccumulateLayerNormGrads(float* a, float* b, size_t n);
  VocabShard vocab_shard() const {
    return {options_.tp_rank * Vl_, (options_.tp_rank + 1) * Vl_};
  }
  // The stage's blocks on slot `s` (residual stream in s.input).
  absl::Status BlocksForward(Slot& s, int B, int T);
  // Reports each block's gradient to `ready` as it is final.
  absl::Status BlocksBackward(Slot& s, int B, int T, GradientSuffix& ready);
  // Residual stream after the last block of the stage.
  const float* StageOutput(const Slot& s) const;

  const StageModelOptions options_;
  Backend* const backend_;
  TpComm* const comm_;
  const int num_layers_;  // layer_end - layer_begin
  const int Cl_;          // n_embd / tp_size
  const int NHl_;         // n_head / tp_size
  const bool sp_;         // sequence_parallel && tp_size > 1
  const bool vp_;         // vocab_parallel && tp_size > 1
  const int Vl_;          // vocab rows held: V / tp_size with vp_, else V
  std::vector<LocalTensor> tensors_;
  int64_t num_parameters_ = 0;

  std::vector<float*> owned_;  // every float buffer, freed in ~StageModel
  std::vector<int32_t*> owned_int_;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  Tensors p_;  // into params_
  Tensors g_;  // into grads_

  std::vector<Slot> slots_;
  int max_slots_in_use_ = 0;
  ActivationMemory memory_;

  // Shared forward scratch.
  float* proj_ = nullptr;    // (B, T, C) row-parallel output, all-reduced
  float* logits_ = nullptr;  // (B, T, V) logits in Forward, dlogits in
                             // Backward (has_head)
  // Activation gradients, shared by all blocks and slots.
  float* dresidual_ = nullptr;  // (B, T, C) the residual stream
  float* dln_ = nullptr;        // (B, T, C) LayerNorm outputs
  float* dqkv_ = nullptr;       // (B, T, 3Cl)
  float* datty_ = nullptr;      // (B, T, Cl)
  float* datt_ = nullptr;       // (B, NHl, T, T) attention scratch
  float* dfch_ = nullptr;       // (B, T, 4Cl)
  float* dfch_gelu_ = nullptr;  // (B, T, 4Cl)
  // Sequence parallel scratch.
  float* gather_ = nullptr;      // (B, T, C) a gathered LayerNorm output
  float* dgather_ = nullptr;     // (B, T, C) a gathered output gradient
                                 // (= proj_ when the stage has blocks)
  float* scatter_ = nullptr;     // (B*T/tp, C) a reduce-scattered output
  float* dln_local_ = nullptr;   // (B*T/tp, C) a reduce-scattered dln_
  float* ln_grad_ = nullptr;     // (4C) partial LayerNorm gradients
  // Vocab parallel scratch.
  float* zero_wpe_ = nullptr;    // (max_seq, C) zeros
  float* dwpe_scratch_ = nullptr;  // (max_seq, C)
  float* ce_scratch_ = nullptr;  // ((tp + 2) * B * T)
  std::vector<float> host_losses_;
};

}  // namespace lmps

#endif  // LMPS_WORKER_MODEL_STAGE_MODEL_H_
