#include "server/tensor_codec.h"

#include <cstring>

#include "common/model/bf16.h"

namespace lmps {

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "payload encoding assumes a little-endian host"
#endif

int DTypeSize(DType dtype) {
  switch (dtype) {
    case DTYPE_UNSPECIFIED:
    case F32:
      return 4;
    case BF16:
      return 2;
    default:
      return 0;
  }
}

int64_t FirstNonFinite(DType dtype, absl::string_view data) {
  if (dtype == BF16) {
    const int64_t n = static_cast<int64_t>(data.size() / 2);
    for (int64_t i = 0; i < n; ++i) {
      uint16_t b;
      std::memcpy(&b, data.data() + 2 * i, 2);
      if ((b & 0x7f80u) == 0x7f80u) return i;
    }
    return -1;
  }
  const int64_t n = static_cast<int64_t>(data.size() / 4);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, data.data() + 4 * i, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return i;
  }
  return -1;
}

void DecodePayload(DType dtype, absl::string_view data, float* out) {
  if (dtype == BF16) {
    Bf16ToFloat(data.data(), static_cast<int64_t>(data.size() / 2), out);
    return;
  }
  if (!data.empty()) std::memcpy(out, data.data(), data.size() / 4 * 4);
}

void EncodePayload(DType dtype, const float* values, int64_t n,
                   std::string* out) {
  if (dtype == BF16) {
    const size_t start = out->size();
    out->resize(start + 2 * n);
    FloatToBf16(values, n, out->data() + start);
    return;
  }
  out->append(reinterpret_cast<const char*>(values), 4 * n);
}

}  // namespace lmps
