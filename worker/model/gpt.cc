#include "worker/model/gpt.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/model/init.h"
#include "common/model/rng.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<GptModel>> GptModel::Create(
    const ModelConfig& config, Backend* backend, int max_batch, int max_seq) {
  if (absl::Status s = ValidateModelConfig(config); !s.ok()) return s;
  if (backend == nullptr) {
    return absl::InvalidArgumentError("gpt: backend is null");
  }
  if (max_batch < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("gpt: max_batch must be >= 1, got ", max_batch));
  }
  if (max_seq < 1 || max_seq > config.block_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("gpt: max_seq must be in [1, block_size=",
                     config.block_size(), "], got ", max_seq));
  }
  std::unique_ptr<GptModel> model(
      new GptModel(config, backend, max_batch, max_seq));
  if (absl::Status s = model->Allocate(); !s.ok()) return s;
  return model;
}

GptModel::GptModel(const ModelConfig& config, Backend* backend, int max_batch,
                   int max_seq)
    : config_(config),
      backend_(backend),
      max_batch_(max_batch),
      max_seq_(max_seq),
      specs_(GptTensorSpecs(config)) {
  offsets_.reserve(specs_.size());
  for (const TensorSpec& spec : specs_) {
    offsets_.push_back(num_parameters_);
    num_parameters_ += spec.num_elements();
  }
}

GptModel::~GptModel() {
  for (float* p : owned_) backend_->Free(p);
  backend_->Free(tokens_);
  backend_->Free(targets_);
}

absl::StatusOr<float*> GptModel::AllocOwned(size_t n) {
  absl::StatusOr<float*> p = backend_->Alloc(n);
  if (p.ok()) owned_.push_back(*p);
  return p;
}

absl::Status GptModel::Allocate() {
  const size_t L = config_.n_layer(), C = config_.n_embd(),
               NH = config_.n_head(), V = config_.vocab_size();
  const size_t BT = static_cast<size_t>(max_batch_) * max_seq_;
  const size_t att = static_cast<size_t>(max_batch_) * NH * max_seq_ * max_seq_;

  // Every buffer goes through AllocOwned; one macro-free helper keeps the
  // error handling in one place.
  absl::Status status;
  auto alloc = [&](float** dst, size_t n) {
    if (!status.ok()) return;
    absl::StatusOr<float*> p = AllocOwned(n);
    if (p.ok()) {
      *dst = *p;
    } else {
      status = p.status();
    }
  };
  alloc(&params_, num_parameters_);
  alloc(&grads_, num_parameters_);
  alloc(&encoded_, BT * C);
  acts_.resize(L);
  for (LayerActivations& a : acts_) {
    alloc(&a.ln1, BT * C);
    alloc(&a.ln1_mean, BT);
    alloc(&a.ln1_rstd, BT);
    alloc(&a.qkv, BT * 3 * C);
    alloc(&a.atty, BT * C);
    alloc(&a.att, att);
    alloc(&a.attproj, BT * C);
    alloc(&a.residual2, BT * C);
    alloc(&a.ln2, BT * C);
    alloc(&a.ln2_mean, BT);
    alloc(&a.ln2_rstd, BT);
    alloc(&a.fch, BT * 4 * C);
    alloc(&a.fch_gelu, BT * 4 * C);
    alloc(&a.fcproj, BT * C);
    alloc(&a.residual3, BT * C);
  }
  alloc(&lnf_, BT * C);
  alloc(&lnf_mean_, BT);
  alloc(&lnf_rstd_, BT);
  alloc(&logits_, BT * V);
  alloc(&probs_, BT * V);
  alloc(&losses_, BT);
  alloc(&dresidual_, BT * C);
  alloc(&dln_, BT * C);
  alloc(&dqkv_, BT * 3 * C);
  alloc(&datty_, BT * C);
  alloc(&datt_, att);
  alloc(&dfch_, BT * 4 * C);
  alloc(&dfch_gelu_, BT * 4 * C);
  alloc(&dlogits_, BT * V);
  if (!status.ok()) return status;

  absl::StatusOr<int32_t*> tokens = backend_->AllocInt32(BT);
  if (!tokens.ok()) return tokens.status();
  tokens_ = *tokens;
  absl::StatusOr<int32_t*> targets = backend_->AllocInt32(BT);
  if (!targets.ok()) return targets.status();
  targets_ = *targets;

  p_ = BindTensors(params_);
  g_ = BindTensors(grads_);
  host_losses_.resize(BT);
  return absl::OkStatus();
}

GptModel::Tensors GptModel::BindTensors(float* base) const {
  // GptTensorSpecs order: wte, wpe, 12 tensors per layer, ln_f.{w,b}.
  constexpr int kPerLayer = 12;
  auto at = [&](size_t index) { return base + offsets_[index]; };
  Tensors t;
  t.wte = at(0);
  t.wpe = at(1);
  t.layers.resize(config_.n_layer());
  for (int l = 0; l < config_.n_layer(); ++l) {
    const size_t i = 2 + static_cast<size_t>(l) * kPerLayer;
    LayerTensors& lt = t.layers[l];
    lt.ln1w = at(i + 0);
    lt.ln1b = at(i + 1);
    lt.qkvw = at(i + 2);
    lt.qkvb = at(i + 3);
    lt.attprojw = at(i + 4);
    lt.attprojb = at(i + 5);
    lt.ln2w = at(i + 6);
    lt.ln2b = at(i + 7);
    lt.fcw = at(i + 8);
    lt.fcb = at(i + 9);
    lt.fcprojw = at(i + 10);
    lt.fcprojb = at(i + 11);
  }
  const size_t f = 2 + static_cast<size_t>(config_.n_layer()) * kPerLayer;
  t.lnfw = at(f);
  t.lnfb = at(f + 1);
  return t;
}

absl::StatusOr<int64_t> GptModel::TensorOffset(std::string_view name) const {
  for (size_t i = 0; i < specs_.size(); ++i) {
    if (specs_[i].name == name) return offsets_[i];
  }
  return absl::NotFoundError(absl::StrCat("gpt: no tensor named ", std::string(name)));
}

absl::Status GptModel::SetParametersFromHost(const float* host) {
  return backend_->CopyToBackend(params_, host, num_parameters_);
}

absl::Status GptModel::ParametersToHost(float* host) const {
  return backend_->CopyToHost(host, params_, num_parameters_);
}

absl::Status GptModel::GradientsToHost(float* host) const {
  return backend_->CopyToHost(host, grads_, num_parameters_);
}

absl::Status GptModel::InitParameters(uint64_t seed) {
  std::vector<float> host(num_parameters_);
  for (size_t i = 0; i < specs_.size(); ++i) {
    InitTensorRange(specs_[i], seed, 0, specs_[i].num_elements(),
                    host.data() + offsets_[i]);
  }
  return SetParametersFromHost(host.data());
}

void GptModel::ZeroGrad() { backend_->Zero(grads_, num_parameters_); }

absl::Status GptModel::CheckTokens(const int32_t* tokens, const char* what,
                                   size_t n) const {
  const int32_t V = config_.vocab_size();
  for (size_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V) {
      return absl::InvalidArgumentError(
          absl::StrCat("gpt: ", what, "[", i, "] = ", tokens[i],
                       " is outside the vocabulary [0, ", V, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<float> GptModel::Forward(const int32_t* tokens,
                                        const int32_t* targets, int B, int T,
                                        const ParametersReadyFn& params_ready) {
  if (B < 1 || B > max_batch_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gpt: batch size ", B, " is outside [1, max_batch=", max_batch_, "]"));
  }
  if (T < 1 || T > max_seq_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gpt: sequence length ", T, " is outside [1, max_seq=", max_seq_,
        "]"));
  }
  if (tokens == nullptr) {
    return absl::InvalidArgumentError("gpt: tokens is null");
  }
  const size_t n = static_cast<size_t>(B) * T;
  if (absl::Status s = CheckTokens(tokens, "tokens", n); !s.ok()) return s;
  if (targets != nullptr) {
    if (absl::Status s = CheckTokens(targets, "targets", n); !s.ok()) {
      return s;
    }
  }
  backward_ready_ = false;
  last_B_ = 0;
  last_T_ = 0;
  if (absl::Status s = backend_->CopyToBackend(tokens_, tokens, n); !s.ok()) {
    return s;
  }
  if (targets != nullptr) {
    if (absl::Status s = backend_->CopyToBackend(targets_, targets, n);
        !s.ok()) {
      return s;
    }
  }

  const int N = B * T;
  const int C = config_.n_embd(), NH = config_.n_head(),
            V = config_.vocab_size();
  Backend& be = *backend_;
  const int L = config_.n_layer();
  // params()[0, end) must be in place before the pass reads it.
  auto need = [&](const float* end) -> absl::Status {
    if (!params_ready) return absl::OkStatus();
    return params_ready(end - params_);
  };
  if (absl::Status s = need(L > 0 ? p_.layers[0].ln1w : p_.lnfw); !s.ok()) {
    return s;
  }
  be.EncoderForward(encoded_, tokens_, p_.wte, p_.wpe, B, T, C);
  const float* residual = encoded_;
  for (int l = 0; l < L; ++l) {
    if (absl::Status s = need(l + 1 < L ? p_.layers[l + 1].ln1w : p_.lnfw);
        !s.ok()) {
      return s;
    }
    const LayerTensors& w = p_.layers[l];
    const LayerActivations& a = acts_[l];
    be.LayerNormForward(a.ln1, a.ln1_mean, a.ln1_rstd, residual, w.ln1w,
                        w.ln1b, N, C);
    be.MatmulForward(a.qkv, a.ln1, w.qkvw, w.qkvb, N, C, 3 * C);
    be.AttentionForward(a.atty, a.att, a.qkv, B, T, C, NH);
    be.MatmulForward(a.attproj, a.atty, w.attprojw, w.attprojb, N, C, C);
    be.ResidualForward(a.residual2, residual, a.attproj,
                       static_cast<size_t>(N) * C);
    be.LayerNormForward(a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, w.ln2w,
                        w.ln2b, N, C);
    be.MatmulForward(a.fch, a.ln2, w.fcw, w.fcb, N, C, 4 * C);
    be.GeluForward(a.fch_gelu, a.fch, static_cast<size_t>(N) * 4 * C);
    be.MatmulForward(a.fcproj, a.fch_gelu, w.fcprojw, w.fcprojb, N, 4 * C, C);
    be.ResidualForward(a.residual3, a.residual2, a.fcproj,
                       static_cast<size_t>(N) * C);
    residual = a.residual3;
  }
  if (absl::Status s = need(params_ + num_parameters_); !s.ok()) return s;
  be.LayerNormForward(lnf_, lnf_mean_, lnf_rstd_, residual, p_.lnfw, p_.lnfb,
                      N, C);
  // Tied LM head: logits[N,V] = lnf[N,C] @ wte[V,C]^T.
  be.MatmulForward(logits_, lnf_, p_.wte, nullptr, N, C, V);
  last_B_ = B;
  last_T_ = T;
  if (targets == nullptr) {
    if (absl::Status s = be.Synchronize(); !s.ok()) return s;
    return 0.0f;
  }
  be.CrossEntropyForward(losses_, probs_, logits_, targets_, N, V);
  if (absl::Status s = be.CopyToHost(host_losses_.data(), losses_, N);
      !s.ok()) {
    return s;
  }
  double sum = 0.0;
  for (int i = 0; i < N; ++i) sum += host_losses_[i];
  backward_ready_ = true;
  return static_cast<float>(sum / N);
}

absl::Status GptModel::LogitsToHost(float* host) const {
  if (last_B_ == 0) {
    return absl::FailedPreconditionError("gpt: LogitsToHost before Forward");
  }
  return backend_->CopyToHost(
      host, logits_,
      static_cast<size_t>(last_B_) * last_T_ * config_.vocab_size());
}

absl::Status GptModel::Backward(float grad_scale,
                                const GradientReadyFn& on_ready) {
  if (!backward_ready_) {
    return absl::FailedPreconditionError(
        "gpt: Backward needs a preceding Forward with targets (once per "
        "Forward)");
  }
  backward_ready_ = false;
  const int B = last_B_, T = last_T_, N = B * T;
  const int C = config_.n_embd(), NH = config_.n_head(),
            V = config_.vocab_size();
  const size_t NC = static_cast<size_t>(N) * C;
  Backend& be = *backend_;

  // d(mean loss)/d(losses[n]) = 1/N, times the caller's scale.
  be.Zero(dlogits_, static_cast<size_t>(N) * V);
  be.CrossEntropyBackward(dlogits_, probs_, targets_, grad_scale / N, N, V);
  // Tied head: the head's weight gradient lands in wte's gradient.
  be.Zero(dln_, NC);
  be.MatmulBackward(dln_, g_.wte, nullptr, dlogits_, lnf_, p_.wte, N, C, V);
  const float* last_residual =
      config_.n_layer() > 0 ? acts_.back().residual3 : encoded_;
  be.Zero(dresidual_, NC);
  be.LayerNormBackward(dresidual_, g_.lnfw, g_.lnfb, dln_, last_residual,
                       p_.lnfw, lnf_mean_, lnf_rstd_, N, C);
  // GptTensorSpecs order: wte, wpe, 12 tensors per layer, ln_f.{w,b}; the
  // first element of layer l is offsets_[2 + 12 l], ln_f's g_.lnfw.
  constexpr int kPerLayer = 12;
  GradientSuffix ready(num_parameters_, on_ready);
  if (absl::Status s = ready.DoneFrom(g_.lnfw - grads_); !s.ok()) return s;

  // dresidual_ carries the gradient of the residual stream from layer to
  // layer: on entry to layer l it is d(residual3[l]); since
  // residual3 = residual2 + fcproj, it is also d(fcproj) and the first part
  // of d(residual2); LayerNorm 2 adds the rest, and so on.
  for (int l = config_.n_layer() - 1; l >= 0; --l) {
    const LayerTensors& w = p_.layers[l];
    const LayerTensors& dw = g_.layers[l];
    const LayerActivations& a = acts_[l];
    const float* residual = l == 0 ? encoded_ : acts_[l - 1].residual3;

    be.Zero(dfch_gelu_, 4 * NC);
    be.MatmulBackward(dfch_gelu_, dw.fcprojw, dw.fcprojb, dresidual_,
                      a.fch_gelu, w.fcprojw, N, 4 * C, C);
    be.Zero(dfch_, 4 * NC);
    be.GeluBackward(dfch_, a.fch, dfch_gelu_, 4 * NC);
    be.Zero(dln_, NC);
    be.MatmulBackward(dln_, dw.fcw, dw.fcb, dfch_, a.ln2, w.fcw, N, C, 4 * C);
    be.LayerNormBackward(dresidual_, dw.ln2w, dw.ln2b, dln_, a.residual2,
                         w.ln2w, a.ln2_mean, a.ln2_rstd, N, C);
    // dresidual_ is now d(residual2) = d(attproj) + d(residual).
    be.Zero(datty_, NC);
    be.MatmulBackward(datty_, dw.attprojw, dw.attprojb, dresidual_, a.atty,
                      w.attprojw, N, C, C);
    be.Zero(dqkv_, 3 * NC);
    be.AttentionBackward(dqkv_, datt_, datty_, a.qkv, a.att, B, T, C, NH);
    be.Zero(dln_, NC);
    be.MatmulBackward(dln_, dw.qkvw, dw.qkvb, dqkv_, a.ln1, w.qkvw, N, C,
                      3 * C);
    be.LayerNormBackward(dresidual_, dw.ln1w, dw.ln1b, dln_, residual, w.ln1w,
                         a.ln1_mean, a.ln1_rstd, N, C);
    if (absl::Status s =
            ready.DoneFrom(offsets_[2 + static_cast<size_t>(l) * kPerLayer]);
        !s.ok()) {
      return s;
    }
  }
  be.EncoderBackward(g_.wte, g_.wpe, dresidual_, tokens_, B, T, C);
  if (absl::Status s = ready.DoneFrom(0); !s.ok()) return s;
  return be.Synchronize();
}

absl::StatusOr<std::vector<int32_t>> GptModel::Generate(
    absl::Span<const int32_t> prompt, int n_new, float temperature, int top_k,
    uint64_t seed) {
  return Generate(prompt, n_new,
                  SamplingOptions{.temperature = temperature, .top_k = top_k},
                  seed);
}

absl::StatusOr<std::vector<int32_t>> GptModel::Generate(
    absl::Span<const int32_t> prompt, int n_new,
    const SamplingOptions& sampling, uint64_t seed, int32_t stop_token) {
  if (prompt.empty()) {
    return absl::InvalidArgumentError("gpt: Generate needs a non-empty prompt");
  }
  if (n_new < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("gpt: n_new must be >= 0, got ", n_new));
  }
  const int V = config_.vocab_size();
  if (absl::Status s = ValidateSampling(sampling, V); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("gpt: ", s.message()));
  }
  if (absl::Status s = CheckTokens(prompt.data(), "prompt", prompt.size());
      !s.ok()) {
    return s;
  }
  const uint64_t key = StableKey(seed, "gpt.generate");
  std::vector<int32_t> context(prompt.begin(), prompt.end());
  std::vector<int32_t> generated;
  generated.reserve(n_new);
  std::vector<float> logits(V);
  std::vector<double> scratch;
  for (int step = 0; step < n_new; ++step) {
    const int T = static_cast<int>(
        std::min<size_t>(context.size(), static_cast<size_t>(max_seq_)));
    const int32_t* window = context.data() + context.size() - T;
    absl::StatusOr<float> fwd = Forward(window, nullptr, 1, T);
    if (!fwd.ok()) return fwd.status();
    if (absl::Status s = backend_->CopyToHost(
            logits.data(), logits_ + static_cast<size_t>(T - 1) * V, V);
        !s.ok()) {
      return s;
    }
    const int32_t next =
        SampleToken(logits, sampling,
                    UniformDouble(key, static_cast<uint64_t>(step)), &scratch);
    if (next == stop_token) break;
    context.push_back(next);
    generated.push_back(next);
  }
  return generated;
}

}  // namespace lmps
