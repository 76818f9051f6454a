// Test-only: grpc.health.v1.Health/Check for service "" through a generic
// stub (Debian's gRPC ships no generated health proto for C++).
#ifndef LMPS_COMMON_RPC_HEALTH_CHECK_TEST_UTIL_H_
#define LMPS_COMMON_RPC_HEALTH_CHECK_TEST_UTIL_H_

#include <future>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace lmps {

// The HealthCheckResponse bytes (08 01: SERVING, 08 02: NOT_SERVING), or
// "error: <message>" when the call fails.
inline std::string HealthCheckBytes(
    const std::shared_ptr<grpc::Channel>& channel,
    absl::Duration deadline = absl::Seconds(10)) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1);  // HealthCheckRequest{service: ""}
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(),
                 &request, &response,
                 [&done](grpc::Status s) { done.set_value(std::move(s)); });
  grpc::Status st = done.get_future().get();
  if (!st.ok()) return absl::StrCat("error: ", st.error_message());
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return "error: dump";
  std::string bytes;
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return bytes;
}

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_HEALTH_CHECK_TEST_UTIL_H_
