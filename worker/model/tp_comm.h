// TpComm: the collectives a tensor-parallel model shard needs over its
// tensor-parallel group: a sum all-reduce and, for sequence parallelism
// (Korthikanti et al. 2022), a sum reduce-scatter and an all-gather.
//
// Contract:
// - Every rank of the group calls the same sequence of collectives with the
//   same n (the model's forward and backward are deterministic in the order
//   of their collectives), after the same SetStep.
// - AllReduceSum: on return, data[0..n) on every rank holds the
//   element-wise sum over the group, bitwise identical on every rank.
// - ReduceScatterSum (n % size() == 0): in[0..n) is this rank's
//   contribution; on return out[0..n/size()) holds segment rank() of the
//   sum, i.e. elements [rank*n/size, (rank+1)*n/size). Each segment's sum
//   is a fixed function of the inputs (one summation order, whatever the
//   timing), so repeated runs are bitwise identical.
// - AllGather (n % size() == 0): in[0..n/size()) is this rank's segment;
//   on return out[0..n) holds every rank's segment in rank order (copies:
//   bitwise identical on every rank).
// - Conjugates (backward passes): the gradient of AllGather is
//   ReduceScatterSum of the output gradient, the gradient of
//   ReduceScatterSum is AllGather of the output gradient
//   (worker/model/tp_collectives.h).
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
  // `in` and `out` are backend memory and must not overlap.
  virtual absl::Status ReduceScatterSum(Backend* backend, const float* in,
                                        float* out, size_t n) = 0;
  virtual absl::Status AllGather(Backend* backend, const float* in,
                                 float* out, size_t n) = 0;
};

}  // namespace lmps

#endif  // LMPS_WORKER_MODEL_TP_COMM_H_
