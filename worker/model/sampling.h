// Choosing the next token from a model's logits: greedy, or sampling with
// temperature, top-k and top-p (nucleus), over the first `vocab_limit`
// entries (a vocabulary padded for speed, GPT-2's 50257 tokens in 50304
// rows, never yields a padding row).
//
// SampleToken(logits, options, u), with u uniform in [0, 1):
//   temperature 0: the index of the largest eligible logit (the first on
//     ties);
//   otherwise p_v ∝ exp((logit_v - max) / temperature) over the eligible
//     entries: those below vocab_limit, among the top_k largest logits
//     (top_k 0: all; ties at the k-th value are kept), and then the
//     smallest set of the most probable whose probability reaches top_p
//     (top_p 1: all; on equal probabilities the lower index first). The
//     token is the first v whose cumulative probability exceeds u; the last
//     eligible one absorbs rounding.
// The result is a pure function of its arguments.
//
// Thread-safety: pure functions.
#ifndef LMPS_WORKER_MODEL_SAMPLING_H_
#define LMPS_WORKER_MODEL_SAMPLING_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace lmps {

struct SamplingOptions {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: no top-k cut
  float top_p = 1.0f;        // 1: no nucleus cut; in (0, 1]
  int vocab_limit = 0;       // 0: every logit; else only [0, vocab_limit)
};

// InvalidArgument naming the option: temperature not finite or < 0,
// top_k < 0, top_p outside (0, 1], vocab_limit < 0 or > vocab_size.
absl::Status ValidateSampling(const SamplingOptions& options, int vocab_size);

// The next token for `logits` (one row of vocab_size) and u in [0, 1).
// `options` must have passed ValidateSampling. `scratch` is reused storage.
int32_t SampleToken(absl::Span<const float> logits,
                    const SamplingOptions& options, double u,
                    std::vector<double>* scratch);

}  // namespace lmps

#endif  // LMPS_WORKER_MODEL_SAMPLING_H_
