// Fuzzes the job-spec text parser (common/model/job_spec.h) with arbitrary text.
// Properties: no crash or undefined behaviour; an error has a message; an
// accepted spec validates, and printing and parsing it again gives the same
// spec (defaults are idempotent, nothing is lost in the text form).
#include <cstddef>
#include <cstdint>
#include <string>

#include <google/protobuf/text_format.h>
#include <google/protobuf/util/message_differencer.h>

#include "common/model/job_spec.h"
#include "fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > (64 << 10)) return 0;  // specs are small; keep runs fast
  const std::string text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<lmps::JobSpec> spec = lmps::ParseJobSpec(text);
  if (!spec.ok()) {
    LMPS_FUZZ_CHECK(!spec.status().message().empty(), spec.status().ToString());
    return 0;
  }
  const absl::Status valid = lmps::ValidateJobSpec(*spec);
  LMPS_FUZZ_CHECK(valid.ok(), valid.ToString());
  LMPS_FUZZ_CHECK(lmps::LocalBatch(*spec) > 0, spec->DebugString());
  std::string printed;
  LMPS_FUZZ_CHECK(google::protobuf::TextFormat::PrintToString(*spec, &printed),
                  spec->DebugString());
  absl::StatusOr<lmps::JobSpec> again = lmps::ParseJobSpec(printed);
  LMPS_FUZZ_CHECK(again.ok(), again.status().ToString() + "\n" + printed);
  LMPS_FUZZ_CHECK(
      google::protobuf::util::MessageDifferencer::Equals(*again, *spec),
      "first:\n" + printed + "\nagain:\n" + again->DebugString());
  return 0;
}
