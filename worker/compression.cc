#include "worker/compression.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "common/model/job_spec.h"
#include "common/model/rng.h"

namespace lmps {
namespace {

// "a before b" in TOPK's order: larger magnitude first, then lower index.
struct ByMagnitude {
  const float* v;
  bool operator()(uint32_t a, uint32_t b) const {
    const float x = std::fabs(v[a]), y = std::fabs(v[b]);
    return x != y ? x > y : a < b;
  }
};

// "a before b" in RANDOMK's order: smaller random rank first, then lower
// index.
struct ByRandomRank {
  uint64_t stream;
  bool operator()(uint32_t a, uint32_t b) const {
    const uint64_t x = RandomBits(stream, a), y = RandomBits(stream, b);
    return x != y ? x < y : a < b;
  }
};

template <typename Less>
std::vector<uint32_t> FirstK(int64_t n, int64_t k, Less less) {
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  k = std::min(k, n);
  if (k < n) {
    std::nth_element(order.begin(), order.begin() + k, order.end(), less);
  }
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

template <typename Less>
std::vector<uint32_t> ReferenceFirstK(int64_t n, int64_t k, Less less) {
  std::vector<uint32_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<uint32_t>(i);
  std::stable_sort(order.begin(), order.end(), less);
  order.resize(std::min(k, n));
  std::sort(order.begin(), order.end());
  return order;
}

void PutSparse(const std::vector<uint32_t>& indices, const float* v,
               int64_t n, float* residual_out, ChunkSlice* out) {
  out->set_dtype(F32);
  out->set_sparse(true);
  out->set_num_elements(n);
  out->set_scale(0);
  std::string* idx = out->mutable_indices();
  std::string* data = out->mutable_data();
  idx->resize(4 * indices.size());
  data->resize(4 * indices.size());
  for (size_t i = 0; i < indices.size(); ++i) {
    const uint32_t j = indices[i];
    std::memcpy(idx->data() + 4 * i, &j, 4);
    std::memcpy(data->data() + 4 * i, &v[j], 4);
  }
  // r' = v - decode: v where unsent, 0 where sent.
  std::copy(v, v + n, residual_out);
  for (uint32_t j : indices) residual_out[j] = 0.0f;
}

absl::Status PutInt8(const float* v, int64_t n, float* residual_out,
                     ChunkSlice* out) {
  float max = 0;
  for (int64_t i = 0; i < n; ++i) max = std::max(max, std::fabs(v[i]));
  const float scale = max / 127.0f;
  if (!std::isfinite(scale * 128.0f)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gradient magnitude ", max, " is too large for int8 quantisation"));
  }
  out->set_dtype(INT8);
  out->set_sparse(false);
  out->set_num_elements(0);
  out->clear_indices();
  out->set_scale(scale);
  std::string* data = out->mutable_data();
  data->resize(n);
  for (int64_t i = 0; i < n; ++i) {
    int q = 0;
    if (scale > 0) {
      q = static_cast<int>(std::lrint(v[i] / scale));
      q = std::clamp(q, -127, 127);
    }
    (*data)[i] = static_cast<char>(static_cast<int8_t>(q));
    // As the shard decodes it: float(q) * scale.
    residual_out[i] = v[i] - static_cast<float>(q) * scale;
  }
  return absl::OkStatus();
}

}  // namespace

int64_t SparseCount(float ratio, int64_t n) {
  if (n <= 0) return 0;
  const int64_t k = static_cast<int64_t>(
      std::ceil(static_cast<double>(ratio) * static_cast<double>(n)));
  return std::min(n, std::max<int64_t>(1, k));
}

uint64_t RandomKStreamKey(const SliceKey& key) {
  uint64_t k = StableKey(key.seed, absl::StrCat("randomk/", key.tensor, "#",
                                                key.chunk));
  for (uint64_t part :
       {static_cast<uint64_t>(key.step), static_cast<uint64_t>(key.dp_rank),
        static_cast<uint64_t>(key.pp_rank), static_cast<uint64_t>(key.tp_rank),
        static_cast<uint64_t>(key.offset)}) {
    k = Mix64(k ^ Mix64(part));
  }
  return k;
}

std::vector<uint32_t> TopKIndices(const float* v, int64_t n, int64_t k) {
  return FirstK(n, k, ByMagnitude{v});
}

std::vector<uint32_t> ReferenceTopKIndices(const float* v, int64_t n,
                                           int64_t k) {
  return ReferenceFirstK(n, k, ByMagnitude{v});
}

std::vector<uint32_t> RandomKIndices(uint64_t stream, int64_t n, int64_t k) {
  // The ranks once per element (nth_element compares each many times).
  std::vector<uint64_t> rank(n);
  for (int64_t i = 0; i < n; ++i) rank[i] = RandomBits(stream, i);
  return FirstK(n, k, [&rank](uint32_t a, uint32_t b) {
    return rank[a] != rank[b] ? rank[a] < rank[b] : a < b;
  });
}

std::vector<uint32_t> ReferenceRandomKIndices(uint64_t stream, int64_t n,
                                              int64_t k) {
  return ReferenceFirstK(n, k, ByRandomRank{stream});
}

absl::Status CompressSlice(const CompressionConfig& config,
                           const SliceKey& key, const float* grad,
                           const float* residual_in, int64_t n,
                           float* residual_out, ChunkSlice* out) {
  if (config.kind() == COMPRESSION_NONE) {
    return absl::InvalidArgumentError("CompressSlice without a compression");
  }
  if (absl::Status s = ValidateCompression(config); !s.ok()) return s;
  if (n > (int64_t{1} << 32)) {
    return absl::InvalidArgumentError(
        absl::StrCat("slice of ", n, " elements: at most 2^32 compress"));
  }
  // v = g + r, in a buffer of its own (residual_out may alias residual_in).
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) {
    v[i] = grad[i] + residual_in[i];
    if (!std::isfinite(v[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "non-finite gradient (NaN or Inf) at element ", key.offset + i,
          " of ", key.tensor, "#", key.chunk, " (with its residual)"));
    }
  }
  switch (config.kind()) {
    case TOPK:
      PutSparse(TopKIndices(v.data(), n, SparseCount(config.ratio(), n)),
                v.data(), n, residual_out, out);
      return absl::OkStatus();
    case RANDOMK:
      PutSparse(RandomKIndices(RandomKStreamKey(key), n,
                               SparseCount(config.ratio(), n)),
                v.data(), n, residual_out, out);
      return absl::OkStatus();
    case QUANT_INT8:
      return PutInt8(v.data(), n, residual_out, out);
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown compression kind ", static_cast<int>(config.kind())));
  }
}

int64_t CompressedWireBytes(const ChunkSlice& slice) {
  return static_cast<int64_t>(slice.data().size() + slice.indices().size()) +
         (slice.dtype() == INT8 ? 4 : 0);
}

}  // namespace lmps
