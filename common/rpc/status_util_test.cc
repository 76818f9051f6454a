#include "common/rpc/status_util.h"

#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "proto/lmps.pb.h"

namespace lmps {
namespace {

TEST(StatusUtilTest, CodeAndMessageSurviveBothWays) {
  const absl::Status s = absl::NotFoundError("no tensor 'x'");
  const grpc::Status g = ToGrpcStatus(s);
  EXPECT_EQ(g.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(g.error_message(), "no tensor 'x'");
  EXPECT_TRUE(g.error_details().empty());  // no payload, no details
  EXPECT_EQ(FromGrpcStatus(g), s);
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
}

TEST(StatusUtilTest, ReasonSurvivesGrpcAndNewMessages) {
  const absl::Status s = WithReason(
      absl::AbortedError("stops at step 7 for a resize"), STOPPED_FOR_RESIZE);
  EXPECT_EQ(ReasonOf(s), STOPPED_FOR_RESIZE);
  const absl::Status back = FromGrpcStatus(ToGrpcStatus(s));
  EXPECT_EQ(back.code(), absl::StatusCode::kAborted);
  EXPECT_EQ(back.message(), s.message());
  EXPECT_EQ(ReasonOf(back), STOPPED_FOR_RESIZE);
  const absl::Status annotated = WithMessage(back, "shard 1: anything else");
  EXPECT_EQ(annotated.message(), "shard 1: anything else");
  EXPECT_EQ(annotated.code(), absl::StatusCode::kAborted);
  EXPECT_EQ(ReasonOf(annotated), STOPPED_FOR_RESIZE);
}

TEST(StatusUtilTest, TheReasonIsNotTheText) {
  // The old message text without the reason is no reason; the reason with
  // any text is.
  EXPECT_EQ(ReasonOf(absl::FailedPreconditionError(
                "cannot register: the job is already FINISHED")),
            ERROR_REASON_UNSPECIFIED);
  EXPECT_EQ(ReasonOf(WithReason(absl::FailedPreconditionError("bye"),
                                JOB_FINISHED)),
            JOB_FINISHED);
  EXPECT_TRUE(WithReason(absl::OkStatus(), JOB_FINISHED).ok());
}

TEST(StatusUtilTest, DetailsAreAStandardGoogleRpcStatus) {
  // What a standard gRPC client (grpcurl, Python's grpc_status) reads:
  // google.rpc.Status{code, message, details: [Any{ErrorInfo}]}.
  const grpc::Status g = ToGrpcStatus(
      WithReason(absl::FailedPreconditionError("past it"), STOP_STEP_PASSED));
  RpcStatusDetails details;
  ASSERT_TRUE(details.ParseFromString(g.error_details()));
  EXPECT_EQ(details.code(), static_cast<int>(grpc::StatusCode::FAILED_PRECONDITION));
  EXPECT_EQ(details.message(), "past it");
  ASSERT_EQ(details.details_size(), 1);
  EXPECT_EQ(details.details(0).type_url(),
            "type.googleapis.com/google.rpc.ErrorInfo");
  ErrorInfo info;
  ASSERT_TRUE(info.ParseFromString(details.details(0).value()));
  EXPECT_EQ(info.reason(), "STOP_STEP_PASSED");
  EXPECT_EQ(info.domain(), "lmps");
}

TEST(StatusUtilTest, ForeignOrBrokenDetailsAreIgnored) {
  const grpc::Status garbage(grpc::StatusCode::INTERNAL, "boom",
                             std::string("\xff\xff\xff", 3));
  const absl::Status s = FromGrpcStatus(garbage);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(s.message(), "boom");
  EXPECT_EQ(ReasonOf(s), ERROR_REASON_UNSPECIFIED);
  // An ErrorInfo of another domain is not ours.
  ErrorInfo info;
  info.set_reason("JOB_FINISHED");
  info.set_domain("example.com");
  absl::Status other = absl::FailedPreconditionError("x");
  other.SetPayload("type.googleapis.com/google.rpc.ErrorInfo",
                   absl::Cord(info.SerializeAsString()));
  EXPECT_EQ(ReasonOf(other), ERROR_REASON_UNSPECIFIED);
}

}  // namespace
}  // namespace lmps
