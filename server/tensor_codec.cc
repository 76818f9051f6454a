#include "server/tensor_codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
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

namespace {

// The index of the first element of `data` (n elements of type U) whose
// exponent bits are all ones (an Inf or a NaN), or -1. Whole blocks of 64
// are scanned without an early exit (a loop the compiler vectorizes); the
// block that holds one, and the tail, are searched element by element.
template <typename U>
int64_t FirstAllOnesExponent(const char* data, int64_t n, U exponent) {
  constexpr int64_t kBlock = 64;
  int64_t begin = 0;
  for (; begin + kBlock <= n; begin += kBlock) {
    // u & exponent <= exponent, equal exactly for an Inf or a NaN.
    U most = 0;
    for (int64_t i = begin; i < begin + kBlock; ++i) {
      U u;
      std::memcpy(&u, data + sizeof(U) * i, sizeof(U));
      most = std::max<U>(most, u & exponent);
    }
    if (most == exponent) break;
  }
  for (int64_t i = begin; i < n; ++i) {  // the block found, or the tail
    U u;
    std::memcpy(&u, data + sizeof(U) * i, sizeof(U));
    if ((u & exponent) == exponent) return i;
  }
  return -1;
}

}  // namespace

int64_t FirstNonFinite(DType dtype, absl::string_view data) {
  if (dtype == BF16) {
    return FirstAllOnesExponent<uint16_t>(
        data.data(), static_cast<int64_t>(data.size() / 2), 0x7f80u);
  }
  return FirstAllOnesExponent<uint32_t>(
      data.data(), static_cast<int64_t>(data.size() / 4), 0x7f800000u);
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
  const size_t start = out->size();
  out->resize(start + DTypeSize(dtype) * n);
  EncodePayloadTo(dtype, values, n, out->data() + start);
}

void EncodePayloadTo(DType dtype, const float* values, int64_t n, char* out) {
  if (dtype == BF16) {
    FloatToBf16(values, n, out);
  } else {
    std::memcpy(out, values, 4 * n);
  }
}

int PushDTypeSize(DType dtype) { return dtype == INT8 ? 1 : DTypeSize(dtype); }

namespace {

// A sparse slice's fields, contiguous (compressed slices are small: a split
// received field is joined by one copy).
struct Sparse {
  std::string data_copy, indices_copy;
  absl::string_view data, indices;
  explicit Sparse(const ChunkSliceView& s) {
    data = Contiguous(s.data, &data_copy);
    indices = Contiguous(s.indices, &indices_copy);
  }
  static absl::string_view Contiguous(const ByteSpans& b, std::string* copy) {
    if (b.parts().size() == 1) return b.parts()[0];
    *copy = b.ToString();
    return *copy;
  }
  uint32_t IndexAt(int64_t i) const {
    uint32_t v;
    std::memcpy(&v, indices.data() + 4 * i, 4);
    return v;
  }
  int64_t count() const { return static_cast<int64_t>(indices.size() / 4); }
};

DType Dense(const ChunkSliceView& s) {
  return s.dtype == DTYPE_UNSPECIFIED ? F32 : s.dtype;
}

// Decodes `count` contiguous encoded values (dtype, INT8 with `scale`).
void DecodeRun(DType dtype, float scale, const char* data, int64_t count,
               float* out) {
  if (dtype == INT8) {
    for (int64_t i = 0; i < count; ++i) {
      out[i] = static_cast<float>(static_cast<int8_t>(data[i])) * scale;
    }
    return;
  }
  DecodePayload(dtype, absl::string_view(data, count * DTypeSize(dtype)), out);
}

}  // namespace

absl::Status SliceMatchesCompression(const ChunkSliceView& s,
                                     CompressionKind kind) {
  const bool int8 = s.dtype == INT8;
  const bool f32 = s.dtype == F32 || s.dtype == DTYPE_UNSPECIFIED;
  bool ok = false;
  switch (kind) {
    case TOPK:
    case RANDOMK:
      ok = s.sparse && f32;
      break;
    case QUANT_INT8:
      ok = !s.sparse && int8;
      break;
    default:  // COMPRESSION_NONE
      ok = !s.sparse && !int8;
      break;
  }
  if (ok) return absl::OkStatus();
  const std::string form =
      absl::StrCat(s.sparse ? "sparse " : "dense ", DType_Name(Dense(s)));
  const char* expected = kind == TOPK || kind == RANDOMK ? "sparse F32"
                         : kind == QUANT_INT8           ? "dense INT8"
                                                        : "dense F32 or BF16";
  return absl::InvalidArgumentError(absl::StrCat(
      "is a ", form, " slice but the job's train.compression is ",
      CompressionKind_Name(kind), ", which sends ", expected));
}

absl::StatusOr<int64_t> SliceElements(const ChunkSliceView& s) {
  const int size = PushDTypeSize(s.dtype);
  if (size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("has dtype ", static_cast<int>(s.dtype),
                     "; valid: F32, BF16, INT8 (INT8 only in pushes)"));
  }
  if (s.data.size() % size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("payload of ", s.data.size(),
                     " bytes is not a multiple of ", size, " (",
                     DType_Name(Dense(s)), ")"));
  }
  const int64_t values = static_cast<int64_t>(s.data.size()) / size;
  if (s.dtype == INT8) {
    // 128 * scale must be finite so that every decoded value is.
    const float scale = s.scale;
    if (!std::isfinite(scale) || scale < 0 ||
        !std::isfinite(scale * 128.0f)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "INT8 scale ", scale,
          " is not a finite non-negative number (with 128 * scale finite)"));
    }
  } else if (s.scale != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "has scale ", s.scale, " but dtype ", DType_Name(s.dtype),
        " (a scale is for INT8 only)"));
  }
  if (!s.sparse) {
    if (s.num_elements != 0 || !s.indices.empty()) {
      return absl::InvalidArgumentError(
          "has num_elements or indices but is not sparse");
    }
    return values;
  }
  const int64_t n = s.num_elements;
  if (n < 0 || n > (int64_t{1} << 32)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sparse num_elements ", n, " is outside [0, 2^32]"));
  }
  if (s.indices.size() % 4 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sparse indices of ", s.indices.size(),
        " bytes are not a multiple of 4 (uint32)"));
  }
  const Sparse sp(s);
  if (sp.count() != values) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sparse slice has ", sp.count(), " indices but ", values, " values"));
  }
  int64_t previous = -1;
  for (int64_t i = 0; i < sp.count(); ++i) {
    const int64_t index = sp.IndexAt(i);
    if (index >= n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sparse index ", index, " (position ", i,
          ") is not below num_elements ", n));
    }
    if (index <= previous) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sparse indices are not strictly increasing: ", index,
          " at position ", i, " after ", previous));
    }
    previous = index;
  }
  return n;
}

int64_t FirstNonFiniteElement(const ChunkSliceView& s) {
  if (s.dtype == INT8) return -1;  // a valid scale keeps q * scale finite
  const int size = DTypeSize(s.dtype);
  int64_t bad = -1;
  s.data.ForEachElements(size, [&](const char* bytes, int64_t first,
                                   int64_t n) {
    if (bad >= 0) return;
    const int64_t at = FirstNonFinite(s.dtype, absl::string_view(bytes, n * size));
    if (at >= 0) bad = first + at;
  });
  if (bad < 0 || !s.sparse) return bad;
  return Sparse(s).IndexAt(bad);
}

void DecodeSlice(const ChunkSliceView& s, float* out) {
  if (!s.sparse) {
    s.data.ForEachElements(
        PushDTypeSize(s.dtype), [&](const char* bytes, int64_t first,
                                    int64_t n) {
          DecodeRun(s.dtype, s.scale, bytes, n, out + first);
        });
    return;
  }
  const Sparse sp(s);
  std::vector<float> values(sp.count());
  DecodeRun(s.dtype, s.scale, sp.data.data(), sp.count(), values.data());
  std::fill(out, out + s.num_elements, 0.0f);
  for (int64_t i = 0; i < sp.count(); ++i) out[sp.IndexAt(i)] = values[i];
}

void AccumulateSlice(const ChunkSliceView& s, float* acc) {
  // Blocks small enough for the L1 cache: decoded (zeros and the sparse
  // values in place), then added.
  constexpr int64_t kBlock = 2048;
  float block[kBlock];
  if (!s.sparse) {
    const int size = PushDTypeSize(s.dtype);
    s.data.ForEachElements(size, [&](const char* bytes, int64_t first,
                                     int64_t n) {
      for (int64_t b = 0; b < n; b += kBlock) {
        const int64_t m = std::min(kBlock, n - b);
        DecodeRun(s.dtype, s.scale, bytes + b * size, m, block);
        float* out = acc + first + b;
        for (int64_t i = 0; i < m; ++i) out[i] += block[i];
      }
    });
    return;
  }
  const Sparse sp(s);
  const int64_t n = s.num_elements;
  int64_t next = 0;  // the first value not yet placed
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min(kBlock, n - b);
    std::fill(block, block + m, 0.0f);
    for (; next < sp.count() && sp.IndexAt(next) < b + m; ++next) {
      DecodeRun(s.dtype, s.scale,
                sp.data.data() + PushDTypeSize(s.dtype) * next, 1,
                &block[sp.IndexAt(next) - b]);
    }
    float* out = acc + b;
    for (int64_t i = 0; i < m; ++i) out[i] += block[i];
  }
}

}  // namespace lmps
