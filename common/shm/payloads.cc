#include "common/shm/payloads.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace lmps {
namespace {

absl::Status CheckSlice(const SharedRegion& region, const std::string& tensor,
                        int32_t chunk, bool has_inline, int64_t offset,
                        int64_t bytes) {
  if (has_inline) {
    return absl::InvalidArgumentError(absl::StrCat(
        "slice ", tensor, "#", chunk,
        " has its payload both in the message and in shared memory"));
  }
  if (absl::Status s = region.CheckRange(offset, bytes); !s.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("slice ", tensor, "#", chunk, ": ", s.message()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status AttachSharedBytes(const SharedRegion& region, int64_t offset,
                               int64_t bytes, ByteSpans* out) {
  if (!out->empty()) {
    return absl::InvalidArgumentError(
        "a payload is both in the message and in shared memory");
  }
  if (absl::Status s = region.CheckRange(offset, bytes); !s.ok()) return s;
  out->Append(absl::string_view(region.data() + offset,
                                static_cast<size_t>(bytes)));
  return absl::OkStatus();
}

bool HasSharedPayloads(const std::vector<ChunkSliceView>& slices) {
  for (const ChunkSliceView& s : slices) {
    if (s.shm_bytes > 0) return true;
  }
  return false;
}

absl::Status AttachSharedPayloads(const SharedRegion& region,
                                  std::vector<ChunkSliceView>* slices) {
  for (ChunkSliceView& s : *slices) {
    if (s.shm_bytes <= 0) continue;
    if (absl::Status st =
            AttachSharedBytes(region, s.shm_offset, s.shm_bytes, &s.data);
        !st.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("slice ", s.tensor, "#", s.chunk, ": ", st.message()));
    }
  }
  return absl::OkStatus();
}

absl::Status InlineSharedPayloads(const SharedRegion& region,
                                  ChunkSlice* slice) {
  if (slice->shm_bytes() <= 0) return absl::OkStatus();
  if (absl::Status st =
          CheckSlice(region, slice->tensor(), slice->chunk(),
                     !slice->data().empty(), slice->shm_offset(),
                     slice->shm_bytes());
      !st.ok()) {
    return st;
  }
  slice->set_data(region.data() + slice->shm_offset(),
                  static_cast<size_t>(slice->shm_bytes()));
  slice->clear_shm_offset();
  slice->clear_shm_bytes();
  return absl::OkStatus();
}

}  // namespace lmps
