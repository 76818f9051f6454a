// Reading and writing safetensors files (https://github.com/huggingface/
// safetensors), restricted to fp32 tensors (F16 and BF16 are widened to fp32
// when asked):
//
//   [8 bytes]  N, little-endian uint64: length of the JSON header
//   [N bytes]  JSON object, space-padded to a multiple of 8 bytes:
//                {"__metadata__": {"key": "value", ...},        (optional)
//                 "<name>": {"dtype": "F32", "shape": [d0, d1, ...],
//                            "data_offsets": [begin, end]}, ...}
//   [rest]     the data buffer; tensor bytes are [begin, end) of it,
//              row-major little-endian fp32.
//
// The writer stores tensors in the order given (callers pass the canonical
// order of common/model/model_spec.h), back to back, and writes the file
// atomically (temporary file, fsync, rename). The reader validates
// everything and returns InvalidArgument / DataLoss errors that name the
// file and the offending tensor: truncated files, header lengths past the
// end, malformed JSON, dtypes other than F32, shapes whose size does not
// match data_offsets, offsets outside the buffer, overlapping or
// non-contiguous tensors, duplicate names. Tensors of another dtype are
// an error, or, when asked (SafetensorsReadOptions), listed by name, dtype and
// shape without their data: Hugging Face checkpoints carry BOOL or F16
// buffers (e.g. attention masks) beside their F32 parameters.
//
// The JSON support is the minimum this header format needs (objects,
// arrays, strings, integers); it is not a general JSON library.
//
// Thread-safety: pure functions (files are not locked).
#ifndef LMPS_COMMON_FORMATS_SAFETENSORS_H_
#define LMPS_COMMON_FORMATS_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lmps {

struct SafeTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;  // row-major, product(shape) elements
  // The dtype in the file read: "F32", or "F16"/"BF16" widened to fp32
  // (SafetensorsReadOptions::widen_half). The writer always writes F32.
  std::string dtype = "F32";
};

// A tensor of a dtype other than F32, listed but not decoded.
struct OtherTensor {
  std::string name;
  std::string dtype;  // as in the file: "BOOL", "F16", "BF16", "I64", ...
  std::vector<int64_t> shape;
};

struct SafetensorsReadOptions {
  // false: a tensor of a dtype other than F32 is an InvalidArgument error.
  // true: such a tensor (of a dtype of the safetensors specification) is
  // validated like the others and listed in SafetensorsContents::others.
  bool list_other_dtypes = false;
  // true: F16 and BF16 tensors are decoded into SafetensorsContents::tensors
  // as fp32 (exactly: every half-precision value is a float; NaN stays NaN,
  // +-Inf stay +-Inf), with SafeTensor::dtype saying which they were.
  bool widen_half = false;
};

struct SafetensorsContents {
  std::vector<SafeTensor> tensors;  // F32 tensors in data-offset (file) order
  std::vector<OtherTensor> others;  // other dtypes (list_other_dtypes only)
  std::map<std::string, std::string> metadata;  // "__metadata__"

  // The tensor called `name`, or nullptr.
  const SafeTensor* Find(absl::string_view name) const;
};

// Serialises to the bytes of a safetensors file. InvalidArgument if a
// tensor's data size does not match its shape, a shape is negative, or a
// name is empty, repeated or "__metadata__".
absl::StatusOr<std::string> SerializeSafetensors(
    const std::vector<SafeTensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// The fp32 value of an IEEE binary16 (F16), exact (subnormals, +-Inf and NaN
// included).
float HalfBitsToFloat(uint16_t h);

// Parses and validates the bytes of a safetensors file. `source` names the
// bytes in error messages (e.g. the path).
absl::StatusOr<SafetensorsContents> ParseSafetensors(
    absl::string_view bytes, absl::string_view source = "safetensors",
    const SafetensorsReadOptions& options = {});

// Writes `path` atomically. Errors name the path.
absl::Status WriteSafetensorsFile(
    const std::string& path, const std::vector<SafeTensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// Reads and validates `path`.
absl::StatusOr<SafetensorsContents> ReadSafetensorsFile(
    const std::string& path, const SafetensorsReadOptions& options = {});

}  // namespace lmps

#endif  // LMPS_COMMON_FORMATS_SAFETENSORS_H_
