// Optimizer math of the parameter servers: learning-rate schedule
// (LearningRate, common/model/learning_rate.h), global gradient-norm
// clipping, AdamW and SGD with momentum on flat fp32 spans.
//
// Clipping (identical to torch.nn.utils.clip_grad_norm_):
//   scale = min(1, grad_clip / (global_norm + 1e-6)) when grad_clip > 0,
//   else 1; every gradient is multiplied by `scale` before the update.
//
// AdamW (as torch.optim.AdamW, decoupled weight decay), t = step + 1:
//   p <- p * (1 - lr * wd)                    (wd = 0 for tensors without
//                                              the weight_decay flag)
//   m <- beta1 m + (1 - beta1) g
//   v <- beta2 v + (1 - beta2) g^2
//   p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// SGD with momentum (as torch.optim.SGD, dampening 0, not Nesterov), with
// the same decoupled weight decay as AdamW:
//   p <- p * (1 - lr * wd)
//   b <- momentum b + g                       (b starts at 0, so b1 = g1)
//   p <- p - lr b
//
// Element arithmetic is fp32 in a fixed order, so results are bit-for-bit
// reproducible. Thread-safety: pure functions.
#ifndef LMPS_SERVER_OPTIMIZER_H_
#define LMPS_SERVER_OPTIMIZER_H_

#include <cstddef>
#include <cstdint>

#include "absl/types/span.h"
#include "common/model/learning_rate.h"
#include "common/threads/thread_pool.h"
#include "proto/lmps.pb.h"

namespace lmps {

// Gradient multiplier for a global L2 norm; see above.
double ClipScale(double grad_clip, double global_norm);

// The mean of a summed gradient and its squared L2 norm, computed the same
// way by the shards and the ring all-reduce workers (bitwise, whatever the
// number of threads):
//   - a chunk is cut into blocks of kNormBlockElements (the last shorter);
//   - a block's sum: after dividing its g[i] by `replicas`, lane j (of
//     kNormLanes) sums (double) g[i]^2 over the block's i with
//     i % kNormLanes == j (i counted from the block's start), in index
//     order, from 0; the lanes are then added in lane order, from 0
//     (BlockMeanAndSumSquares);
//   - a shard's sum adds its blocks' sums, chunk by chunk in the shard's
//     order, block by block (ShardMeanAndSumSquares; the blocks may run on
//     a pool's threads);
//   - the job's sum adds the shards' sums in shard order, starting from 0
//     (PsClient::GradNorm).
inline constexpr int64_t kNormBlockElements = int64_t{1} << 16;
inline constexpr size_t kNormLanes = 8;
double BlockMeanAndSumSquares(float replicas, absl::Span<float> g);
// `chunks`: the shard's chunks of the summed gradient, divided in place.
// pool: nullptr runs the blocks on the calling thread.
double ShardMeanAndSumSquares(float replicas,
                              absl::Span<const absl::Span<float>> chunks,
                              ThreadPool* pool);

// Number of fp32 state buffers per parameter: 2 for AdamW (m, v), 1 for SGD
// (momentum buffer).
int OptimizerStateBuffers(OptimizerType type);

struct AdamWHyper {
  double lr = 0;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0;  // already 0 for tensors that do not decay
  int64_t step = 0;         // 0-based; bias correction uses step + 1
};

// One AdamW update of `params` with gradients `grads * grad_scale`.
// All spans have the same length.
void AdamWStep(const AdamWHyper& h, float grad_scale,
               absl::Span<const float> grads, absl::Span<float> params,
               absl::Span<float> m, absl::Span<float> v);

struct SgdHyper {
  double lr = 0;
  double momentum = 0;
  double weight_decay = 0;  // already 0 for tensors that do not decay
};

// One SGD-with-momentum update of `params` with gradients
// `grads * grad_scale`. All spans have the same length.
void SgdMomentumStep(const SgdHyper& h, float grad_scale,
                     absl::Span<const float> grads, absl::Span<float> params,
                     absl::Span<float> momentum_buffer);

// One step of `opt` (SGD with momentum, or AdamW) on one tensor's elements
// (or a part of them): learning rate `lr`, AdamW's bias correction for
// `step`, weight decay only if `decays` (and opt.weight_decay >= 0),
// gradients scaled by grad_scale (clipping). `state` holds
// OptimizerStateBuffers(opt.type()) spans as long as `params`. The shards
// (ParameterShard) and the ring all-reduce workers (DataParallelTrainer)
// both update through it, so their copies stay bitwise equal.
void OptimizerStep(const OptimizerConfig& opt, double lr, int64_t step,
                   bool decays, float grad_scale, absl::Span<const float> grads,
                   absl::Span<float> params,
                   absl::Span<const absl::Span<float>> state);

}  // namespace lmps

#endif  // LMPS_SERVER_OPTIMIZER_H_
