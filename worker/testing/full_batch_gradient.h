// Test helpers for the trainers' gradient scaling (worker/trainer_test,
// worker/pipeline/pipeline_trainer_test): a small training text, and the
// gradient that one data-parallel, micro-batched step must average to.
//
// Thread-safety: pure functions.
#ifndef LMPS_WORKER_TESTING_FULL_BATCH_GRADIENT_H_
#define LMPS_WORKER_TESTING_FULL_BATCH_GRADIENT_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "proto/lmps.pb.h"
#include "worker/backend/cpu_reference.h"
#include "worker/data/dataset.h"
#include "worker/model/gpt.h"

namespace lmps::testing {

// A few kilobytes of text, enough for the tests' context lengths.
inline absl::StatusOr<std::unique_ptr<TextDataset>> QuickBrownFoxData(
    const JobSpec& spec) {
  std::string text;
  for (int i = 0; i < 200; ++i) {
    absl::StrAppend(&text, "the quick brown fox ", i, " jumps over it. ");
  }
  return TextDataset::FromText(text, 0.1f, spec.model().block_size());
}

// The gradient of the mean loss over ALL spec.train().batch_size()
// sequences of the global batch of `step`, at `params` (GptTensorSpecs
// order), computed by one GptModel on the reference backend in one forward
// and backward pass with grad_scale 1. A SYNC step of any layout (each
// micro-batch's gradient scaled 1/M on the worker, the replicas' sum 1/dp
// on the shards) must average to exactly this, up to summation order.
inline absl::StatusOr<std::vector<float>> FullBatchGradient(
    const JobSpec& spec, const Dataset& data, int64_t step,
    const std::vector<float>& params) {
  const int B = spec.train().batch_size(), T = spec.model().block_size();
  absl::StatusOr<std::unique_ptr<ReferenceBackend>> backend =
      ReferenceBackend::Create();
  if (!backend.ok()) return backend.status();
  absl::StatusOr<std::unique_ptr<GptModel>> model =
      GptModel::Create(spec.model(), backend->get(), B, T);
  if (!model.ok()) return model.status();
  if (static_cast<int64_t>(params.size()) != (*model)->num_parameters()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "FullBatchGradient: ", params.size(), " parameters given, the model has ",
        (*model)->num_parameters()));
  }
  if (absl::Status s = (*model)->SetParametersFromHost(params.data()); !s.ok()) {
    return s;
  }
  std::vector<int32_t> tokens(B * T), targets(B * T);
  data.Batch(Split::kTrain, spec.train().seed(), step, B, /*first=*/0, B,
             tokens.data(), targets.data());
  (*model)->ZeroGrad();
  absl::StatusOr<float> loss =
      (*model)->Forward(tokens.data(), targets.data(), B, T);
  if (!loss.ok()) return loss.status();
  if (absl::Status s = (*model)->Backward(1.0f); !s.ok()) return s;
  std::vector<float> grad(params.size());
  if (absl::Status s = (*model)->GradientsToHost(grad.data()); !s.ok()) return s;
  return grad;
}

// How far `trained` is from one plain SGD step `initial - lr * grad`: the
// largest |difference| over the elements, and the largest step lr * |grad|
// (to show the comparison can tell a wrong scale: it must be well above
// the difference).
struct SgdStepError {
  double max_error = 0;
  double max_step = 0;
};
inline SgdStepError CompareWithSgdStep(const std::vector<float>& initial,
                                       const std::vector<float>& trained,
                                       const std::vector<float>& grad,
                                       double lr) {
  SgdStepError e;
  for (size_t i = 0; i < grad.size(); ++i) {
    const double step = lr * grad[i];
    e.max_error = std::max(e.max_error, std::fabs(trained[i] - (initial[i] - step)));
    e.max_step = std::max(e.max_step, std::fabs(step));
  }
  return e;
}

}  // namespace lmps::testing

#endif  // LMPS_WORKER_TESTING_FULL_BATCH_GRADIENT_H_
