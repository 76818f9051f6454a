// Gradient compression with error feedback (TrainConfig.compression; the
// wire format is ChunkSlice's, proto/lmps.proto, decoded by the shards'
// server/tensor_codec.h).
//
// The unit is one push slice: n consecutive elements of one chunk, the
// worker's gradient g[0, n) and its residual r[0, n) (what earlier steps
// did not send). CompressSlice forms v = g + r (fp32), encodes v into the
// slice and leaves r' = v - decode(slice) as the residual for the next
// step:
//   TOPK:       the k = SparseCount(ratio, n) elements of largest |v| (ties:
//               the lower index), sent sparse with their exact fp32 values,
//               so decode(slice) + r' == v exactly (r' is v where unsent,
//               0 where sent).
//   RANDOMK:    the k elements with the smallest RandomBits(key, i)
//               (common/model/rng.h; ties: the lower index), key a pure
//               function of (seed, step, dp, pp and tp rank, tensor, chunk,
//               offset): a replacement worker picks the same indices. Sent
//               sparse like TOPK (the shard needs the indices: they are on
//               the wire, 4 bytes each), same exact sum.
//   QUANT_INT8: every element as int8 q = clamp(round(v / scale), -127,
//               127) with scale = max|v| / 127 (0 when v is all zero):
//               |r'| <= scale / 2 up to fp32 rounding.
// Each has a naive reference (Reference*, full sorts) that the fast path
// (nth_element) must equal; the tests compare them.
//
// Errors: InvalidArgument for a non-finite element of v (a NaN cannot be
// ranked and the shard would refuse it), for a max|v| so large that the
// int8 scale's decode could overflow, and for a config that
// ValidateCompression (common/model/job_spec.h) refuses.
//
// Thread-safety: pure functions.
#ifndef LMPS_WORKER_COMPRESSION_H_
#define LMPS_WORKER_COMPRESSION_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "proto/lmps.pb.h"

namespace lmps {

// Which slice of which push: keys RANDOMK's choice.
struct SliceKey {
  uint64_t seed = 0;  // train.seed
  int64_t step = 0;
  int dp_rank = 0, pp_rank = 0, tp_rank = 0;
  absl::string_view tensor;
  int chunk = 0;
  int64_t offset = 0;  // of the slice's first element within the chunk
};

// k of a sparse kind for n elements: min(n, max(1, ceil(ratio * n))); 0 for
// n = 0.
int64_t SparseCount(float ratio, int64_t n);

// The RNG stream RANDOMK draws the slice's element ranks from.
uint64_t RandomKStreamKey(const SliceKey& key);

// Encodes v = grad + residual_in (n elements each) into `out`'s dtype, data
// and, when sparse, sparse/num_elements/indices, and INT8 scale (tensor,
// chunk and offset are the caller's), and writes the new residual to
// residual_out[0, n) (it may alias residual_in). config.kind must not be
// COMPRESSION_NONE. On error `out` and residual_out are unspecified.
absl::Status CompressSlice(const CompressionConfig& config,
                           const SliceKey& key, const float* grad,
                           const float* residual_in, int64_t n,
                           float* residual_out, ChunkSlice* out);

// The chosen indices of a sparse kind for v[0, n), ascending: fast path
// (nth_element, O(n)) and the naive reference (a full sort, O(n log n)).
// Require every v finite.
std::vector<uint32_t> TopKIndices(const float* v, int64_t n, int64_t k);
std::vector<uint32_t> ReferenceTopKIndices(const float* v, int64_t n,
                                           int64_t k);
std::vector<uint32_t> RandomKIndices(uint64_t stream, int64_t n, int64_t k);
std::vector<uint32_t> ReferenceRandomKIndices(uint64_t stream, int64_t n,
                                              int64_t k);

// Bytes of the slice that carry the gradient on the wire: data, indices and
// INT8's 4-byte scale (as server/tensor_codec.h counts them).
int64_t CompressedWireBytes(const ChunkSlice& slice);

}  // namespace lmps

#endif  // LMPS_WORKER_COMPRESSION_H_
