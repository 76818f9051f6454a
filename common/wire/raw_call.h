// Blocking client calls whose messages are raw byte buffers (built and
// parsed by common/wire/chunk_wire.h), over gRPC's callback API
// (grpc::GenericStub): the streaming counterparts of the generated stubs'
// ClientReader / ClientWriter, without protobuf copying the payloads.
//
// Both overlap the caller's work with the transfer: ServerStreamingCall
// reads message i + 1 while the caller handles message i, and
// ClientStreamingCall lets the caller build message i + 1 while message i
// is being written. Every wait ends: the call ends at the context's
// deadline at the latest.
//
// `method` is the full name, "/lmps.ParameterServer/Pull".
//
// Thread-safety: each call is independent; a stub may be shared.
#ifndef LMPS_COMMON_WIRE_RAW_CALL_H_
#define LMPS_COMMON_WIRE_RAW_CALL_H_

#include <grpcpp/client_context.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>

#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace lmps {

// Sends `request` and calls on_message for each response message, in
// order, on the calling thread. If on_message fails the call is cancelled
// and that error returned; otherwise the call's status.
absl::Status ServerStreamingCall(
    grpc::GenericStub* stub, const std::string& method,
    grpc::ClientContext* context, const grpc::ByteBuffer& request,
    const std::function<absl::Status(const grpc::ByteBuffer&)>& on_message);

// Sends the messages next() builds (called on the calling thread; it
// returns false when there are no more, or an error to cancel the call) and
// receives the one response. Returns next()'s error or the call's status.
absl::Status ClientStreamingCall(
    grpc::GenericStub* stub, const std::string& method,
    grpc::ClientContext* context,
    const std::function<absl::StatusOr<bool>(grpc::ByteBuffer*)>& next,
    grpc::ByteBuffer* response);

}  // namespace lmps

#endif  // LMPS_COMMON_WIRE_RAW_CALL_H_
