// TpComm: the collective a tensor-parallel model shard needs, a sum
// all-reduce over its tensor-parallel group.
//
// Contract:
// - Every rank of the group calls the same sequence of AllReduceSum with the
//   same n (the model's forward and backward are deterministic in the order
//   of their collectives), after the same SetStep.
// - On return, data[0..n) on every rank holds the element-wise sum over the
//   group, bitwise identical on every rank.
// - `data` is backend memory of `backend`: an implementation over the
//   network (worker/peer: gRPC ring) stages it through host memory; one over
//   NCCL would use device memory directly. That is why the backend is
//   passed.
// - Errors (a dead or slow peer) name the peer; the caller fails the step.
//
// Thread-safety: used by one thread at a time (the training loop).
#ifndef LMPS_WORKER_MODEL_TP_COMM_H_
#define LMPS_WORKER_MODEL_TP_COMM_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "worker/backend/backend.h"

namespace lmps {

class TpComm {
 public:
  virtual ~TpComm() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // Starts a new phase: collectives are numbered from 0 within (step, eval),
  // which tags their messages.
  virtual void SetStep(int64_t step, bool eval) = 0;
  virtual absl::Status AllReduceSum(Backend* backend, float* data,
                                    size_t n) = 0;
};

}  // namespace lmps

#endif  // LMPS_WORKER_MODEL_TP_COMM_H_
