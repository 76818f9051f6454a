#include "worker/model/stage_model.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/model/model_spec.h"

namespace lmps {
namespace {

// GptTensorSpecs order: wte, wpe, kPerLayer tensors per block, ln_f.{w,b}.
constexpr int kPerLayer = 12;
// Indices within a block.
enum LayerTensorIndex {
  kLn1W = 0,
  kLn1B,
  kQkvW,
  kQkvB,
  kAttProjW,
  kAttProjB,
  kLn2W,
  kLn2B,
  kFcW,
  kFcB,
  kFcProjW,
  kFcProjB,
};

}  // namespace

int64_t LocalTensor::num_elements() const {
  int64_t n = 1;
  for (int64_t d : local_shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<StageModel>> StageModel::Create(
    const StageModelOptions& options, Backend* backend, TpComm* comm) {
  const ModelConfig& config = options.config;
  if (absl::Status s = ValidateModelConfig(config); !s.ok()) return s;
  if (backend == nullptr) {
    return absl::InvalidArgumentError("stage: backend is null");
  }
  if (options.layer_begin < 0 || options.layer_begin > options.layer_end ||
      options.layer_end > config.n_layer()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stage: layer range [", options.layer_begin, ", ", options.layer_end,
        ") is not within [0, n_layer=", config.n_layer(), "]"));
  }
  if (options.layer_begin == options.layer_end && !options.has_embedding &&
      !options.has_head) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage: empty layer range [", options.layer_begin, ", ",
                     options.layer_end,
                     ") without embedding or head: the stage holds nothing"));
  }
  if (options.tp_size < 1 || options.tp_rank < 0 ||
      options.tp_rank >= options.tp_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage: tp_rank ", options.tp_rank,
                     " is outside [0, tp_size=", options.tp_size, ")"));
  }
  if (config.n_head() % options.tp_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage: n_head=", config.n_head(),
                     " is not divisible by tp_size=", options.tp_size));
  }
  if (options.tp_size > 1 && options.sequence_parallel &&
      options.max_seq % options.tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stage: sequence parallelism needs max_seq (", options.max_seq,
        ") divisible by tp_size=", options.tp_size));
  }
  if (options.tp_size > 1 && options.vocab_parallel &&
      config.vocab_size() % options.tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stage: vocab parallelism needs vocab_size (", config.vocab_size(),
        ") divisible by tp_size=", options.tp_size,
        " (pad the vocabulary)"));
  }
  if (options.tp_size > 1 && comm == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stage: tp_size=", options.tp_size, " needs a TpComm, got null"));
  }
  if (comm != nullptr &&
      (comm->size() != options.tp_size || comm->rank() != options.tp_rank)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stage: TpComm is rank ", comm->rank(), " of ", comm->size(),
        ", the options say rank ", options.tp_rank, " of ", options.tp_size));
  }
  if (options.max_batch < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stage: max_batch must be >= 1, got ", options.max_batch));
  }
  if (options.max_seq < 1 || options.max_seq > config.block_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage: max_seq must be in [1, block_size=",
                     config.block_size(), "], got ", options.max_seq));
  }
  if (options.activation_slots < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage: activation_slots must be >= 1, got ",
                     options.activation_slots));
  }
  std::unique_ptr<StageModel> model(new StageModel(options, backend, comm));
  if (absl::Status s = model->Allocate(); !s.ok()) return s;
  return model;
}

StageModel::StageModel(const StageModelOptions& options, Backend* backend,
                       TpComm* comm)
    : options_(options),
      backend_(backend),
      comm_(comm),
      num_layers_(options.layer_end - options.layer_begin),
      Cl_(options.config.n_embd() / options.tp_size),
      NHl_(options.config.n_head() / options.tp_size),
      sp_(options.sequence_parallel && options.tp_size > 1),
      vp_(options.vocab_parallel && options.tp_size > 1),
      Vl_(vp_ ? options.config.vocab_size() / options.tp_size
              : options.config.vocab_size()) {
  // The local tensors: canonical order restricted to the stage, local
  // shapes (Megatron-LM partition, see stage_model.h).
  const int64_t C = options_.config.n_embd();
  const int64_t Cl = Cl_;
  const std::vector<TensorSpec> specs = GptTensorSpecs(options_.config);
  const size_t first_layer = 2;
  const size_t ln_f =
      first_layer + static_cast<size_t>(options_.config.n_layer()) * kPerLayer;
  for (size_t i = 0; i < specs.size(); ++i) {
    std::vector<int64_t> shape = specs[i].shape;
    bool held = false;
    if (i == 0) {  // wte: embedding and tied head
      held = options_.has_embedding || options_.has_head;
      // Vocab parallel: rows [r*Vl, (r+1)*Vl) -> (Vl, C).
      if (vp_) shape = {Vl_, C};
    } else if (i == 1) {  // wpe
      held = options_.has_embedding;
    } else if (i >= ln_f) {
      held = options_.has_head;
    } else {
      const int l = static_cast<int>((i - first_layer) / kPerLayer);
      held = l >= options_.layer_begin && l < options_.layer_end;
      switch ((i - first_layer) % kPerLayer) {
        // Column-parallel (ColumnParallelLinear): the output dimension is
        // split. c_attn W (3C, C) = [Wq; Wk; Wv], each (C, C) split along its
        // rows: rank r holds rows [r*Cl, (r+1)*Cl) of each -> (3Cl, C).
        case kQkvW: shape = {3 * Cl, C}; break;
        case kQkvB: shape = {3 * Cl}; break;
        // c_fc W (4C, C): rows [r*4Cl, (r+1)*4Cl) -> (4Cl, C).
        case kFcW: shape = {4 * Cl, C}; break;
        case kFcB: shape = {4 * Cl}; break;
        // Row-parallel (RowParallelLinear): the input dimension is split,
        // W (C, K) -> columns [r*K/tp, (r+1)*K/tp) of every row; Y = sum over
        // ranks of X_r W_r^T (all-reduce), + b (replicated, added once).
        case kAttProjW: shape = {C, Cl}; break;
        case kFcProjW: shape = {C, 4 * Cl}; break;
        default: break;  // LayerNorms, row-parallel biases: replicated
      }
    }
    if (!held) continue;
    LocalTensor t;
    t.name = specs[i].name;
    t.local_shape = std::move(shape);
    t.offset = num_parameters_;
    num_parameters_ += t.num_elements();
    tensors_.push_back(std::move(t));
  }
}

StageModel::~StageModel() {
  for (float* p : owned_) backend_->Free(p);
  for (int32_t* p : owned_int_) backend_->Free(p);
}

absl::Status StageModel::Allocate() {
  const size_t C = options_.config.n_embd(), V = Vl_;
  const size_t Cl = Cl_, tp = options_.tp_size;
  const size_t BT = static_cast<size_t>(options_.max_batch) * options_.max_seq;
  // Tokens of the residual stream / LayerNorm region on this rank.
  const size_t BTl = sp_ ? BT / tp : BT;
  const size_t att = static_cast<size_t>(options_.max_batch) * NHl_ *
                     options_.max_seq * options_.max_seq;

  absl::Status status;
  // Where the bytes of an allocation are counted (null: not activations).
  int64_t* counter = nullptr;
  int64_t* ln_counter = nullptr;  // also counted as LayerNorm region
  auto alloc = [&](float** dst, size_t n) {
    if (!status.ok()) return;
    absl::StatusOr<float*> p = backend_->Alloc(n);
    if (p.ok()) {
      owned_.push_back(*p);
      *dst = *p;
      if (counter != nullptr) *counter += static_cast<int64_t>(4 * n);
      if (ln_counter != nullptr) *ln_counter += static_cast<int64_t>(4 * n);
    } else {
      status = p.status();
    }
  };
  auto alloc_ln = [&](float** dst, size_t n) {
    ln_counter = &memory_.layernorm_region_per_slot;
    alloc(dst, n);
    ln_counter = nullptr;
  };
  auto alloc_int = [&](int32_t** dst, size_t n) {
    if (!status.ok()) return;
    absl::StatusOr<int32_t*> p = backend_->AllocInt32(n);
    if (p.ok()) {
      owned_int_.push_back(*p);
      *dst = *p;
      if (counter != nullptr) *counter += static_cast<int64_t>(4 * n);
    } else {
      status = p.status();
    }
  };
  alloc(&params_, num_parameters_);
  alloc(&grads_, num_parameters_);
  slots_.resize(options_.activation_slots);
  for (size_t i = 0; i < slots_.size(); ++i) {
    Slot& s = slots_[i];
    // Count the first slot (all are alike).
    int64_t ignored = 0;
    counter = i == 0 ? &memory_.per_slot : &ignored;
    const int64_t saved_ln = memory_.layernorm_region_per_slot;
    if (options_.has_embedding) {
      alloc_int(&s.tokens, BT);
      if (vp_) alloc_int(&s.local_ids, BT);
    }
    if (options_.has_head) alloc_int(&s.targets, BT);
    alloc_ln(&s.input, BTl * C);
    s.layers.resize(num_layers_);
    for (LayerActivations& a : s.layers) {
      alloc_ln(&a.ln1, BTl * C);
      alloc_ln(&a.ln1_mean, BTl);
      alloc_ln(&a.ln1_rstd, BTl);
      alloc(&a.qkv, BT * 3 * Cl);
      alloc(&a.atty, BT * Cl);
      alloc(&a.att, att);
      alloc_ln(&a.residual2, BTl * C);
      alloc_ln(&a.ln2, BTl * C);
      alloc_ln(&a.ln2_mean, BTl);
      alloc_ln(&a.ln2_rstd, BTl);
      alloc(&a.fch, BT * 4 * Cl);
      alloc(&a.fch_gelu, BT * 4 * Cl);
      alloc_ln(&a.residual3, BTl * C);
    }
    if (options_.has_head) {
      alloc_ln(&s.lnf, BTl * C);
      alloc_ln(&s.lnf_mean, BTl);
      alloc_ln(&s.lnf_rstd, BTl);
      alloc(&s.probs, BT * V);
      alloc(&s.losses, BT);
    }
    if (i != 0) memory_.layernorm_region_per_slot = saved_ln;
  }
  counter = &memory_.scratch;
  alloc(&dresidual_, BTl * C);
  if (num_layers_ > 0) {
    alloc(&proj_, BT * C);
    alloc(&dln_, BT * C);
    alloc(&dqkv_, BT * 3 * Cl);
    alloc(&datty_, BT * Cl);
    alloc(&datt_, att);
    alloc(&dfch_, BT * 4 * Cl);
    alloc(&dfch_gelu_, BT * 4 * Cl);
  }
  if (options_.has_head) {
    if (dln_ == nullptr) alloc(&dln_, BT * C);
    alloc(&logits_, BT * V);
    host_losses_.resize(BT);
  }
  if (sp_) {
    alloc(&gather_, BT * C);
    // The backward pass's gathered output gradient reuses the forward's
    // row-parallel scratch (one Forward or Backward at a time).
    if (proj_ != nullptr) {
      dgather_ = proj_;
    } else {
      alloc(&dgather_, BT * C);
    }
    alloc(&scatter_, BTl * C);
    alloc(&dln_local_, BTl * C);
    alloc(&ln_grad_, 4 * C);
  }
  if (vp_ && options_.has_embedding) {
    alloc(&zero_wpe_, static_cast<size_t>(options_.max_seq) * C);
    alloc(&dwpe_scratch_, static_cast<size_t>(options_.max_seq) * C);
    if (zero_wpe_ != nullptr) {
      backend_->Zero(zero_wpe_, static_cast<size_t>(options_.max_seq) * C);
    }
  }
  if (vp_ && options_.has_head) alloc(&ce_scratch_, (tp + 2) * BT);
  counter = nullptr;
  if (!status.ok()) return status;
  p_ = BindTensors(params_);
  g_ = BindTensors(grads_);
  return absl::OkStatus();
}

StageModel::Tensors StageModel::BindTensors(float* base) const {
  // tensors_ is the canonical order restricted to the stage: walk it.
  size_t i = 0;
  auto next = [&]() { return base + tensors_[i++].offset; };
  Tensors t;
  if (options_.has_embedding || options_.has_head) t.wte = next();
  if (options_.has_embedding) t.wpe = next();
  t.layers.resize(num_layers_);
  for (LayerTensors& lt : t.layers) {
    lt.ln1w = next();
    lt.ln1b = next();
    lt.qkvw = next();
    lt.qkvb = next();
    lt.attprojw = next();
    lt.attprojb = next();
    lt.ln2w = next();
    lt.ln2b = next();
    lt.fcw = next();
    lt.fcb = next();
    lt.fcprojw = next();
    lt.fcprojb = next();
  }
  if (options_.has_head) {
    t.lnfw = next();
    t.lnfb = next();
  }
  return t;
}

absl::StatusOr<int64_t> StageModel::TensorOffset(std::string_view name) const {
  for (const LocalTensor& t : tensors_) {
    if (t.name == name) return t.offset;
  }
  return absl::NotFoundError(absl::StrCat(
      "stage: no local tensor named ", std::string(name), " (layers [",
      options_.layer_begin, ", ", options_.layer_end, "))"));
}

absl::Status StageModel::SetParametersFromHost(const float* host) {
  return backend_->CopyToBackend(params_, host, num_parameters_);
}

absl::Status StageModel::ParametersToHost(float* host) const {
  return backend_->CopyToHost(host, params_, num_parameters_);
}

absl::Status StageModel::GradientsToHost(float* host) const {
  return backend_->CopyToHost(host, grads_, num_parameters_);
}

void StageModel::ZeroGrad() { backend_->Zero(grads_, num_parameters_); }

absl::Status StageModel::CheckTokens(const int32_t* tokens, const char* what,
                                     size_t n) const {
  const int32_t V = options_.config.vocab_size();
  for (size_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V) {
      return absl::InvalidArgumentError(
          absl::StrCat("stage: ", what, "[", i, "] = ", tokens[i],
                       " is outside the vocabulary [0, ", V, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status StageModel::CheckSlot(int slot) const {
  if (slot < 0 || slot >= options_.activation_slots) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage: slot ", slot, " is outside [0, activation_slots=",
                     options_.activation_slots, ")"));
  }
  return absl::OkStatus();
}

bool StageModel::slot_in_use(int slot) const {
  return slot >= 0 && slot < options_.activation_slots &&
         slots_[slot].state != SlotState::kFree;
}

int StageModel::slots_in_use() const {
  int n = 0;
  for (const Slot& s : slots_) n += s.state != SlotState::kFree;
  return n;
}

void StageModel::ResetMaxSlotsInUse() { max_slots_in_use_ = slots_in_use(); }

void StageModel::ReleaseSlot(int slot) {
  if (slot >= 0 && slot < options_.activation_slots) {
    slots_[slot].state = SlotState::kFree;
  }
}

absl::Status StageModel::AllReduce(float* data, size_t n) {
  if (options_.tp_size == 1) return absl::OkStatus();
  return comm_->AllReduceSum(backend_, data, n);
}

const float* StageModel::StageOutput(const Slot& s) const {
  return num_layers_ > 0 ? s.layers.back().residual3 : s.input;
}

absl::StatusOr<float> StageModel::Forward(int slot, const int32_t* tokens,
                                          const float* input,
                                          const int32_t* targets,
                                          float* output, int B, int T) {
  if (absl::Status s = CheckSlot(slot); !s.ok()) return s;
  if (slots_[slot].state != SlotState::kFree) {
    return absl::FailedPreconditionError(absl::StrCat(
        "stage: slot ", slot,
        " already holds a forward (Backward or ReleaseSlot it first)"));
  }
  if (B < 1 || B > options_.max_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage: batch size ", B, " is outside [1, max_batch=",
                     options_.max_batch, "]"));
  }
  if (T < 1 || T > options_.max_seq) {
    return absl::InvalidArgumentError(
        absl::StrCat("stage: sequence length ", T, " is outside [1, max_seq=",
                     options_.max_seq, "]"));
  }
  if (sp_ && (B * T) % options_.tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stage: sequence parallelism needs B*T (", B * T,
        ") divisible by tp_size=", options_.tp_size));
  }
  const size_t n = static_cast<size_t>(B) * T;
  if (options_.has_embedding) {
    if (tokens == nullptr) {
      return absl::InvalidArgumentError(
          "stage: tokens is null (the first stage needs tokens)");
    }
    if (absl::Status s = CheckTokens(tokens, "tokens", n); !s.ok()) return s;
  } else if (input == nullptr) {
    return absl::InvalidArgumentError(
        "stage: input is null (a stage after the first needs the previous "
        "stage's activation)");
  }
  if (options_.has_head) {
    if (targets != nullptr) {
      if (absl::Status s = CheckTokens(targets, "targets", n); !s.ok()) {
        return s;
      }
    }
  } else if (output == nullptr) {
    return absl::InvalidArgumentError(
        "stage: output is null (a stage before the last produces an "
        "activation)");
  }

  Slot& s = slots_[slot];
  const int C = options_.config.n_embd();
  const size_t NlC = static_cast<size_t>(LocalTokens(B * T)) * C;
  Backend& be = *backend_;
  if (options_.has_embedding) {
    if (absl::Status st = be.CopyToBackend(s.tokens, tokens, n); !st.ok()) {
      return st;
    }
    if (vp_) s.host_tokens.assign(tokens, tokens + n);
    if (absl::Status st = EmbeddingForward(s, B, T); !st.ok()) return st;
  } else {
    if (absl::Status st = be.CopyToBackend(s.input, input, NlC); !st.ok()) {
      return st;
    }
  }
  if (absl::Status st = BlocksForward(s, B, T); !st.ok()) return st;

  float loss = 0.0f;
  SlotState state = SlotState::kForward;
  if (!options_.has_head) {
    if (absl::Status st = be.CopyToHost(output, StageOutput(s), NlC);
        !st.ok()) {
      return st;
    }
  } else if (absl::Status st = HeadForward(s, targets, B, T, &loss, &state);
             !st.ok()) {
    return st;
  }
  s.state = state;
  s.B = B;
  s.T = T;
  const int in_use = slots_in_use();
  if (in_use > max_slots_in_use_) max_slots_in_use_ = in_use;
  return loss;
}

absl::Status StageModel::LogitsToHost(int slot, float* host) const {
  if (absl::Status s = CheckSlot(slot); !s.ok()) return s;
  const Slot& s = slots_[slot];
  if (!options_.has_head || s.state != SlotState::kForwardNoTargets) {
    return absl::FailedPreconditionError(absl::StrCat(
        "stage: slot ", slot,
        " holds no logits-only forward (needs has_head and a Forward "
        "without targets)"));
  }
  if (host == nullptr) return absl::InvalidArgumentError("stage: host is null");
  return backend_->CopyToHost(host, s.probs,
                              static_cast<size_t>(s.B) * s.T * Vl_);
}

absl::Status StageModel::Backward(int slot, const float* doutput,
                                  float grad_scale, float* dinput,
                                  const GradientReadyFn& on_ready) {
  if (absl::Status s = CheckSlot(slot); !s.ok()) return s;
  Slot& s = slots_[slot];
  if (s.state == SlotState::kFree) {
    return absl::FailedPreconditionError(absl::StrCat(
        "stage: Backward of slot ", slot,
        " which holds no forward (or was already backwarded)"));
  }
  if (options_.has_head && s.state == SlotState::kForwardNoTargets) {
    return absl::FailedPreconditionError(absl::StrCat(
        "stage: Backward of slot ", slot,
        " whose forward had no targets (ReleaseSlot it instead)"));
  }
  if (!options_.has_head && doutput == nullptr) {
    return absl::InvalidArgumentError(
        "stage: doutput is null (a stage before the last needs the gradient "
        "of its output)");
  }
  if (!options_.has_embedding && dinput == nullptr) {
    return absl::InvalidArgumentError(
        "stage: dinput is null (a stage after the first produces the "
        "gradient of its input)");
  }
  s.state = SlotState::kFree;
  const int B = s.B, T = s.T;
  const int C = options_.config.n_embd();
  const size_t NlC = static_cast<size_t>(LocalTokens(B * T)) * C;
  Backend& be = *backend_;
  GradientSuffix ready(num_parameters_, on_ready);

  if (options_.has_head) {
    if (absl::Status st = HeadBackward(s, grad_scale, ready); !st.ok()) {
      return st;
    }
  } else {
    if (absl::Status st = be.CopyToBackend(dresidual_, doutput, NlC);
        !st.ok()) {
      return st;
    }
  }
  if (absl::Status st = BlocksBackward(s, B, T, ready); !st.ok()) return st;
  if (options_.has_embedding) {
    if (absl::Status st = EmbeddingBackward(s, B, T); !st.ok()) return st;
  }
  // The front: wte and wpe (wte on a last stage: its head's gradient).
  if (absl::Status st = ready.DoneFrom(0); !st.ok()) return st;
  if (options_.has_embedding) return be.Synchronize();
  return be.CopyToHost(dinput, dresidual_, NlC);
}

}  // namespace lmps
