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
    if (absl::Status st = CheckSlice(region, s.tensor, s.chunk,
                                     !s.data.empty(), s.shm_offset,
                                     s.shm_bytes);
        !st.ok()) {
      return st;
    }
    s.data.Append(absl::string_view(region.data() + s.shm_offset,
                                    static_cast<size_t>(s.shm_bytes)));
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
