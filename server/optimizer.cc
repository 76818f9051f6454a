#include "server/optimizer.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace lmps {

double ClipScale(double grad_clip, double global_norm) {
  if (!(grad_clip > 0)) return 1.0;
  return std::min(1.0, grad_clip / (global_norm + 1e-6));
}

double BlockMeanAndSumSquares(float replicas, absl::Span<float> g) {
  // The division vectorizes (x / 1 == x: skipped for one replica). The
  // squares go to kNormLanes independent double sums, lane i % kNormLanes,
  // each in index order: a fixed order (so fixed rounding) that vectorizes
  // and does not wait on one chain of dependent additions.
  float* __restrict gp = g.data();
  const size_t n = g.size();
  if (replicas != 1.0f) {
    for (size_t i = 0; i < n; ++i) gp[i] /= replicas;
  }
  double lane[kNormLanes] = {};
  size_t i = 0;
  for (; i + kNormLanes <= n; i += kNormLanes) {
    for (size_t j = 0; j < kNormLanes; ++j) {
      lane[j] += static_cast<double>(gp[i + j]) * gp[i + j];
    }
  }
  for (size_t j = 0; i < n; ++i, ++j) {
    lane[j] += static_cast<double>(gp[i]) * gp[i];
  }
  double sum_squares = 0;
  for (size_t j = 0; j < kNormLanes; ++j) sum_squares += lane[j];
  return sum_squares;
}

double ShardMeanAndSumSquares(float replicas,
                              absl::Span<const absl::Span<float>> chunks,
                              ThreadPool* pool) {
  std::vector<int64_t> sizes;
  sizes.reserve(chunks.size());
  for (const absl::Span<float>& c : chunks) {
    sizes.push_back(static_cast<int64_t>(c.size()));
  }
  std::vector<double> block_sums(NumBlocks(sizes, kNormBlockElements));
  ParallelForBlocks(pool, sizes, kNormBlockElements,
                    [&](int task, int chunk, int64_t begin, int64_t end) {
                      block_sums[task] = BlockMeanAndSumSquares(
                          replicas, chunks[chunk].subspan(begin, end - begin));
                    });
  double sum_squares = 0;
  for (double b : block_sums) sum_squares += b;
  return sum_squares;
}

int OptimizerStateBuffers(OptimizerType type) { return type == SGD ? 1 : 2; }

void AdamWStep(const AdamWHyper& h, float grad_scale,
               absl::Span<const float> grads, absl::Span<float> params,
               absl::Span<float> m, absl::Span<float> v) {
  const double t = static_cast<double>(h.step + 1);
  const float decay =
      h.weight_decay != 0 ? static_cast<float>(1.0 - h.lr * h.weight_decay)
                          : 1.0f;
  const float b1 = static_cast<float>(h.beta1);
  const float b2 = static_cast<float>(h.beta2);
  const float one_minus_b1 = static_cast<float>(1.0 - h.beta1);
  const float one_minus_b2 = static_cast<float>(1.0 - h.beta2);
  const float step_size =
      static_cast<float>(h.lr / (1.0 - std::pow(h.beta1, t)));
  const float bc2_sqrt =
      static_cast<float>(std::sqrt(1.0 - std::pow(h.beta2, t)));
  const float eps = static_cast<float>(h.eps);
  // Raw restrict pointers and an unconditional decay (x * 1.0f == x
  // bitwise) let the compiler vectorize the loop; the per-element
  // operations and their order are those of the formula above, and
  // vsqrtps/vdivps round exactly as their scalar forms, so the result is
  // bitwise the scalar loop's (OptimizerTest checks it against one).
  const float* __restrict gp = grads.data();
  float* __restrict pp = params.data();
  float* __restrict mp = m.data();
  float* __restrict vp = v.data();
  const size_t n = params.size();
  for (size_t i = 0; i < n; ++i) {
    const float g = gp[i] * grad_scale;
    const float p = pp[i] * decay;
    const float mi = b1 * mp[i] + one_minus_b1 * g;
    const float vi = b2 * vp[i] + one_minus_b2 * (g * g);
    mp[i] = mi;
    vp[i] = vi;
    const float denom = std::sqrt(vi) / bc2_sqrt + eps;
    pp[i] = p - step_size * (mi / denom);
  }
}

void SgdMomentumStep(const SgdHyper& h, float grad_scale,
                     absl::Span<const float> grads, absl::Span<float> params,
                     absl::Span<float> momentum_buffer) {
  const float decay =
      h.weight_decay != 0 ? static_cast<float>(1.0 - h.lr * h.weight_decay)
                          : 1.0f;
  const float mu = static_cast<float>(h.momentum);
  const float lr = static_cast<float>(h.lr);
  const float* __restrict gp = grads.data();
  float* __restrict pp = params.data();
  float* __restrict bp = momentum_buffer.data();
  const size_t n = params.size();
  for (size_t i = 0; i < n; ++i) {
    const float g = gp[i] * grad_scale;
    const float p = pp[i] * decay;
    const float b = mu * bp[i] + g;
    bp[i] = b;
    pp[i] = p - lr * b;
  }
}

void OptimizerStep(const OptimizerConfig& opt, double lr, int64_t step,
                   bool decays, float grad_scale, absl::Span<const float> grads,
                   absl::Span<float> params,
                   absl::Span<const absl::Span<float>> state) {
  // Negative values mean "disabled" (see lmps.proto).
  const double wd = decays ? std::max(0.0f, opt.weight_decay()) : 0.0;
  if (opt.type() == SGD) {
    SgdHyper h;
    h.lr = lr;
    h.momentum = std::max(0.0f, opt.momentum());
    h.weight_decay = wd;
    SgdMomentumStep(h, grad_scale, grads, params, state[0]);
  } else {
    AdamWHyper h;
    h.lr = lr;
    h.beta1 = opt.beta1();
    h.beta2 = opt.beta2();
    h.eps = opt.eps();
    h.weight_decay = wd;
    h.step = step;
    AdamWStep(h, grad_scale, grads, params, state[0], state[1]);
  }
}

}  // namespace lmps
