// Sequence parallelism and the vocabulary-parallel embedding/LM head
// (layout.sequence_parallel, layout.vocab_parallel; issue 16) with the real
// binaries over loopback.
//
// Equivalence (sync mode): tp in {2, 4} x sequence parallel on/off x vocab
// parallel on/off x pp in {1, 2} reaches the same parameters after 4 steps
// as dp = pp = tp = 1 computing the same global batch. Tolerance: max
// |difference| <= 2e-5 on every parameter, the bound and reasoning of
// tests/equivalence_test.cc and tests/pipeline_test.cc: only the order of
// floating-point sums differs (the reduce-scatter's segment sums, the
// LayerNorm gradients summed over token chunks, the vocab-parallel
// cross-entropy's per-rank sums of exponentials); a lost, doubled or
// misplaced gradient moves parameters by ~lr = 1e-3 (AdamW), and with plain
// SGD (lr 0.5) a wrong scale moves them by ~1e-2.
//
// Also: with vocab_parallel every tp rank pulls and pushes exactly its wte
// rows (bytes counted against ParallelLayout).
#include <algorithm>
#include <cmath>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/formats/safetensors.h"
#include "common/model/job_spec.h"
#include "common/model/parallel_layout.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace lmps::testing {
namespace {

constexpr double kTolerance = 2e-5;
constexpr int kSteps = 4;

constexpr char kAdamW[] = "lr: 0.001";
constexpr char kSgd[] =
    "type: SGD lr: 0.5 momentum: -1 weight_decay: -1 grad_clip: -1";

// n_head, block_size and vocab_size (256, bytes) divisible by 4.
std::string Job(const std::string& layout, const std::string& optimizer) {
  return absl::StrCat(
      "model { n_layer: 2 n_head: 4 n_embd: 32 block_size: 16 }\n"
      "optimizer { ", optimizer, " }\n"
      "train { batch_size: 8 steps: ", kSteps,
      " eval_interval: 0 sample_tokens: 0 }\n"
      "layout { num_shards: 2 ", layout, " }\n"
      "max_chunk_bytes: 2048\nmax_message_bytes: 1024\n");
}

struct Layout {
  int tp = 1, pp = 1;
  bool sp = false, vp = false;
  std::string Name() const {
    return absl::StrCat("tp", tp, "pp", pp, sp ? "_sp" : "", vp ? "_vp" : "");
  }
  std::string Text() const {
    return absl::StrCat("tp: ", tp, " pp: ", pp,
                        " sequence_parallel: ", sp ? "true" : "false",
                        " vocab_parallel: ", vp ? "true" : "false");
  }
};

struct TrainRun {
  std::string dir;
  CommandResult result;
  SafetensorsContents model;
};

TrainRun Train(const Layout& l, const std::string& optimizer = kAdamW) {
  TrainRun run;
  run.dir = TempDir(l.Name() + (optimizer == kAdamW ? "" : "_sgd"));
  WriteFile(run.dir + "/job.textproto", Job(l.Text(), optimizer));
  // pp = 2: two micro-batches (1F1B), so stages overlap.
  run.result = RunCommand(
      {BinaryPath("launcher/lmps_local"), "--job=" + run.dir + "/job.textproto",
       "--run_dir=" + run.dir, absl::StrCat("--micro_batches=", l.pp),
       "--restart_workers=0", "--restart_job=0", "--quiet"},
      300);
  EXPECT_EQ(run.result.exit_code, 0) << run.result.output;
  auto model = ReadSafetensorsFile(run.dir + "/model.safetensors");
  EXPECT_TRUE(model.ok()) << model.status() << run.result.output;
  if (model.ok()) run.model = *model;
  return run;
}

const SafetensorsContents& Baseline(const std::string& optimizer) {
  static auto* baselines = new std::map<std::string, SafetensorsContents>();
  auto it = baselines->find(optimizer);
  if (it == baselines->end()) {
    it = baselines->emplace(optimizer, Train(Layout(), optimizer).model).first;
  }
  return it->second;
}

void ExpectMatchesBaseline(const Layout& l, const std::string& optimizer) {
  TrainRun run = Train(l, optimizer);
  auto diff = MaxAbsDiff(Baseline(optimizer), run.model);
  ASSERT_TRUE(diff.ok()) << diff.status();
  EXPECT_LE(*diff, kTolerance) << l.Name();
  // Training moved the parameters (the c_fc bias starts at zero).
  const SafeTensor* b = run.model.Find("h.1.mlp.c_fc.bias");
  ASSERT_NE(b, nullptr);
  double moved = 0;
  for (float v : b->data) {
    moved = std::max(moved, static_cast<double>(std::fabs(v)));
  }
  EXPECT_GT(moved, 1e-4);
}

class SequenceParallelEquivalenceTest
    : public ::testing::TestWithParam<Layout> {};

TEST_P(SequenceParallelEquivalenceTest, MatchesOneWorker) {
  ExpectMatchesBaseline(GetParam(), kAdamW);
}

std::vector<Layout> AllLayouts() {
  std::vector<Layout> out;
  for (int tp : {2, 4}) {
    for (int pp : {1, 2}) {
      for (bool sp : {false, true}) {
        for (bool vp : {false, true}) out.push_back({tp, pp, sp, vp});
      }
    }
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, SequenceParallelEquivalenceTest,
                         ::testing::ValuesIn(AllLayouts()),
                         [](const auto& info) { return info.param.Name(); });

// Plain SGD: the update is proportional to the gradient, so a wrong factor
// in the LayerNorm gradient sums or the vocab-parallel loss shows.
class SequenceParallelSgdTest : public ::testing::TestWithParam<Layout> {};

TEST_P(SequenceParallelSgdTest, MatchesOneWorker) {
  ExpectMatchesBaseline(GetParam(), kSgd);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, SequenceParallelSgdTest,
    ::testing::Values(Layout{2, 1, true, false}, Layout{2, 2, false, true},
                      Layout{4, 2, true, true}),
    [](const auto& info) { return info.param.Name(); });

// Lines "key=value ..." of a worker log that contain `tag`.
std::vector<std::map<std::string, std::string>> Records(
    const std::string& log, const std::string& tag) {
  std::vector<std::map<std::string, std::string>> out;
  std::istringstream in(log);
  std::string line;
  static const std::regex kv("([a-z_]+)=([^ ]+)");
  while (std::getline(in, line)) {
    if (line.find(tag) == std::string::npos) continue;
    std::map<std::string, std::string> rec;
    for (std::sregex_iterator it(line.begin(), line.end(), kv), end;
         it != end; ++it) {
      rec[(*it)[1]] = (*it)[2];
    }
    out.push_back(rec);
  }
  return out;
}

int64_t Int(const std::map<std::string, std::string>& rec,
            const std::string& key) {
  auto it = rec.find(key);
  int64_t v = -1;
  if (it == rec.end() || !absl::SimpleAtoi(it->second, &v)) {
    ADD_FAILURE() << "no integer " << key;
  }
  return v;
}

// Vocab parallel: each tp rank pulls and pushes only its wte rows (and its
// other slices): bytes equal what ParallelLayout says it holds and owns,
// and a worker holds V/tp of wte's rows.
TEST(SequenceParallelTest, VocabParallelWorkersTransferOnlyTheirWteRows) {
  const Layout l{2, 2, true, true};
  TrainRun run = Train(l);
  auto spec = ParseJobSpec(Job(l.Text(), kAdamW));
  ASSERT_TRUE(spec.ok()) << spec.status();
  auto layout = ParallelLayout::Create(spec->model(), spec->layout());
  ASSERT_TRUE(layout.ok());
  const int64_t V = spec->model().vocab_size(), C = spec->model().n_embd();
  for (int rank = 0; rank < 4; ++rank) {
    const WorkerCoords c = layout->Coords(rank);
    const std::string log =
        ReadFile(absl::StrCat(run.dir, "/logs/worker-", rank, ".log"));
    auto recs = Records(log, "transfer: pulls=");
    ASSERT_EQ(recs.size(), 1u) << log;
    const auto& r = recs[0];
    const int64_t held = layout->HeldElements(c.pp, c.tp);
    int64_t owned = 0;
    for (int t = 0; t < static_cast<int>(layout->tensors().size()); ++t) {
      for (const ElementRange& e : layout->Pushed(t, c.pp, c.tp)) {
        owned += e.size();
      }
    }
    // wte: rows [tp V/2, (tp+1) V/2) on both stages.
    const std::vector<ElementRange> wte = layout->Held(0, c.pp, c.tp);
    ASSERT_EQ(wte.size(), 1u);
    EXPECT_EQ(wte[0].begin, c.tp * V / 2 * C);
    EXPECT_EQ(wte[0].size(), V / 2 * C);
    EXPECT_EQ(Int(r, "held_parameters"), held);
    EXPECT_EQ(Int(r, "bytes_pulled"), Int(r, "pulls") * 4 * held)
        << "worker " << rank;
    EXPECT_EQ(Int(r, "bytes_pushed"), kSteps * 4 * owned) << "worker " << rank;
  }
}

}  // namespace
}  // namespace lmps::testing
