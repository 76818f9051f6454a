// Tensor payloads that travel in a shared-memory region (JobSpec
// shared_memory; ChunkSlice.shm_offset in proto/lmps.proto): the receiving
// end points a slice's payload at its bytes in the region, so the rest of
// the decoding is the same as for payloads that came in the message.
//
// Thread-safety: pure functions; a view stays valid while the region lives.
#ifndef LMPS_COMMON_SHM_PAYLOADS_H_
#define LMPS_COMMON_SHM_PAYLOADS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "common/shm/shared_region.h"
#include "common/wire/chunk_wire.h"
#include "proto/lmps.pb.h"

namespace lmps {

// Payloads go to 16-byte aligned offsets; the bytes a payload of `bytes`
// takes in a window.
inline constexpr int64_t kSharedPayloadAlign = 16;
inline int64_t SharedPayloadSpan(int64_t bytes) {
  return (bytes + kSharedPayloadAlign - 1) & ~(kSharedPayloadAlign - 1);
}

// Appends bytes [offset, offset + bytes) of `region` to `out`, which must be
// empty (a payload is either inline or shared). InvalidArgument otherwise,
// or for a range outside the region.
absl::Status AttachSharedBytes(const SharedRegion& region, int64_t offset,
                               int64_t bytes, ByteSpans* out);

// True when some slice's payload is in shared memory.
bool HasSharedPayloads(const std::vector<ChunkSliceView>& slices);

// Points every slice with shm_bytes > 0 at bytes [shm_offset, +shm_bytes)
// of `region`. InvalidArgument for a range outside the region or a slice
// that has both an inline and a shared payload.
absl::Status AttachSharedPayloads(const SharedRegion& region,
                                  std::vector<ChunkSliceView>* slices);

// The same for a generated message: copies the bytes into `data` and clears
// the shared-memory fields (a replicated shard forwards such a message).
absl::Status InlineSharedPayloads(const SharedRegion& region,
                                  ChunkSlice* slice);

}  // namespace lmps

#endif  // LMPS_COMMON_SHM_PAYLOADS_H_
