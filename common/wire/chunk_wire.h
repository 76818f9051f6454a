// The tensor-carrying messages of proto/lmps.proto (PullResponse and
// PushRequest, with their ChunkSlices, and the workers' PeerMessage) written and read in protobuf's wire
// format directly to and from gRPC byte buffers, so that payload bytes are
// never copied by protobuf:
//
//   sending    a ChunkSlice's payloads (data, indices, state) are gRPC
//              slices the caller encodes the tensor into once; the message is
//              the small protobuf headers plus references to those slices
//              (SerializePullResponse, SerializePushRequest).
//   receiving  ParsePullResponse / ParsePushRequest return views whose
//              payloads are spans inside the received buffer's slices (a
//              payload may lie across several of them: ByteSpans), decoded
//              straight into the destination (ByteSpans::ForEachElements).
//
// The bytes are exactly what protobuf serializes for the same message
// (fields in number order, proto3 defaults omitted), so either end may use
// the generated classes instead: the wire format is unchanged and old and
// new peers interoperate (tested in chunk_wire_test). The parser accepts any
// valid encoding (fields in any order, unknown fields skipped, the last
// value of a repeated scalar field wins) and refuses a malformed one with
// InvalidArgument, never reading outside the buffer.
//
// Thread-safety: the functions are pure; a view is valid while the buffer
// it was parsed from (whose slices it keeps referenced) lives.
#ifndef LMPS_COMMON_WIRE_CHUNK_WIRE_H_
#define LMPS_COMMON_WIRE_CHUNK_WIRE_H_

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/container/inlined_vector.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "proto/lmps.pb.h"

namespace lmps {

// A slice of `size` uninitialised bytes to encode a payload into.
grpc::Slice NewPayloadSlice(size_t size);
// Its writable bytes (the slice must come from NewPayloadSlice and not be
// shared yet).
char* MutableBytes(grpc::Slice* slice);

// A ChunkSlice to send: the header fields and the payloads as slices.
struct ChunkSliceOut {
  std::string tensor;
  int32_t chunk = 0;
  int64_t offset = 0;
  DType dtype = DTYPE_UNSPECIFIED;
  grpc::Slice data;
  bool sparse = false;
  int64_t num_elements = 0;
  grpc::Slice indices;
  float scale = 0;
  std::vector<grpc::Slice> state;
  // Shared memory (ChunkSlice.shm_offset): data empty, the payload at these
  // bytes of the request's region.
  int64_t shm_offset = 0;
  int64_t shm_bytes = 0;
};

// The serialized PullResponse {version, slices, next_message}.
grpc::ByteBuffer SerializePullResponse(int64_t version,
                                       const std::vector<ChunkSliceOut>& slices,
                                       int32_t next_message = 0);

// The header fields of a PushRequest (everything but its slices).
struct PushHeader {
  std::string worker_id;
  int32_t dp_rank = 0;
  int64_t step = 0;
  uint64_t partition_version = 0;
  int32_t pp_rank = 0;
  int32_t tp_rank = 0;
  // PushRequest.shm, serialized (empty: no region).
  std::string shm;
  PushThen then = PUSH_THEN_NOTHING;
  // PushRequest.then_pull, serialized (empty: none).
  std::string then_pull;
};

// The serialized PushRequest {header, slices}.
grpc::ByteBuffer SerializePushRequest(const PushHeader& header,
                                      const std::vector<ChunkSliceOut>& slices);

// The bytes of one received field: consecutive parts of the buffer's slices.
class ByteSpans {
 public:
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const absl::InlinedVector<absl::string_view, 2>& parts() const {
    return parts_;
  }
  void Append(absl::string_view part);
  void Clear() {
    parts_.clear();
    size_ = 0;
  }

  // Calls fn(bytes, first, n) for consecutive runs of whole elements of
  // `width` bytes: `bytes` holds elements [first, first + n) contiguously.
  // An element split between two parts is passed alone through a small
  // copy. Requires size() % width == 0 and width <= 16.
  void ForEachElements(
      int width,
      const std::function<void(const char* bytes, int64_t first, int64_t n)>&
          fn) const;
  // The bytes as one string (a copy; for small fields and tests).
  std::string ToString() const;

 private:
  absl::InlinedVector<absl::string_view, 2> parts_;
  size_t size_ = 0;
};

// A received ChunkSlice; the fields are as in proto/lmps.proto.
struct ChunkSliceView {
  std::string tensor;
  int32_t chunk = 0;
  int64_t offset = 0;
  DType dtype = DTYPE_UNSPECIFIED;
  ByteSpans data;
  bool sparse = false;
  int64_t num_elements = 0;
  ByteSpans indices;
  float scale = 0;
  std::vector<ByteSpans> state;
  int64_t shm_offset = 0;  // ChunkSlice.shm_offset, shm_bytes
  int64_t shm_bytes = 0;
};

// A received PullResponse. Keeps the buffer's slices referenced.
struct PullResponseView {
  int64_t version = 0;
  int32_t next_message = 0;
  std::vector<ChunkSliceView> slices;
  std::vector<grpc::Slice> held;
};

// A received PushRequest. Keeps the buffer's slices referenced.
struct PushRequestView {
  PushHeader header;
  std::vector<ChunkSliceView> slices;
  std::vector<grpc::Slice> held;
};

absl::Status ParsePullResponse(const grpc::ByteBuffer& buffer,
                               PullResponseView* out);

// Views of generated messages (payloads not copied; valid while the
// message lives and is not changed).
ChunkSliceView ViewOf(const ChunkSlice& slice);
PushRequestView ViewOf(const PushRequest& request);
absl::Status ParsePushRequest(const grpc::ByteBuffer& buffer,
                              PushRequestView* out);

// The header fields of a PeerMessage (everything but its data).
struct PeerHeader {
  PeerKind kind = PEER_KIND_UNSPECIFIED;
  bool eval = false;
  int64_t step = 0;
  int32_t micro_batch = 0;
  int32_t seq = 0;
  int32_t round = 0;
  std::string sender;
  int64_t total_elements = 0;
  int64_t offset = 0;
  // PeerMessage.shm (serialized; empty: none), shm_offset, shm_bytes.
  std::string shm;
  int64_t shm_offset = 0;
  int64_t shm_bytes = 0;
};

// The serialized PeerMessage {header, data}.
grpc::ByteBuffer SerializePeerMessage(const PeerHeader& header,
                                      const grpc::Slice& data);

// A received PeerMessage. Keeps the buffer's slices referenced.
struct PeerMessageView {
  PeerHeader header;
  ByteSpans data;
  std::vector<grpc::Slice> held;
};

absl::Status ParsePeerMessage(const grpc::ByteBuffer& buffer,
                              PeerMessageView* out);
PeerMessageView ViewOf(const PeerMessage& message);

// A generated message to and from a byte buffer (small messages: requests,
// responses without payloads; copies as protobuf does).
grpc::ByteBuffer SerializeProto(const google::protobuf::MessageLite& message);
absl::Status ParseProto(const grpc::ByteBuffer& buffer,
                        google::protobuf::MessageLite* message);
// A small buffer's bytes in one string, and back (copies).
absl::StatusOr<std::string> BufferBytes(const grpc::ByteBuffer& buffer);
grpc::ByteBuffer BufferOf(const std::string& bytes);

}  // namespace lmps

#endif  // LMPS_COMMON_WIRE_CHUNK_WIRE_H_
