// Tensor-parallel building blocks beyond the all-reduce: sequence
// parallelism's gather/scatter (Korthikanti et al., "Reducing Activation
// Recomputation in Large Transformer Models", 2022) and Megatron-LM's
// vocabulary-parallel embedding and cross-entropy (VocabParallelEmbedding,
// vocab_parallel_cross_entropy). Each has a forward and a backward function;
// the backward is the forward's adjoint (checked by finite differences in
// tp_collectives_test.cc).
//
// Notation: tp = comm.size(), r = comm.rank(), N tokens, C channels,
// Nl = N / tp, V vocabulary, Vl = V / tp.
//
// Sequence split: the flattened token dimension [B*T] (row-major [B,T]) is
// cut into tp contiguous chunks; rank r holds tokens [r*Nl, (r+1)*Nl). With
// B = 1 that is the sequence split of Megatron-LM; T % tp == 0 makes every
// chunk whole tokens for any B.
//   GatherTokens  forward: full[N,C] = all-gather(local[Nl,C])
//                 backward: dlocal[Nl,C] = reduce-scatter(dfull[N,C])
//                 (every rank's full output feeds a rank-local computation,
//                 so the full gradient is a sum over ranks)
//   ScatterTokens forward: local[Nl,C] = reduce-scatter(partial[N,C])
//                 backward: dpartial[N,C] = all-gather(dlocal[Nl,C])
//
// Vocabulary split: rank r holds rows [r*Vl, (r+1)*Vl) of wte.
//   Embedding forward: partial[N,C] = wte_r[tok - r*Vl] for tokens in the
//     rank's range, 0 for the others, + wpe[t] on rank 0 only; the caller
//     sums partials over ranks (all-reduce, or reduce-scatter with sequence
//     parallelism).
//   Embedding backward: from the full output gradient dout[N,C] (identical
//     on every rank): dwte_r[tok - r*Vl] += dout[n] for the rank's tokens,
//     dwpe[t] += dout[n] for every token (wpe is replicated and its
//     gradient the same on every rank).
//   Cross-entropy forward over logits_r[N,Vl] (the rank's columns of the
//     logits, never gathered): per token, m = max over ranks of the local
//     max (all-gather of tp*N maxima), S = sum over ranks of
//     sum_j exp(l_j - m) and z = the target's logit on the rank that holds
//     it, else 0 (one all-reduce of 2N); loss = log S - (z - m) (identical
//     on every rank), probs_r = exp(l - m) / S.
//   Cross-entropy backward: dlogits_r += dloss * (probs_r - onehot_r(target))
//     (no communication).
// The vocab-parallel embedding and cross-entropy stage their per-token
// arithmetic through host memory (a fused kernel per backend would be the
// fast path); the matmuls around them stay on the backend.
//
// Thread-safety: functions; a TpComm is used by one thread at a time.
#ifndef LMPS_WORKER_MODEL_TP_COLLECTIVES_H_
#define LMPS_WORKER_MODEL_TP_COLLECTIVES_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "worker/backend/backend.h"
#include "worker/model/tp_comm.h"

namespace lmps {

// full (backend, N*C) = all-gather of local (backend, N*C/tp).
absl::Status GatherTokensForward(TpComm& comm, Backend& be, const float* local,
                                 float* full, size_t full_n);
// dlocal (backend, N*C/tp) = reduce-scatter of dfull (backend, N*C).
absl::Status GatherTokensBackward(TpComm& comm, Backend& be,
                                  const float* dfull, float* dlocal,
                                  size_t full_n);
// local (backend, N*C/tp) = reduce-scatter of partial (backend, N*C).
absl::Status ScatterTokensForward(TpComm& comm, Backend& be,
                                  const float* partial, float* local,
                                  size_t full_n);
// dpartial (backend, N*C) = all-gather of dlocal (backend, N*C/tp).
absl::Status ScatterTokensBackward(TpComm& comm, Backend& be,
                                   const float* dlocal, float* dpartial,
                                   size_t full_n);

// dst[0..n) = src[0..n) within backend memory (Zero + Axpy: exact).
void BackendCopy(Backend& be, float* dst, const float* src, size_t n);

struct VocabShard {
  int v_begin = 0, v_end = 0;  // rows [v_begin, v_end) of wte
  int size() const { return v_end - v_begin; }
  bool Holds(int32_t token) const {
    return token >= v_begin && token < v_end;
  }
};

// Local row of each token (0 for tokens outside the shard; masked below).
std::vector<int32_t> LocalTokenIds(const VocabShard& shard,
                                   const int32_t* tokens, size_t n);

// out (backend, [B,T,C]) = the rank's partial embedding (see above).
// local_ids: backend [B*T], LocalTokenIds of tokens_host; zero_wpe: backend
// [T,C] zeros.
absl::Status VocabParallelEmbeddingForward(Backend& be, float* out,
                                           const int32_t* local_ids,
                                           const int32_t* tokens_host,
                                           const VocabShard& shard,
                                           const float* wte_local,
                                           const float* wpe,
                                           const float* zero_wpe,
                                           bool add_wpe, int B, int T, int C);
// dwte_local += ..., dwpe += ... from dout (backend [B,T,C], clobbered).
// dwpe_scratch: backend [T,C], clobbered.
absl::Status VocabParallelEmbeddingBackward(Backend& be, float* dwte_local,
                                            float* dwpe, float* dwpe_scratch,
                                            float* dout,
                                            const int32_t* local_ids,
                                            const int32_t* tokens_host,
                                            const VocabShard& shard, int B,
                                            int T, int C);

// logits: backend [N,Vl]; targets_host [N] global ids; writes probs
// (backend [N,Vl]) and losses_host [N]. scratch: backend, (tp + 2) * N.
absl::Status VocabParallelCrossEntropyForward(
    TpComm& comm, Backend& be, const float* logits,
    const int32_t* targets_host, const VocabShard& shard, int N, float* probs,
    float* losses_host, float* scratch);
// dlogits (backend [N,Vl]) += dloss * (probs - onehot of the targets held).
absl::Status VocabParallelCrossEntropyBackward(Backend& be, const float* probs,
                                               const int32_t* targets_host,
                                               const VocabShard& shard,
                                               float dloss, int N,
                                               float* dlogits);

}  // namespace lmps

#endif  // LMPS_WORKER_MODEL_TP_COLLECTIVES_H_
