#include "worker/layerwise_pull.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/model/model_spec.h"

namespace lmps {
namespace {

int64_t NowMicros() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// The forward-order group of a tensor: 0 for the embeddings, l + 1 for
// block l ("h.l. ..."), n_layer + 1 for ln_f.
int GroupOf(const std::string& name, int n_layer) {
  if (absl::StartsWith(name, "h.")) {
    const size_t dot = name.find('.', 2);
    int layer = 0;
    if (dot != std::string::npos &&
        absl::SimpleAtoi(name.substr(2, dot - 2), &layer)) {
      return layer + 1;
    }
  }
  if (absl::StartsWith(name, "ln_f.")) return n_layer + 1;
  return 0;
}

}  // namespace

std::vector<PullGroup> GptPullGroups(const ModelConfig& model) {
  std::vector<PullGroup> groups;
  int last = -1;
  int64_t offset = 0;
  for (const TensorSpec& t : GptTensorSpecs(model)) {
    const int g = GroupOf(t.name, model.n_layer());
    if (g != last) {
      groups.push_back({offset, offset, {}});
      last = g;
    }
    groups.back().tensors.insert(t.name);
    offset += t.num_elements();
    groups.back().end = offset;
  }
  return groups;
}

LayerwisePull::LayerwisePull(PsClient* ps, CommScheduler* scheduler,
                             const std::vector<PullGroup>* groups,
                             int64_t step, float* host)
    : ps_(ps),
      groups_(groups),
      host_(host),
      start_(std::chrono::steady_clock::now()) {
  const int elem = ps->pull_dtype() == BF16 ? 2 : 4;
  std::vector<std::pair<int, int64_t>> transfers;  // (shard, elements)
  absl::MutexLock lock(&mu_);
  remaining_.assign(groups->size(), 0);
  for (size_t g = 0; g < groups->size(); ++g) {
    for (int s = 0; s < ps->num_shards(); ++s) {
      const int64_t n = ps->HeldElements(s, (*groups)[g].tensors);
      if (n == 0) continue;
      ++remaining_[g];
      ++pending_;
      scheduler->Submit(static_cast<int>(g), n * elem, s, [this, g, s, step] {
        if (cancelled_) {
          Landed(static_cast<int>(g),
                 absl::CancelledError("layer-wise pull abandoned"), 0);
          return;
        }
        int64_t version = 0;
        const absl::Status st = ps_->PullTensors(
            step, s, (*groups_)[g].tensors, host_, &version);
        Landed(static_cast<int>(g), st, version);
      });
    }
  }
  last_landed_ = start_;
}

LayerwisePull::~LayerwisePull() {
  cancelled_ = true;
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int* pending) { return *pending == 0; }, &pending_));
}

void LayerwisePull::Landed(int group, const absl::Status& status,
                           int64_t version) {
  absl::MutexLock lock(&mu_);
  if (!status.ok() && status_.ok()) status_ = status;
  if (status.ok()) min_version_ = std::min(min_version_, version);
  --remaining_[group];
  --pending_;
  if (pending_ == 0) {
    last_landed_ = std::chrono::steady_clock::now();
    landed_us_ = NowMicros();
  }
}

absl::Status LayerwisePull::WaitFor(
    int64_t end, const std::function<absl::Status(int64_t, int64_t)>& copy) {
  while (copied_ < groups_->size() && (*groups_)[copied_].begin < end) {
    const size_t g = copied_;
    {
      absl::MutexLock lock(&mu_);
      auto landed = [this, g]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return remaining_[g] == 0 || !status_.ok();
      };
      if (!landed()) {
        const auto t0 = std::chrono::steady_clock::now();
        mu_.Await(absl::Condition(&landed));
        exposed_ += std::chrono::duration<double>(
                        std::chrono::steady_clock::now() - t0)
                        .count();
      }
      if (!status_.ok()) return status_;
    }
    const PullGroup& group = (*groups_)[g];
    if (absl::Status st = copy(group.begin, group.end); !st.ok()) return st;
    ++copied_;
  }
  return absl::OkStatus();
}

absl::Status LayerwisePull::WaitAll(
    const std::function<absl::Status(int64_t, int64_t)>& copy) {
  return WaitFor(groups_->empty() ? 0 : groups_->back().end, copy);
}

int64_t LayerwisePull::min_version() const {
  absl::MutexLock lock(&mu_);
  return min_version_ == INT64_MAX ? 0 : min_version_;
}

double LayerwisePull::total_seconds() const {
  absl::MutexLock lock(&mu_);
  return std::chrono::duration<double>(last_landed_ - start_).count();
}

int64_t LayerwisePull::landed_us() const {
  absl::MutexLock lock(&mu_);
  return landed_us_;
}

}  // namespace lmps
