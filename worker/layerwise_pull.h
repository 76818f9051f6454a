// LayerwisePull: one step's parameter pull cut into layer groups that land
// in forward order while the forward pass runs (train.layerwise_pull;
// docs/parallelism.md, "Layer-wise pull pipelining").
//
// The flat parameter buffer (common/model/model_spec.h) is already in
// forward order: wte and wpe, the blocks from the first to the last, ln_f.
// A group is a contiguous range of it holding whole tensors (GptGroups: the
// embeddings, each block, ln_f). The constructor submits, for every group
// and every shard holding some of it, one PsClient::PullTensors transfer to
// the CommScheduler with priority = the group's index, so the first layers'
// parameters are asked for first and never wait behind later layers'
// (credits bound the bytes in flight). Each lands in `host` at its place;
// WaitFor(end) blocks until every group overlapping [0, end) has landed and
// hands each newly landed group to `copy` (on the caller's thread: the
// backend is single-threaded), so the model's forward pass of block l waits
// for block l's parameters only. The same bytes land in the same places
// as PsClient::Pull's, so training is bit-identical to a whole pull.
//
// Timing: total_seconds() is from the constructor to the last group landed
// (the communication); exposed_seconds() is how long WaitFor blocked (the
// part not hidden behind compute).
//
// Errors: the first failed transfer's status (naming the shard) is
// returned by every later WaitFor. The destructor turns the transfers still
// queued into no-ops and waits for those in flight (their RPCs end by
// their deadline).
//
// Thread-safety: WaitFor, the accessors and the destructor on one thread
// (the trainer's); the transfers run on the scheduler's threads and use
// `ps` only through PullTensors (see its thread-safety note); `host` is
// written by them until the group landed.
#ifndef LMPS_WORKER_LAYERWISE_PULL_H_
#define LMPS_WORKER_LAYERWISE_PULL_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "proto/lmps.pb.h"
#include "worker/comm_scheduler.h"
#include "worker/ps_client.h"

namespace lmps {

struct PullGroup {
  int64_t begin = 0;  // elements [begin, end) of the flat buffer
  int64_t end = 0;
  std::set<std::string> tensors;
};

// GptModel's groups (whole-model buffer, no pipeline view): {wte, wpe},
// then each block's 12 tensors, then {ln_f.weight, ln_f.bias}.
std::vector<PullGroup> GptPullGroups(const ModelConfig& model);

class LayerwisePull {
 public:
  // Starts pulling `step` into host[0, groups.back().end). `ps`,
  // `scheduler`, `groups` and `host` must outlive the object.
  LayerwisePull(PsClient* ps, CommScheduler* scheduler,
                const std::vector<PullGroup>* groups, int64_t step,
                float* host);
  LayerwisePull(const LayerwisePull&) = delete;
  LayerwisePull& operator=(const LayerwisePull&) = delete;
  ~LayerwisePull();

  // Waits until host[0, end) has landed, calling copy(begin, end) for each
  // landed group not yet copied, in order (a non-OK status is returned).
  absl::Status WaitFor(
      int64_t end, const std::function<absl::Status(int64_t, int64_t)>& copy);
  // WaitFor the whole buffer.
  absl::Status WaitAll(
      const std::function<absl::Status(int64_t, int64_t)>& copy);

  // After WaitAll succeeded: the smallest version the shards served.
  int64_t min_version() const;
  double total_seconds() const;
  double exposed_seconds() const { return exposed_; }
  // Steady-clock microseconds when the last group landed (0: not yet).
  int64_t landed_us() const;

 private:
  void Landed(int group, const absl::Status& status, int64_t version);

  PsClient* const ps_;
  const std::vector<PullGroup>* const groups_;
  float* const host_;
  const std::chrono::steady_clock::time_point start_;
  std::atomic<bool> cancelled_{false};
  mutable absl::Mutex mu_;
  std::vector<int> remaining_ ABSL_GUARDED_BY(mu_);  // transfers per group
  int pending_ ABSL_GUARDED_BY(mu_) = 0;             // transfers in all
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  int64_t min_version_ ABSL_GUARDED_BY(mu_) = INT64_MAX;
  std::chrono::steady_clock::time_point last_landed_ ABSL_GUARDED_BY(mu_);
  int64_t landed_us_ ABSL_GUARDED_BY(mu_) = 0;
  size_t copied_ = 0;  // groups handed to `copy` (trainer thread)
  double exposed_ = 0;
};

}  // namespace lmps

#endif  // LMPS_WORKER_LAYERWISE_PULL_H_
