// Private to the //server:shard library (a header in its srcs): small
// helpers that several of ParameterShard's source files (shard*.cc) share.
// Nothing outside server/shard*.cc may include it.
#ifndef LMPS_SERVER_SHARD_INTERNAL_H_
#define LMPS_SERVER_SHARD_INTERNAL_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "common/rpc/status_util.h"

namespace lmps {
namespace shard_internal {

// "tensor 'wte.weight' chunk 3".
inline std::string ChunkName(const std::string& tensor, int index) {
  return absl::StrCat("tensor '", tensor, "' chunk ", index);
}

// A call refused because the job stops for an elastic resize.
inline absl::Status ResizeStop(const std::string& message) {
  return WithReason(absl::AbortedError(message), STOPPED_FOR_RESIZE);
}

// A duration for messages, to the millisecond.
inline std::string Seconds(absl::Duration d) {
  return absl::FormatDuration(absl::Trunc(d, absl::Milliseconds(1)));
}

// GradNorm, Apply and Restore in train.mode ASYNC.
inline absl::Status NotInAsync(int shard, absl::string_view what) {
  return absl::FailedPreconditionError(absl::StrCat(
      what, " on shard ", shard,
      ": not used in train.mode ASYNC (pushes are applied as they arrive)"));
}

}  // namespace shard_internal
}  // namespace lmps

#endif  // LMPS_SERVER_SHARD_INTERNAL_H_
