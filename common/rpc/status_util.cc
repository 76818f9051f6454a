#include "common/rpc/status_util.h"

#include <string>

#include "absl/strings/cord.h"

namespace lmps {
namespace {

constexpr char kErrorInfoUrl[] = "type.googleapis.com/google.rpc.ErrorInfo";
constexpr char kDomain[] = "lmps";

}  // namespace

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  const auto code = static_cast<grpc::StatusCode>(status.code());
  std::string message(status.message());
  RpcStatusDetails details;
  status.ForEachPayload([&](absl::string_view url, const absl::Cord& value) {
    AnyDetail* any = details.add_details();
    any->set_type_url(std::string(url));
    any->set_value(std::string(value));
  });
  if (details.details().empty()) return grpc::Status(code, message);
  details.set_code(static_cast<int>(code));
  details.set_message(message);
  return grpc::Status(code, message, details.SerializeAsString());
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  absl::Status out(static_cast<absl::StatusCode>(status.error_code()),
                   status.error_message());
  RpcStatusDetails details;
  // Details that do not parse (a peer of another kind) are dropped: the
  // code and message still say what happened.
  if (!status.error_details().empty() &&
      details.ParseFromString(status.error_details())) {
    for (const AnyDetail& any : details.details()) {
      out.SetPayload(any.type_url(), absl::Cord(any.value()));
    }
  }
  return out;
}

absl::Status WithReason(absl::Status status, ErrorReason reason) {
  if (status.ok()) return status;
  ErrorInfo info;
  info.set_reason(ErrorReason_Name(reason));
  info.set_domain(kDomain);
  status.SetPayload(kErrorInfoUrl, absl::Cord(info.SerializeAsString()));
  return status;
}

ErrorReason ReasonOf(const absl::Status& status) {
  absl::optional<absl::Cord> payload = status.GetPayload(kErrorInfoUrl);
  ErrorInfo info;
  ErrorReason reason = ERROR_REASON_UNSPECIFIED;
  if (payload.has_value() && info.ParseFromString(std::string(*payload)) &&
      info.domain() == kDomain) {
    ErrorReason_Parse(info.reason(), &reason);
  }
  return reason;
}

absl::Status WithMessage(const absl::Status& status, absl::string_view message) {
  absl::Status out(status.code(), message);
  status.ForEachPayload([&](absl::string_view url, const absl::Cord& value) {
    out.SetPayload(url, value);
  });
  return out;
}

}  // namespace lmps
