// StageModel's layers: the embedding, the transformer blocks and the head,
// forward and backward, with tensor, sequence and vocabulary parallelism
// (partition math in stage_model.h and tp_collectives.h).
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/rpc/status_util.h"
#include "worker/model/stage_model.h"
#include "worker/model/tp_collectives.h"

namespace lmps {

absl::StatusOr<const float*> StageModel::FullTokens(const float* local,
                                                     int N) {
  if (!sp_) return local;
  const size_t NC = static_cast<size_t>(N) * options_.config.n_embd();
  LMPS_RETURN_IF_ERROR(
      GatherTokensForward(*comm_, *backend_, local, gather_, NC));
  return gather_;
}

absl::StatusOr<const float*> StageModel::SumPartialOutput(int N) {
  const size_t NC = static_cast<size_t>(N) * options_.config.n_embd();
  if (!sp_) {
    LMPS_RETURN_IF_ERROR(AllReduce(proj_, NC));
    return proj_;
  }
  LMPS_RETURN_IF_ERROR(
      ScatterTokensForward(*comm_, *backend_, proj_, scatter_, NC));
  return scatter_;
}

absl::StatusOr<const float*> StageModel::SumPartialInputGrad(int N) {
  const size_t NC = static_cast<size_t>(N) * options_.config.n_embd();
  if (!sp_) {
    LMPS_RETURN_IF_ERROR(AllReduce(dln_, NC));
    return dln_;
  }
  // The conjugate of the forward all-gather of the LayerNorm output.
  LMPS_RETURN_IF_ERROR(
      GatherTokensBackward(*comm_, *backend_, dln_, dln_local_, NC));
  return dln_local_;
}

absl::StatusOr<float*> StageModel::FullOutputGrad(int N) {
  if (!sp_) return dresidual_;
  const size_t NC = static_cast<size_t>(N) * options_.config.n_embd();
  // The conjugate of the forward reduce-scatter of the row-parallel output.
  LMPS_RETURN_IF_ERROR(
      ScatterTokensBackward(*comm_, *backend_, dresidual_, dgather_, NC));
  return dgather_;
}

absl::Status StageModel::AccumulateLayerNormGrads(float* a, float* b,
                                                  size_t n) {
  const size_t total = b == nullptr ? n : 2 * n;
  LMPS_RETURN_IF_ERROR(AllReduce(ln_grad_, total));
  backend_->Axpy(a, 1.0f, ln_grad_, n);
  if (b != nullptr) backend_->Axpy(b, 1.0f, ln_grad_ + n, n);
  return absl::OkStatus();
}

absl::Status StageModel::EmbeddingForward(Slot& s, int B, int T) {
  const int N = B * T, C = options_.config.n_embd();
  const size_t NC = static_cast<size_t>(N) * C;
  const size_t NlC = static_cast<size_t>(LocalTokens(N)) * C;
  Backend& be = *backend_;
  // The embedding of all N tokens (partial with vocab parallelism) goes to
  // s.input, or to gather_ when only a chunk of it stays.
  float* full = sp_ ? gather_ : s.input;
  if (vp_) {
    const std::vector<int32_t> ids =
        LocalTokenIds(vocab_shard(), s.host_tokens.data(), N);
    LMPS_RETURN_IF_ERROR(be.CopyToBackend(s.local_ids, ids.data(), N));
    // partial[N,C] = wte_r[tokens held] (0 elsewhere) + wpe on rank 0.
    LMPS_RETURN_IF_ERROR(VocabParallelEmbeddingForward(
        be, full, s.local_ids, s.host_tokens.data(), vocab_shard(), p_.wte,
        p_.wpe, zero_wpe_, options_.tp_rank == 0, B, T, C));
    if (sp_) return ScatterTokensForward(*comm_, be, full, s.input, NC);
    return AllReduce(s.input, NC);
  }
  // encoded[B,T,C] = wte[tokens] + wpe[t] (replicated on every tp rank).
  be.EncoderForward(full, s.tokens, p_.wte, p_.wpe, B, T, C);
  if (sp_) {
    BackendCopy(be, s.input, gather_ + options_.tp_rank * NlC, NlC);
  }
  return absl::OkStatus();
}

absl::Status StageModel::EmbeddingBackward(Slot& s, int B, int T) {
  const int C = options_.config.n_embd();
  // The full gradient of the embedding output, identical on every rank:
  // replicated already, or all-gathered from the token chunks (the
  // conjugate of the forward slice / reduce-scatter).
  LMPS_ASSIGN_OR_RETURN(float* dfull, FullOutputGrad(B * T));
  if (vp_) {
    return VocabParallelEmbeddingBackward(
        *backend_, g_.wte, g_.wpe, dwpe_scratch_, dfull, s.local_ids,
        s.host_tokens.data(), vocab_shard(), B, T, C);
  }
  backend_->EncoderBackward(g_.wte, g_.wpe, dfull, s.tokens, B, T, C);
  return absl::OkStatus();
}

absl::Status StageModel::BlocksForward(Slot& s, int B, int T) {
  const int N = B * T, Nl = LocalTokens(N);
  const int C = options_.config.n_embd(), Cl = Cl_, NHl = NHl_;
  const size_t NlC = static_cast<size_t>(Nl) * C;
  const bool rank0 = options_.tp_rank == 0;
  Backend& be = *backend_;
  const float* residual = s.input;
  for (int i = 0; i < num_layers_; ++i) {
    const LayerTensors& w = p_.layers[i];
    const LayerActivations& a = s.layers[i];
    // LayerNorm on the local tokens (all of them without sequence
    // parallelism).
    be.LayerNormForward(a.ln1, a.ln1_mean, a.ln1_rstd, residual, w.ln1w,
                        w.ln1b, Nl, C);
    // Column-parallel c_attn on all N tokens (all-gathered with sequence
    // parallelism): qkv[N,3Cl] = ln1[N,C] @ W_r[3Cl,C]^T + b_r, i.e. q|k|v
    // of this rank's NHl heads.
    LMPS_ASSIGN_OR_RETURN(const float* ln1, FullTokens(a.ln1, N));
    be.MatmulForward(a.qkv, ln1, w.qkvw, w.qkvb, N, C, 3 * Cl);
    be.AttentionForward(a.atty, a.att, a.qkv, B, T, Cl, NHl);
    // Row-parallel c_proj: proj[N,C] = sum_r atty_r[N,Cl] @ W_r[C,Cl]^T + b,
    // the bias added by rank 0 only; summed by all-reduce, or by
    // reduce-scatter to the local tokens.
    be.MatmulForward(proj_, a.atty, w.attprojw, rank0 ? w.attprojb : nullptr,
                     N, Cl, C);
    LMPS_ASSIGN_OR_RETURN(const float* attn_out, SumPartialOutput(N));
    be.ResidualForward(a.residual2, residual, attn_out, NlC);
    be.LayerNormForward(a.ln2, a.ln2_mean, a.ln2_rstd, a.residual2, w.ln2w,
                        w.ln2b, Nl, C);
    // Column-parallel c_fc: fch[N,4Cl] = ln2[N,C] @ W_r[4Cl,C]^T + b_r.
    LMPS_ASSIGN_OR_RETURN(const float* ln2, FullTokens(a.ln2, N));
    be.MatmulForward(a.fch, ln2, w.fcw, w.fcb, N, C, 4 * Cl);
    be.GeluForward(a.fch_gelu, a.fch, static_cast<size_t>(N) * 4 * Cl);
    // Row-parallel mlp.c_proj: proj[N,C] = sum_r gelu_r[N,4Cl] @
    // W_r[C,4Cl]^T + b (rank 0).
    be.MatmulForward(proj_, a.fch_gelu, w.fcprojw,
                     rank0 ? w.fcprojb : nullptr, N, 4 * Cl, C);
    LMPS_ASSIGN_OR_RETURN(const float* mlp_out, SumPartialOutput(N));
    be.ResidualForward(a.residual3, a.residual2, mlp_out, NlC);
    residual = a.residual3;
  }
  return absl::OkStatus();
}

absl::Status StageModel::BlocksBackward(Slot& s, int B, int T,
                                        GradientSuffix& ready) {
  const int N = B * T, Nl = LocalTokens(N);
  const int C = options_.config.n_embd(), Cl = Cl_, NHl = NHl_;
  const size_t NC = static_cast<size_t>(N) * C;
  const size_t NCl = static_cast<size_t>(N) * Cl;
  const bool rank0 = options_.tp_rank == 0;
  Backend& be = *backend_;

  // dresidual_ carries the gradient of the residual stream (local tokens)
  // from block to block: on entry to block i it is d(residual3[i]) = d(mlp
  // proj output), the first part of d(residual2); LayerNorm 2 adds the
  // rest, and so on (see GptModel::Backward). Without sequence parallelism
  // it is replicated on every tp rank.
  for (int i = num_layers_ - 1; i >= 0; --i) {
    const LayerTensors& w = p_.layers[i];
    const LayerTensors& dw = g_.layers[i];
    const LayerActivations& a = s.layers[i];
    const float* residual = i == 0 ? s.input : s.layers[i - 1].residual3;
    // Sequence parallel: the LayerNorm gradients of this micro-batch are
    // partial (local tokens): ln_2's go to ln_grad_[0, 2C), ln_1's to
    // [2C, 4C), summed over the group at the end of the block.
    if (sp_) be.Zero(ln_grad_, 4 * static_cast<size_t>(C));
    float* dln2w = sp_ ? ln_grad_ : dw.ln2w;
    float* dln2b = sp_ ? ln_grad_ + C : dw.ln2b;
    float* dln1w = sp_ ? ln_grad_ + 2 * C : dw.ln1w;
    float* dln1b = sp_ ? ln_grad_ + 3 * C : dw.ln1b;

    // Row-parallel mlp.c_proj: its output gradient is the same on every
    // rank (replicated, or all-gathered from the token chunks), so the local
    // products need no communication; the bias gradient is rank 0's.
    LMPS_ASSIGN_OR_RETURN(const float* dmlp_out, FullOutputGrad(N));
    be.Zero(dfch_gelu_, 4 * NCl);
    be.MatmulBackward(dfch_gelu_, dw.fcprojw, rank0 ? dw.fcprojb : nullptr,
                      dmlp_out, a.fch_gelu, w.fcprojw, N, 4 * Cl, C);
    be.Zero(dfch_, 4 * NCl);
    be.GeluBackward(dfch_, a.fch, dfch_gelu_, 4 * NCl);
    // Column-parallel c_fc: each rank has a partial d(ln2)[N,C] =
    // dfch_r @ W_r; their sum (all-reduce, or reduce-scatter to the local
    // tokens) is the gradient. Its input ln2 is re-gathered.
    LMPS_ASSIGN_OR_RETURN(const float* ln2, FullTokens(a.ln2, N));
    be.Zero(dln_, NC);
    be.MatmulBackward(dln_, dw.fcw, dw.fcb, dfch_, ln2, w.fcw, N, C, 4 * Cl);
    LMPS_ASSIGN_OR_RETURN(const float* dln2, SumPartialInputGrad(N));
    be.LayerNormBackward(dresidual_, dln2w, dln2b, dln2, a.residual2, w.ln2w,
                         a.ln2_mean, a.ln2_rstd, Nl, C);
    // dresidual_ is now d(residual2) = d(attn proj output) + d(residual).
    // Row-parallel attn.c_proj.
    LMPS_ASSIGN_OR_RETURN(const float* dattn_out, FullOutputGrad(N));
    be.Zero(datty_, NCl);
    be.MatmulBackward(datty_, dw.attprojw, rank0 ? dw.attprojb : nullptr,
                      dattn_out, a.atty, w.attprojw, N, Cl, C);
    be.Zero(dqkv_, 3 * NCl);
    be.AttentionBackward(dqkv_, datt_, datty_, a.qkv, a.att, B, T, Cl, NHl);
    // Column-parallel c_attn: partial d(ln1), summed over the group.
    LMPS_ASSIGN_OR_RETURN(const float* ln1, FullTokens(a.ln1, N));
    be.Zero(dln_, NC);
    be.MatmulBackward(dln_, dw.qkvw, dw.qkvb, dqkv_, ln1, w.qkvw, N, C,
                      3 * Cl);
    LMPS_ASSIGN_OR_RETURN(const float* dln1, SumPartialInputGrad(N));
    be.LayerNormBackward(dresidual_, dln1w, dln1b, dln1, residual, w.ln1w,
                         a.ln1_mean, a.ln1_rstd, Nl, C);
    if (sp_) {
      // ln_grad_ = [dln2w | dln2b | dln1w | dln1b], all-reduced once; ln_2
      // and ln_1 are each a contiguous (weight, bias) pair.
      LMPS_RETURN_IF_ERROR(AllReduce(ln_grad_, 4 * static_cast<size_t>(C)));
      be.Axpy(dw.ln2w, 1.0f, ln_grad_, 2 * static_cast<size_t>(C));
      be.Axpy(dw.ln1w, 1.0f, ln_grad_ + 2 * C, 2 * static_cast<size_t>(C));
    }
    // ln_1.weight is the block's first tensor (GptTensorSpecs order).
    LMPS_RETURN_IF_ERROR(ready.DoneFrom(dw.ln1w - grads_));
  }
  return absl::OkStatus();
}

absl::Status StageModel::HeadForward(Slot& s, const int32_t* targets, int B,
                                     int T, float* loss, SlotState* state) {
  const int N = B * T, Nl = LocalTokens(N);
  const int C = options_.config.n_embd();
  Backend& be = *backend_;
  be.LayerNormForward(s.lnf, s.lnf_mean, s.lnf_rstd, StageOutput(s), p_.lnfw,
                      p_.lnfb, Nl, C);
  LMPS_ASSIGN_OR_RETURN(const float* lnf, FullTokens(s.lnf, N));
  if (targets == nullptr) {
    // Logits only, kept in the slot's probs buffer for LogitsToHost.
    // Tied LM head: logits[N,Vl] = lnf[N,C] @ wte[Vl,C]^T.
    be.MatmulForward(s.probs, lnf, p_.wte, nullptr, N, C, Vl_);
    LMPS_RETURN_IF_ERROR(be.Synchronize());
    *state = SlotState::kForwardNoTargets;
    *loss = 0;
    return absl::OkStatus();
  }
  LMPS_RETURN_IF_ERROR(be.CopyToBackend(s.targets, targets, N));
  // Tied LM head: logits[N,Vl] = lnf[N,C] @ wte[Vl,C]^T (shared scratch;
  // the backward pass needs only the probabilities). Vl = V, or V/tp with
  // vocab parallelism (the rank's columns, never gathered).
  be.MatmulForward(logits_, lnf, p_.wte, nullptr, N, C, Vl_);
  if (vp_) {
    s.host_targets.assign(targets, targets + N);
    LMPS_RETURN_IF_ERROR(VocabParallelCrossEntropyForward(
        *comm_, be, logits_, s.host_targets.data(), vocab_shard(), N, s.probs,
        host_losses_.data(), ce_scratch_));
  } else {
    be.CrossEntropyForward(s.losses, s.probs, logits_, s.targets, N, Vl_);
    LMPS_RETURN_IF_ERROR(be.CopyToHost(host_losses_.data(), s.losses, N));
  }
  double sum = 0.0;
  for (int i = 0; i < N; ++i) sum += host_losses_[i];
  *loss = static_cast<float>(sum / N);
  *state = SlotState::kForward;
  return absl::OkStatus();
}

absl::Status StageModel::HeadBackward(Slot& s, float grad_scale,
                                      GradientSuffix& ready) {
  const int N = s.B * s.T, Nl = LocalTokens(N);
  const int C = options_.config.n_embd();
  const size_t NC = static_cast<size_t>(N) * C;
  const size_t NlC = static_cast<size_t>(Nl) * C;
  Backend& be = *backend_;
  // d(mean loss)/d(losses[n]) = 1/N, times the caller's scale. logits_
  // serves as dlogits.
  float* dlogits = logits_;
  be.Zero(dlogits, static_cast<size_t>(N) * Vl_);
  if (vp_) {
    LMPS_RETURN_IF_ERROR(VocabParallelCrossEntropyBackward(
        be, s.probs, s.host_targets.data(), vocab_shard(), grad_scale / N, N,
        dlogits));
  } else {
    be.CrossEntropyBackward(dlogits, s.probs, s.targets, grad_scale / N, N,
                            Vl_);
  }
  // Tied head: the head's weight gradient lands in wte's gradient.
  LMPS_ASSIGN_OR_RETURN(const float* lnf, FullTokens(s.lnf, N));
  be.Zero(dln_, NC);
  be.MatmulBackward(dln_, g_.wte, nullptr, dlogits, lnf, p_.wte, N, C, Vl_);
  // d(lnf) on the local tokens: a partial sum over the vocabulary shards
  // (vocab parallel: all-reduce / reduce-scatter), else the full gradient on
  // every rank (sequence parallel: this rank's chunk of it).
  const float* dlnf = dln_;
  if (vp_) {
    LMPS_ASSIGN_OR_RETURN(dlnf, SumPartialInputGrad(N));
  } else if (sp_) {
    dlnf = dln_ + options_.tp_rank * NlC;
  }
  be.Zero(dresidual_, NlC);
  if (sp_) be.Zero(ln_grad_, 2 * static_cast<size_t>(C));
  be.LayerNormBackward(dresidual_, sp_ ? ln_grad_ : g_.lnfw,
                       sp_ ? ln_grad_ + C : g_.lnfb, dlnf, StageOutput(s),
                       p_.lnfw, s.lnf_mean, s.lnf_rstd, Nl, C);
  if (sp_) {
    // ln_f.weight and ln_f.bias are contiguous: one pair.
    LMPS_RETURN_IF_ERROR(AccumulateLayerNormGrads(
        g_.lnfw, nullptr, 2 * static_cast<size_t>(C)));
  }
  // ln_f's tensors are the last of the buffer.
  return ready.DoneFrom(g_.lnfw - grads_);
}

}  // namespace lmps
