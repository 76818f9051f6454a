// absl::Status helpers, in one place:
//  - conversion between absl::Status and grpc::Status, keeping the code, the
//    message and every payload (as the status details, a google.rpc.Status
//    whose details are the payloads as google.protobuf.Any);
//  - structured reasons (proto ErrorReason): a caller that acts on why a call
//    failed reads ReasonOf(status), never the message text. The reason
//    travels as a google.rpc.ErrorInfo payload (domain "lmps") and survives
//    the trip through gRPC and WithMessage();
//  - WithMessage(): another message, the same code and payloads (a status
//    rebuilt with absl::Status(code, message) loses its reason);
//  - LMPS_RETURN_IF_ERROR / LMPS_ASSIGN_OR_RETURN.
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_RPC_STATUS_UTIL_H_
#define LMPS_COMMON_RPC_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "proto/lmps.pb.h"

namespace lmps {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

// `status` (not OK) with `reason` attached; an OK status is returned as is.
absl::Status WithReason(absl::Status status, ErrorReason reason);

// The reason attached to `status`, or ERROR_REASON_UNSPECIFIED.
ErrorReason ReasonOf(const absl::Status& status);

// `status` with `message` instead of its message; code and payloads kept.
absl::Status WithMessage(const absl::Status& status, absl::string_view message);

}  // namespace lmps

// Evaluates an absl::Status expression and returns it from the enclosing
// function if it is not OK.
#define LMPS_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::absl::Status lmps_status_ = (expr);        \
    if (!lmps_status_.ok()) return lmps_status_; \
  } while (0)

#define LMPS_CONCAT_INNER_(a, b) a##b
#define LMPS_CONCAT_(a, b) LMPS_CONCAT_INNER_(a, b)

// `LMPS_ASSIGN_OR_RETURN(auto x, StatusOrExpr());`
#define LMPS_ASSIGN_OR_RETURN(lhs, expr) \
  LMPS_ASSIGN_OR_RETURN_IMPL_(LMPS_CONCAT_(lmps_statusor_, __LINE__), lhs, expr)
#define LMPS_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()

#endif  // LMPS_COMMON_RPC_STATUS_UTIL_H_
