// Fuzzes SchedulerCore (server/scheduler/scheduler_core.h), the scheduler's
// request handling without the network: each input is a job layout and a
// sequence of operations -- Register, Heartbeat, GetAssignmentAsync, clock
// moves with Tick, Status -- whose requests are either arbitrary protobuf
// bytes (as a hostile client could send) or built from fuzzed fields (to
// reach assembly, leases, replacements and the final states).
//
// Properties: no crash or undefined behaviour; every GetAssignment callback
// runs exactly once (at the latest at Shutdown); an assignment has the
// job's shard addresses and a rank in range; Status never lists more nodes
// than slots, and a FINISHED or FAILED job stays so.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <google/protobuf/stubs/logging.h>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/model/job_spec.h"
#include "fuzz/fuzz_check.h"
#include "proto/lmps.pb.h"
#include "server/scheduler/clock.h"
#include "server/scheduler/scheduler_core.h"

namespace lmps {
namespace {

constexpr int kMaxOps = 96;

std::string Bytes(FuzzedDataProvider& in, size_t max) {
  return in.ConsumeRandomLengthString(max);
}

// A RegisterRequest: arbitrary bytes, or built from fuzzed fields.
RegisterRequest MakeRegister(FuzzedDataProvider& in, uint64_t partition_version) {
  RegisterRequest req;
  if (in.ConsumeBool()) {
    (void)req.ParseFromString(Bytes(in, 256));  // a failed parse leaves junk
    return req;
  }
  req.set_role(static_cast<Role>(in.ConsumeIntegralInRange<int>(0, 3)));
  req.set_address(absl::StrCat("10.0.0.", in.ConsumeIntegralInRange<int>(0, 4),
                               ":7071"));
  req.set_requested_rank(in.ConsumeIntegralInRange<int>(-2, 4));
  req.set_hostname(Bytes(in, 8));
  const int steps = in.ConsumeIntegralInRange<int>(0, 3);
  for (int i = 0; i < steps; ++i) {
    req.add_checkpoint_steps(in.ConsumeIntegralInRange<int64_t>(-1, 6));
  }
  req.set_checkpoint_partition_version(
      in.ConsumeBool() ? partition_version : in.ConsumeIntegral<uint64_t>());
  return req;
}

HeartbeatRequest MakeHeartbeat(FuzzedDataProvider& in,
                               const std::vector<std::string>& ids) {
  HeartbeatRequest req;
  if (in.ConsumeBool()) {
    (void)req.ParseFromString(Bytes(in, 128));
    return req;
  }
  if (!ids.empty() && in.ConsumeBool()) {
    req.set_node_id(ids[in.ConsumeIntegralInRange<size_t>(0, ids.size() - 1)]);
  } else {
    req.set_node_id(Bytes(in, 12));
  }
  req.set_step(in.ConsumeIntegral<int64_t>());
  req.set_loss(in.ConsumeFloatingPoint<float>());
  req.set_eval_loss(in.ConsumeFloatingPoint<float>());
  req.set_tokens_per_second(in.ConsumeFloatingPoint<double>());
  req.set_done(in.ConsumeBool());
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0) req.set_error(Bytes(in, 16));
  return req;
}

struct Waiter {
  int calls = 0;
};

void Run(FuzzedDataProvider& in) {
  const int dp = in.ConsumeIntegralInRange<int>(1, 3);
  const int shards = in.ConsumeIntegralInRange<int>(1, 3);
  absl::StatusOr<JobSpec> spec = ParseJobSpec(absl::StrCat(
      "model { n_layer: 1 n_head: 1 n_embd: 8 block_size: 8 }\n"
      "train { batch_size: 6 steps: 4 }\n"
      "layout { dp: ", dp, " num_shards: ", shards, " }\n"));
  LMPS_FUZZ_CHECK(spec.ok(), spec.status().ToString());
  FakeClock clock;
  SchedulerOptions options;
  options.spec = *spec;
  options.assemble_timeout = absl::Seconds(30);
  options.lease = absl::Seconds(5);
  absl::StatusOr<std::unique_ptr<SchedulerCore>> created =
      SchedulerCore::Create(options, &clock);
  LMPS_FUZZ_CHECK(created.ok(), created.status().ToString());
  SchedulerCore& core = **created;
  const uint64_t partition_version = core.partition().version();
  const int slots = core.expected_servers() + core.expected_workers();

  std::vector<std::string> ids;
  std::vector<std::unique_ptr<Waiter>> waiters;
  bool ended = false;  // FINISHED or FAILED seen
  JobState end_state = JOB_STATE_UNSPECIFIED;

  for (int op = 0; op < kMaxOps && in.remaining_bytes() > 0; ++op) {
    switch (in.ConsumeIntegralInRange<int>(0, 5)) {
      case 0: {
        absl::StatusOr<RegisterResponse> r =
            core.Register(MakeRegister(in, partition_version));
        if (r.ok()) {
          LMPS_FUZZ_CHECK(!r->node_id().empty(), "empty node id");
          ids.push_back(r->node_id());
        }
        break;
      }
      case 1:
        (void)core.Heartbeat(MakeHeartbeat(in, ids));
        break;
      case 2: {
        std::string id = (!ids.empty() && in.ConsumeBool())
                             ? ids[in.ConsumeIntegralInRange<size_t>(
                                   0, ids.size() - 1)]
                             : Bytes(in, 12);
        const absl::Time deadline =
            clock.Now() + absl::Milliseconds(in.ConsumeIntegralInRange<int>(
                              -1000, 60000));
        waiters.push_back(std::make_unique<Waiter>());
        Waiter* w = waiters.back().get();
        const int expected_servers = core.expected_servers();
        const int expected_workers = core.expected_workers();
        core.GetAssignmentAsync(
            id, deadline,
            [w, expected_servers, expected_workers](
                absl::StatusOr<Assignment> a) {
              ++w->calls;
              LMPS_FUZZ_CHECK(w->calls == 1, "GetAssignment callback twice");
              if (!a.ok()) return;
              LMPS_FUZZ_CHECK(a->shard_addresses_size() == expected_servers,
                              a->DebugString());
              if (a->role() == WORKER) {
                LMPS_FUZZ_CHECK(
                    a->dp_rank() >= 0 && a->dp_rank() < expected_workers,
                    a->DebugString());
              } else {
                LMPS_FUZZ_CHECK(
                    a->shard() >= 0 && a->shard() < expected_servers,
                    a->DebugString());
              }
            });
        break;
      }
      case 3:
        clock.Advance(
            absl::Milliseconds(in.ConsumeIntegralInRange<int>(0, 40000)));
        core.Tick();
        break;
      case 4: {
        const JobStatus status = core.Status();
        LMPS_FUZZ_CHECK(status.nodes_size() <= slots, status.DebugString());
        const JobState state = status.state();
        if (ended) {
          LMPS_FUZZ_CHECK(state == end_state,
                          absl::StrCat("left final state ",
                                       JobState_Name(end_state), " for ",
                                       JobState_Name(state)));
        } else if (state == FINISHED || state == FAILED) {
          ended = true;
          end_state = state;
        }
        break;
      }
      case 5:
        (void)core.CurrentState();
        (void)core.StateMessage();
        (void)core.AllServersSawFinalState();
        break;
    }
  }
  core.Shutdown();
  for (const auto& w : waiters) {
    LMPS_FUZZ_CHECK(w->calls == 1, absl::StrCat("GetAssignment callback ran ",
                                                w->calls, " times"));
  }
}

}  // namespace
}  // namespace lmps

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  // Parsing hostile bytes makes protobuf log every invalid UTF-8 string.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  lmps::Run(in);
  return 0;
}
