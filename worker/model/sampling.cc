#include "worker/model/sampling.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace lmps {

absl::Status ValidateSampling(const SamplingOptions& o, int vocab_size) {
  if (!(o.temperature >= 0.0f) || std::isinf(o.temperature)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "temperature must be finite and >= 0, got ", o.temperature));
  }
  if (o.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be >= 0, got ", o.top_k));
  }
  if (!(o.top_p > 0.0f && o.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_p must be in (0, 1], got ", o.top_p));
  }
  if (o.vocab_limit < 0 || o.vocab_limit > vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocab_limit must be in [0, ", vocab_size, "], got ",
                     o.vocab_limit));
  }
  return absl::OkStatus();
}

int32_t SampleToken(absl::Span<const float> logits,
                    const SamplingOptions& o, double u,
                    std::vector<double>* scratch) {
  const int V = o.vocab_limit > 0 ? o.vocab_limit
                                  : static_cast<int>(logits.size());
  const float* l = logits.data();
  if (o.temperature == 0.0f) {
    return static_cast<int32_t>(std::max_element(l, l + V) - l);
  }
  // The top_k cut: the k-th largest logit.
  float threshold = -std::numeric_limits<float>::infinity();
  if (o.top_k > 0 && o.top_k < V) {
    std::vector<float> sorted(l, l + V);
    std::nth_element(sorted.begin(), sorted.begin() + (o.top_k - 1),
                     sorted.end(), std::greater<float>());
    threshold = sorted[o.top_k - 1];
  }
  const float maxval = *std::max_element(l, l + V);
  std::vector<double>& probs = *scratch;
  probs.assign(V, 0.0);
  double sum = 0.0;
  for (int v = 0; v < V; ++v) {
    if (l[v] < threshold) continue;
    probs[v] = std::exp((static_cast<double>(l[v]) - maxval) / o.temperature);
    sum += probs[v];
  }
  if (o.top_p < 1.0f) {
    // The nucleus: the most probable entries until top_p of the mass.
    std::vector<int32_t> order;
    for (int v = 0; v < V; ++v) {
      if (probs[v] > 0.0) order.push_back(v);
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return probs[a] > probs[b]; });
    const double target = static_cast<double>(o.top_p) * sum;
    double kept = 0.0;
    size_t n = 0;
    while (n < order.size() && (n == 0 || kept < target)) kept += probs[order[n++]];
    for (size_t i = n; i < order.size(); ++i) probs[order[i]] = 0.0;
    sum = kept;
  }
  const double x = u * sum;
  double cdf = 0.0;
  int32_t next = -1;
  for (int v = 0; v < V; ++v) {
    if (probs[v] == 0.0) continue;
    cdf += probs[v];
    next = v;  // the last eligible token absorbs rounding at the top
    if (x < cdf) break;
  }
  return next;
}

}  // namespace lmps
