// Conversion between absl::Status and grpc::Status, in one place. The code
// and the message are kept in both directions.
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_STATUS_UTIL_H_
#define LMPS_COMMON_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace lmps {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

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

#endif  // LMPS_COMMON_STATUS_UTIL_H_
