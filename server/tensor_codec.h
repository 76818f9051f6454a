// Payload encodings of the wire protocol (DType): little-endian fp32 and
// bfloat16, to and from fp32 arrays. DTYPE_UNSPECIFIED is treated as F32.
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

#include "absl/strings/string_view.h"
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

}  // namespace lmps

#endif  // LMPS_SERVER_TENSOR_CODEC_H_
