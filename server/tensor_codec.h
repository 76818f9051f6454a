// Payload encodings of the wire protocol (DType): little-endian fp32 and
// bfloat16, to and from fp32 arrays. DTYPE_UNSPECIFIED is treated as F32.
// Compressed push slices (ChunkSlice.sparse / INT8 with a scale; see
// proto/lmps.proto) are validated and decoded to fp32 by SliceElements and
// DecodeSlice; a malformed slice is InvalidArgument, never a crash. The
// slice functions read received slices in place (ChunkSliceView, whose
// payload may lie across several of gRPC's slices; ViewOf for a
// ChunkSlice): a dense payload is decoded run by run without a copy, a
// sparse one (small) joined first.
//
// bf16 -> fp32 is exact (the bf16 bits are the upper half of the fp32);
// fp32 -> bf16 rounds to nearest, ties to even (as torch's .to(bfloat16));
// NaN stays NaN, +-Inf stay +-Inf (common/model/bf16.h).
//
// Thread-safety: pure functions.
#ifndef LMPS_SERVER_TENSOR_CODEC_H_
#define LMPS_SERVER_TENSOR_CODEC_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/wire/chunk_wire.h"
#include "proto/lmps.pb.h"

namespace lmps {

// Bytes per element: 4 for F32 / DTYPE_UNSPECIFIED, 2 for BF16, 0 for values
// that are not a DType.
int DTypeSize(DType dtype);

// The index of the first NaN or Inf among the elements of `data` (encoded as
// `dtype`), or -1 if all are finite. Requires data.size() % DTypeSize == 0.
int64_t FirstNonFinite(DType dtype, absl::string_view data);

// Decodes data.size() / DTypeSize(dtype) elements into `out`.
void DecodePayload(DType dtype, absl::string_view data, float* out);

// Appends n elements of `values` encoded as `dtype` to `out`.
void EncodePayload(DType dtype, const float* values, int64_t n,
                   std::string* out);
// Writes them to out[0, n * DTypeSize(dtype)).
void EncodePayloadTo(DType dtype, const float* values, int64_t n, char* out);

// Bytes per element of a push slice's data: DTypeSize, and 1 for INT8.
int PushDTypeSize(DType dtype);

// Checks the encoding of a push slice (not which chunk or range it names)
// and returns how many chunk elements it covers: len(data) / size when
// dense, num_elements when sparse. InvalidArgument (text without the
// chunk's name, for the caller to prefix) for: a dtype that is not F32,
// BF16 or INT8; data not a multiple of the element size; a scale that is
// not finite, negative, or so large that 128 * scale overflows, or set on a
// non-INT8 slice; sparse fields on a dense slice; num_elements < 0 or >
// 2^32; indices not a multiple of 4 bytes, not one per value, not strictly
// increasing or not < num_elements.
absl::StatusOr<int64_t> SliceElements(const ChunkSliceView& slice);

// Whether the slice has the form the job's compression kind sends
// (worker/compression.h): COMPRESSION_NONE dense F32 or BF16; TOPK and
// RANDOMK sparse F32; QUANT_INT8 dense INT8. InvalidArgument naming the
// slice's form and the kind otherwise (text without the chunk's name). A
// shard refuses the other forms so that a misconfigured or foreign pusher
// cannot mix encodings into a job. Requires SliceElements(slice).ok().
absl::Status SliceMatchesCompression(const ChunkSliceView& slice,
                                     CompressionKind kind);

// The first element (relative to the slice's offset) whose decoded value
// is NaN or Inf, or -1. Requires SliceElements(slice).ok().
int64_t FirstNonFiniteElement(const ChunkSliceView& slice);

// Writes the slice's n = SliceElements(slice) elements as fp32 to out[0, n)
// (0 where a sparse slice has no value). Requires SliceElements(slice).ok().
void DecodeSlice(const ChunkSliceView& slice, float* out);

// Adds the slice's n elements, decoded as DecodeSlice would, to acc[0, n):
// acc[i] += value[i] (value 0 where a sparse slice has none), bit for bit
// what DecodeSlice into a buffer followed by that addition gives, without
// the buffer (decoded block by block). Requires SliceElements(slice).ok().
void AccumulateSlice(const ChunkSliceView& slice, float* acc);

}  // namespace lmps

#endif  // LMPS_SERVER_TENSOR_CODEC_H_
