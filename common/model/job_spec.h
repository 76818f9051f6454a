// The job specification: parsing from protobuf text format, defaults and
// validation. Errors name the field (or line and column) and say what would
// be valid. See docs/configuration.md, "Configuration reference", for every field.
//
// Thread-safety: pure functions.
#ifndef LMPS_COMMON_MODEL_JOB_SPEC_H_
#define LMPS_COMMON_MODEL_JOB_SPEC_H_

#include <string>

#include "absl/status/statusor.h"
#include "proto/lmps.pb.h"

namespace lmps {

// Default data file: a real English text on every Debian system.
inline constexpr char kDefaultDataPath[] = "/usr/share/common-licenses/GPL-3";

// How ParseJobSpec / LoadJobSpecFile finish: kValidate checks the whole
// spec (ValidateJobSpec); kParseOnly stops after the defaults, for a caller
// that changes fields first (the launcher's --workers, --shards, ...) and
// validates the result itself.
enum class JobSpecCheck { kValidate, kParseOnly };

// Parses text-format `text`, fills defaults and validates.
absl::StatusOr<JobSpec> ParseJobSpec(
    const std::string& text, JobSpecCheck check = JobSpecCheck::kValidate);

// Reads and parses a text-format file.
absl::StatusOr<JobSpec> LoadJobSpecFile(
    const std::string& path, JobSpecCheck check = JobSpecCheck::kValidate);

// Fills every unset (zero) field with its documented default.
void ApplyJobSpecDefaults(JobSpec* spec);

// Whether the data are token files (TOKEN_SHARDS, llm.c's; RAW_TOKENS,
// nanoGPT's) rather than bytes of text.
inline bool IsTokenData(const DataConfig& data) {
  return data.format() == TOKEN_SHARDS || data.format() == RAW_TOKENS;
}

// Checks a spec with defaults applied: positive sizes, divisibility of the
// batch by dp * micro_batches, supported layout, sane optimizer values.
absl::Status ValidateJobSpec(const JobSpec& spec);

// The consistency part of ValidateJobSpec: train.mode is SYNC, ASYNC or
// BOUNDED_STALENESS; 0 <= train.staleness <= kMaxStaleness, and > 0 only
// with BOUNDED_STALENESS; the debug_slow_worker_* knobs are in range.
absl::Status ValidateConsistency(const JobSpec& spec);

// train.compression: a known kind; ratio in (0, kMaxCompressionRatio] for
// TOPK and RANDOMK, unset (0) for the others. Part of ValidateJobSpec.
absl::Status ValidateCompression(const CompressionConfig& compression);

// Largest train.compression.ratio accepted (a sparse element costs 8 bytes,
// a dense one 4).
inline constexpr float kMaxCompressionRatio = 0.5f;

// Largest train.staleness accepted.
inline constexpr int kMaxStaleness = 1000;

// The bound s of BOUNDED_STALENESS; 0 for SYNC (which is s = 0) and ASYNC
// (which has no bound; see ConsistencyMode).
int EffectiveStaleness(const JobSpec& spec);

// The data-parallel replicas whose pushes a shard sums each step: dp; 1
// with RING_ALLREDUCE (dp rank 0 alone pushes the all-reduced gradient);
// dp / workers_per_host with hierarchical aggregation (one push per host).
int PushingReplicas(const JobSpec& spec);

// Workers per host group: train.workers_per_host, 1 when unset.
int WorkersPerHost(const JobSpec& spec);

// Whether a worker's step needs other workers: pipeline or tensor
// parallelism (pp * tp > 1), RING_ALLREDUCE aggregation with dp > 1, or
// hierarchical aggregation (workers_per_host > 1). A dead worker then stops
// its peers' step, and the scheduler regroups the job at that step.
bool WorkersNeedPeers(const JobSpec& spec);

// Sequences each data-parallel replica computes per step.
int LocalBatch(const JobSpec& spec);

}  // namespace lmps

#endif  // LMPS_COMMON_MODEL_JOB_SPEC_H_
