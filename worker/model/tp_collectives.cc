#include "worker/model/tp_collectives.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace lmps {

absl::Status GatherTokensForward(TpComm& comm, Backend& be, const float* local,
                                 float* full, size_t full_n) {
  return comm.AllGather(&be, local, full, full_n);
}

absl::Status GatherTokensBackward(TpComm& comm, Backend& be,
                                  const float* dfull, float* dlocal,
                                  size_t full_n) {
  return comm.ReduceScatterSum(&be, dfull, dlocal, full_n);
}

absl::Status ScatterTokensForward(TpComm& comm, Backend& be,
                                  const float* partial, float* local,
                                  size_t full_n) {
  return comm.ReduceScatterSum(&be, partial, local, full_n);
}

absl::Status ScatterTokensBackward(TpComm& comm, Backend& be,
                                   const float* dlocal, float* dpartial,
                                   size_t full_n) {
  return comm.AllGather(&be, dlocal, dpartial, full_n);
}

void BackendCopy(Backend& be, float* dst, const float* src, size_t n) {
  be.Zero(dst, n);
  be.Axpy(dst, 1.0f, src, n);
}

std::vector<int32_t> LocalTokenIds(const VocabShard& shard,
                                   const int32_t* tokens, size_t n) {
  std::vector<int32_t> ids(n);
  for (size_t i = 0; i < n; ++i) {
    ids[i] = shard.Holds(tokens[i]) ? tokens[i] - shard.v_begin : 0;
  }
  return ids;
}

namespace {

// Zeroes the rows [n, n+1) x C of `rows` ([N,C], backend) of every token the
// shard does not hold, one backend call per run of such tokens.
void ZeroForeignRows(Backend& be, float* rows, const int32_t* tokens,
                     const VocabShard& shard, int N, int C) {
  int n = 0;
  while (n < N) {
    if (shard.Holds(tokens[n])) {
      ++n;
      continue;
    }
    int end = n + 1;
    while (end < N && !shard.Holds(tokens[end])) ++end;
    be.Zero(rows + static_cast<size_t>(n) * C,
            static_cast<size_t>(end - n) * C);
    n = end;
  }
}

}  // namespace

absl::Status VocabParallelEmbeddingForward(Backend& be, float* out,
                                           const int32_t* local_ids,
                                           const int32_t* tokens_host,
                                           const VocabShard& shard,
                                           const float* wte_local,
                                           const float* wpe,
                                           const float* zero_wpe,
                                           bool add_wpe, int B, int T, int C) {
  // out[n] = wte_r[local_id[n]] (+ 0), then the foreign tokens' rows zeroed,
  // then wpe[t] added on the rank that owns the position term.
  be.EncoderForward(out, local_ids, wte_local, zero_wpe, B, T, C);
  ZeroForeignRows(be, out, tokens_host, shard, B * T, C);
  if (add_wpe) {
    const size_t TC = static_cast<size_t>(T) * C;
    for (int b = 0; b < B; ++b) be.Axpy(out + b * TC, 1.0f, wpe, TC);
  }
  return absl::OkStatus();
}

absl::Status VocabParallelEmbeddingBackward(Backend& be, float* dwte_local,
                                            float* dwpe, float* dwpe_scratch,
                                            float* dout,
                                            const int32_t* local_ids,
                                            const int32_t* tokens_host,
                                            const VocabShard& shard, int B,
                                            int T, int C) {
  const size_t TC = static_cast<size_t>(T) * C;
  // wpe: every token's gradient (before masking).
  for (int b = 0; b < B; ++b) be.Axpy(dwpe, 1.0f, dout + b * TC, TC);
  // wte: only the shard's tokens; the others' rows are zeroed so that their
  // placeholder id 0 receives nothing.
  ZeroForeignRows(be, dout, tokens_host, shard, B * T, C);
  be.Zero(dwpe_scratch, TC);
  be.EncoderBackward(dwte_local, dwpe_scratch, dout, local_ids, B, T, C);
  return absl::OkStatus();
}

absl::Status VocabParallelCrossEntropyForward(
    TpComm& comm, Backend& be, const float* logits,
    const int32_t* targets_host, const VocabShard& shard, int N, float* probs,
    float* losses_host, float* scratch) {
  const int tp = comm.size();
  const int Vl = shard.size();
  const size_t NV = static_cast<size_t>(N) * Vl;
  std::vector<float> l(NV);
  if (absl::Status s = be.CopyToHost(l.data(), logits, NV); !s.ok()) return s;
  // Per-token maxima of every rank (all-gather of [N] -> [tp, N]).
  std::vector<float> stats(static_cast<size_t>(tp + 2) * N);
  for (int n = 0; n < N; ++n) {
    const float* row = l.data() + static_cast<size_t>(n) * Vl;
    stats[n] = *std::max_element(row, row + Vl);
  }
  float* gathered = scratch;             // [tp, N]
  float* sums = scratch + tp * N;        // [2, N]: sum-exp, target logit
  if (absl::Status s = be.CopyToBackend(sums, stats.data(), N); !s.ok()) {
    return s;
  }
  if (absl::Status s = comm.AllGather(&be, sums, gathered,
                                      static_cast<size_t>(tp) * N);
      !s.ok()) {
    return s;
  }
  std::vector<float> maxima(static_cast<size_t>(tp) * N);
  if (absl::Status s = be.CopyToHost(maxima.data(), gathered, maxima.size());
      !s.ok()) {
    return s;
  }
  std::vector<float> m(N), local(2 * static_cast<size_t>(N));
  for (int n = 0; n < N; ++n) {
    float mx = maxima[n];
    for (int r = 1; r < tp; ++r) {
      mx = std::max(mx, maxima[static_cast<size_t>(r) * N + n]);
    }
    m[n] = mx;
    const float* row = l.data() + static_cast<size_t>(n) * Vl;
    double sum = 0;
    for (int j = 0; j < Vl; ++j) sum += std::exp(row[j] - mx);
    local[n] = static_cast<float>(sum);
    local[N + n] = shard.Holds(targets_host[n])
                       ? row[targets_host[n] - shard.v_begin]
                       : 0.0f;
  }
  if (absl::Status s = be.CopyToBackend(sums, local.data(), 2 * N); !s.ok()) {
    return s;
  }
  if (absl::Status s = comm.AllReduceSum(&be, sums, 2 * N); !s.ok()) return s;
  if (absl::Status s = be.CopyToHost(local.data(), sums, 2 * N); !s.ok()) {
    return s;
  }
  for (int n = 0; n < N; ++n) {
    const float S = local[n], z = local[N + n];
    losses_host[n] = std::log(S) - (z - m[n]);
    float* row = l.data() + static_cast<size_t>(n) * Vl;
    const float inv = 1.0f / S;
    for (int j = 0; j < Vl; ++j) row[j] = std::exp(row[j] - m[n]) * inv;
  }
  return be.CopyToBackend(probs, l.data(), NV);
}

absl::Status VocabParallelCrossEntropyBackward(Backend& be, const float* probs,
                                               const int32_t* targets_host,
                                               const VocabShard& shard,
                                               float dloss, int N,
                                               float* dlogits) {
  const int Vl = shard.size();
  const size_t NV = static_cast<size_t>(N) * Vl;
  // dlogits += dloss * probs, then -dloss at each held target.
  be.Axpy(dlogits, dloss, probs, NV);
  std::vector<float> row(Vl);
  for (int n = 0; n < N; ++n) {
    if (!shard.Holds(targets_host[n])) continue;
    float* at = dlogits + static_cast<size_t>(n) * Vl;
    const int j = targets_host[n] - shard.v_begin;
    // One element: host round trip of that element only.
    float v = 0;
    if (absl::Status s = be.CopyToHost(&v, at + j, 1); !s.ok()) return s;
    v -= dloss;
    if (absl::Status s = be.CopyToBackend(at + j, &v, 1); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace lmps
