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
      NHl_(options.config.n_head() / options.tp_size) {
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
  const size_t C = options_.config.n_embd(), V = options_.config.vocab_size();
  const size_t Cl = Cl_;
  const size_t BT = static_cast<size_t>(options_.max_batch) * options_.max_seq;
  const size_t att = static_cast<size_t>(options_.max_batch) * NHl_ *
                     options_.max_seq * options_.max_seq;

  absl::Status status;
  auto alloc = [&](float** dst, size_t n) {
    if (!status.ok()) return;
    absl::StatusOr<float*> p = backend_->Alloc(n);
    if (p.ok()) {
      owned_.push_back(*p);
      *dst = *p;
    } else {
      status = p.status();
    }
  };
  auto alloc_int = [&](int32_t** dst, size_t n) {
    if (!status.ok()) return;
    absl::StatusOr<int32_t*> p = backend_->AllocInt32(n);
    if (p.ok()) {
      owned_int_.push_back(*p);
      *dst = *p;
    } else {
      status = p.status();
    }
  };
  alloc(&params_, num_parameters_);
  alloc(&grads_, num_parameters_);
  slots_.resize(options_.activation_slots);
  for (Slot& s : slots_) {
    if (options_.has_embedding) alloc_int(&s.tokens, BT);
    if (options_.has_head) alloc_int(&s.targets, BT);
    alloc(&s.input, BT * C);
    s.layers.resize(num_layers_);
    for (LayerActivations& a : s.layers) {
      alloc(&a.ln1, BT * C);
      alloc(&a.ln1_mean, BT);
      alloc(&a.ln1_rstd, BT);
      alloc(&a.qkv, BT * 3 * Cl);
      alloc(&a.atty, BT * Cl);
      alloc(&a.att, att);
      alloc(&a.residual2, BT * C);
      alloc(&a.ln2, BT * C);
      alloc(&a.ln2_mean, BT);
      alloc(&a.ln2_rstd, BT);
      alloc(&a.fch, BT * 4 * Cl);
      alloc(&a.fch_gelu, BT * 4 * Cl);
      alloc(&a.residual3, BT * C);
    }
    if (options_.has_head) {
      alloc(&s.lnf, BT * C);
      alloc(&s.lnf_mean, BT);
      alloc(&s.lnf_rstd, BT);
      alloc(&s.probs, BT * V);
      alloc(&s.losses, BT);
    }
  }
  alloc(&dresidual_, BT * C);
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
  const int N = B * T;
  const int C = options_.config.n_embd(), V = options_.config.vocab_size();
  const size_t NC = static_cast<size_t>(N) * C;
  Backend& be = *backend_;
  if (options_.has_embedding) {
    if (absl::Status st = be.CopyToBackend(s.tokens, tokens, n); !st.ok()) {
      return st;
    }
    // encoded[B,T,C] = wte[tokens] + wpe[t]
    be.EncoderForward(s.input, s.tokens, p_.wte, p_.wpe, B, T, C);
  } else {
    if (absl::Status st = be.CopyToBackend(s.input, input, NC); !st.ok()) {
      return st;
    }
  }
  if (absl::Status st = BlocksForward(s, B, T); !st.ok()) return st;

  float loss = 0.0f;
  SlotState state = SlotState::kForward;
  if (!options_.has_head) {
    if (absl::Status st = be.CopyToHost(output, StageOutput(s), NC); !st.ok()) {
      return st;
    }
  } else {
    be.LayerNormForward(s.lnf, s.lnf_mean, s.lnf_rstd, StageOutput(s), p_.lnfw,
                        p_.lnfb, N, C);
    if (targets == nullptr) {
      // Logits only, kept in the slot's probs buffer for LogitsToHost.
      // Tied LM head: logits[N,V] = lnf[N,C] @ wte[V,C]^T.
      be.MatmulForward(s.probs, s.lnf, p_.wte, nullptr, N, C, V);
      if (absl::Status st = be.Synchronize(); !st.ok()) return st;
      state = SlotState::kForwardNoTargets;
    } else {
      if (absl::Status st = be.CopyToBackend(s.targets, targets, n);
          !st.ok()) {
        return st;
      }
      // Tied LM head: logits[N,V] = lnf[N,C] @ wte[V,C]^T (shared scratch;
      // the backward pass needs only the probabilities).
      be.MatmulForward(logits_, s.lnf, p_.wte, nullptr, N, C, V);
      be.CrossEntropyForward(s.losses, s.probs, logits_, s.targets, N, V);
      if (absl::Status st = be.CopyToHost(host_losses_.data(), s.losses, N);
          !st.ok()) {
        return st;
      }
      double sum = 0.0;
      for (int i = 0; i < N; ++i) sum += host_losses_[i];
      loss = static_cast<float>(sum / N);
    }
  }
  s.state = state;
  s.B = B;
  s.T = T;
  const int in_use = slots_in_use();
  if (in_use > max_slots_in_use_) max_slots_in_use_ = in_use;
  return loss;
}

absl::Status StageModel::BlocksForward(Slot& s, int B, int T) {
  const int N = B * T;
  const int C = options_.config.n_embd(), Cl = Cl_, NHl = NHl_;
  const size_t NC = static_cast<size_t>(N) * C;
  const bool rank0 = options_.tp_rank == 0;
  Backend& be = *backend_;
  const float* residual = s.input;
  for (int i = 0; i < num_layers_; ++i) {
    const LayerTensors& w = p_.layers[i];
    const LayerActivations& a = s.layers[i];
    be.LayerNormForward(a.ln1, a.ln1_mean, a.ln1_rstd, residual, w.ln1w,
                        w.ln1b, N, C);
    // Column-parallel c_attn: qkv[N,3Cl] = ln1[N,C] @ W_r[3Cl,C]^T + b_r,
    // i.e. q|k|v of this rank's NHl heads.
    be.MatmulForward(a.qkv, a.ln1, w.qkvw, w.qkvb, N, C, 3 * Cl);
    be.AttentionForward(a.atty, a.att, a.qkv, B, T, Cl, NHl);
    // Row-parallel c_proj: proj[N,C] = sum_r atty_r[N,Cl] @ W_r[C,Cl]^T + b,
    // the bias added by rank 0 only.
    be.MatmulForward(proj_, a.atty, w.attprojw, rank0 ? w.attprojb : nullptr,
                     N, Cl, C);
    if (absl::Status st = AllReduce(proj_, NC); !st.ok()) return st;
    be.ResidualForward(a.residual2, residual, proj_, NC);
    be.LayerNormForward(a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, w.ln2w,
                        w.ln2b, N, C);
    // Column-parallel c_fc: fch[N,4Cl] = ln2[N,C] @ W_r[4Cl,C]^T + b_r.
    be.MatmulForward(a.fch, a.ln2, w.fcw, w.fcb, N, C, 4 * Cl);
    be.GeluForward(a.fch_gelu, a.fch, static_cast<size_t>(N) * 4 * Cl);
    // Row-parallel mlp.c_proj: proj[N,C] = sum_r gelu_r[N,4Cl] @
    // W_r[C,4Cl]^T + b (rank 0).
    be.MatmulForward(proj_, a.fch_gelu, w.fcprojw,
                     rank0 ? w.fcprojb : nullptr, N, 4 * Cl, C);
    if (absl::Status st = AllReduce(proj_, NC); !st.ok()) return st;
    be.ResidualForward(a.residual3, a.residual2, proj_, NC);
    residual = a.residual3;
  }
  return absl::OkStatus();
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
  return backend_->CopyToHost(
      host, s.probs,
      static_cast<size_t>(s.B) * s.T * options_.config.vocab_size());
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
  const int B = s.B, T = s.T, N = B * T;
  const int C = options_.config.n_embd(), V = options_.config.vocab_size();
  const size_t NC = static_cast<size_t>(N) * C;
  Backend& be = *backend_;
  GradientSuffix ready(num_parameters_, on_ready);

  if (options_.has_head) {
    // d(mean loss)/d(losses[n]) = 1/N, times the caller's scale. logits_
    // serves as dlogits.
    float* dlogits = logits_;
    be.Zero(dlogits, static_cast<size_t>(N) * V);
    be.CrossEntropyBackward(dlogits, s.probs, s.targets, grad_scale / N, N,
                            V);
    // Tied head: the head's weight gradient lands in wte's gradient.
    be.Zero(dln_, NC);
    be.MatmulBackward(dln_, g_.wte, nullptr, dlogits, s.lnf, p_.wte, N, C, V);
    be.Zero(dresidual_, NC);
    be.LayerNormBackward(dresidual_, g_.lnfw, g_.lnfb, dln_, StageOutput(s),
                         p_.lnfw, s.lnf_mean, s.lnf_rstd, N, C);
    // ln_f's tensors are the last of the buffer.
    if (absl::Status st = ready.DoneFrom(g_.lnfw - grads_); !st.ok()) {
      return st;
    }
  } else {
    if (absl::Status st = be.CopyToBackend(dresidual_, doutput, NC);
        !st.ok()) {
      return st;
    }
  }
  if (absl::Status st = BlocksBackward(s, B, T, ready); !st.ok()) return st;
  if (options_.has_embedding) {
    be.EncoderBackward(g_.wte, g_.wpe, dresidual_, s.tokens, B, T, C);
  }
  // The front: wte and wpe (wte on a last stage: its head's gradient).
  if (absl::Status st = ready.DoneFrom(0); !st.ok()) return st;
  if (options_.has_embedding) return be.Synchronize();
  return be.CopyToHost(dinput, dresidual_, NC);
}

absl::Status StageModel::BlocksBackward(Slot& s, int B, int T,
                                        GradientSuffix& ready) {
  const int N = B * T;
  const int C = options_.config.n_embd(), Cl = Cl_, NHl = NHl_;
  const size_t NC = static_cast<size_t>(N) * C;
  const size_t NCl = static_cast<size_t>(N) * Cl;
  const bool rank0 = options_.tp_rank == 0;
  Backend& be = *backend_;

  // dresidual_ carries the gradient of the residual stream from block to
  // block (replicated on every tp rank): on entry to block i it is
  // d(residual3[i]) = d(mlp proj output), the first part of d(residual2);
  // LayerNorm 2 adds the rest, and so on (see GptModel::Backward).
  for (int i = num_layers_ - 1; i >= 0; --i) {
    const LayerTensors& w = p_.layers[i];
    const LayerTensors& dw = g_.layers[i];
    const LayerActivations& a = s.layers[i];
    const float* residual = i == 0 ? s.input : s.layers[i - 1].residual3;

    // Row-parallel mlp.c_proj: its output gradient is replicated, so the
    // local products need no communication; the bias gradient is rank 0's.
    be.Zero(dfch_gelu_, 4 * NCl);
    be.MatmulBackward(dfch_gelu_, dw.fcprojw, rank0 ? dw.fcprojb : nullptr,
                      dresidual_, a.fch_gelu, w.fcprojw, N, 4 * Cl, C);
    be.Zero(dfch_, 4 * NCl);
    be.GeluBackward(dfch_, a.fch, dfch_gelu_, 4 * NCl);
    // Column-parallel c_fc: each rank has a partial d(ln2)[N,C] =
    // dfch_r @ W_r; their sum (all-reduce) is the full gradient.
    be.Zero(dln_, NC);
    be.MatmulBackward(dln_, dw.fcw, dw.fcb, dfch_, a.ln2, w.fcw, N, C, 4 * Cl);
    if (absl::Status st = AllReduce(dln_, NC); !st.ok()) return st;
    be.LayerNormBackward(dresidual_, dw.ln2w, dw.ln2b, dln_, a.residual2,
                         w.ln2w, a.ln2_mean, a.ln2_rstd, N, C);
    // dresidual_ is now d(residual2) = d(attn proj output) + d(residual).
    // Row-parallel attn.c_proj.
    be.Zero(datty_, NCl);
    be.MatmulBackward(datty_, dw.attprojw, rank0 ? dw.attprojb : nullptr,
                      dresidual_, a.atty, w.attprojw, N, Cl, C);
    be.Zero(dqkv_, 3 * NCl);
    be.AttentionBackward(dqkv_, datt_, datty_, a.qkv, a.att, B, T, Cl, NHl);
    // Column-parallel c_attn: partial d(ln1), all-reduced.
    be.Zero(dln_, NC);
    be.MatmulBackward(dln_, dw.qkvw, dw.qkvb, dqkv_, a.ln1, w.qkvw, N, C,
                      3 * Cl);
    if (absl::Status st = AllReduce(dln_, NC); !st.ok()) return st;
    be.LayerNormBackward(dresidual_, dw.ln1w, dw.ln1b, dln_, residual, w.ln1w,
                         a.ln1_mean, a.ln1_rstd, N, C);
    // ln_1.weight is the block's first tensor (GptTensorSpecs order).
    if (absl::Status st = ready.DoneFrom(dw.ln1w - grads_); !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

}  // namespace lmps
