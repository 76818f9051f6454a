// StageModel tests on the CPU backend and the reference backend: the
// single-stage, single-rank model equals GptModel bit for bit; pipeline
// splits, tensor-parallel splits (ranks on threads joined by an in-process
// all-reduce) and both combined reproduce GptModel's loss and gradients;
// activation slots (1F1B) and argument validation.
#include "worker/model/stage_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/model/model_spec.h"
#include "gtest/gtest.h"
#include "worker/backend/backend.h"
#include "worker/backend/cpu_backend.h"
#include "worker/backend/cpu_reference.h"
#include "worker/backend/test_util.h"
#include "worker/model/gpt.h"
#include "worker/model/tp_comm.h"
#include "worker/testing/in_process_tp_comm.h"

namespace lmps {
namespace {

using ::lmps::testing::AllClose;
using ::lmps::testing::RandomTokens;
using ::lmps::testing::RandomVector;

constexpr int kC = 16, kT = 8, kV = 32;

// C=16, T=8, V=32, with n_layer and n_head given.
ModelConfig TinyConfig(int n_layer, int n_head) {
  ModelConfig c;
  c.set_n_layer(n_layer);
  c.set_n_embd(kC);
  c.set_n_head(n_head);
  c.set_block_size(kT);
  c.set_vocab_size(kV);
  return c;
}

std::unique_ptr<Backend> MakeBackend(const std::string& name,
                                     int num_threads = 2) {
  if (name == "cpu") {
    auto b = CpuBackend::Create({.num_threads = num_threads});
    return b.ok() ? std::move(*b) : nullptr;
  }
  auto b = ReferenceBackend::Create();
  return b.ok() ? std::move(*b) : nullptr;
}

// Parameters of "trained-like" magnitude (as in gpt_test.cc).
std::vector<float> LargeParameters(const ModelConfig& config, uint64_t seed) {
  std::vector<float> host;
  for (const TensorSpec& spec : GptTensorSpecs(config)) {
    const size_t n = spec.num_elements();
    std::vector<float> t;
    if (spec.init == InitKind::kOnes) {
      t = RandomVector(seed++, n, 0.8f, 1.2f);
    } else if (spec.init == InitKind::kZeros) {
      t = RandomVector(seed++, n, -0.1f, 0.1f);
    } else {
      t = RandomVector(seed++, n, -0.3f, 0.3f);
    }
    host.insert(host.end(), t.begin(), t.end());
  }
  return host;
}

// ---------------------------------------------------------------------------
// The Megatron-LM partition, written independently of stage_model.cc.
// ---------------------------------------------------------------------------

// The global tensors of a model: name -> (offset in the flat buffer, shape).
struct GlobalTensor {
  int64_t offset;
  std::vector<int64_t> shape;
};
std::map<std::string, GlobalTensor> GlobalTensors(const ModelConfig& config) {
  std::map<std::string, GlobalTensor> out;
  int64_t offset = 0;
  for (const TensorSpec& spec : GptTensorSpecs(config)) {
    out[spec.name] = {offset, spec.shape};
    offset += spec.num_elements();
  }
  return out;
}

// Copies rows [row_begin, row_begin + rows) x columns [col_begin, col_begin
// + cols) of a row-major matrix with `width` columns to `out`.
void AppendBlock(const float* m, int64_t width, int64_t row_begin,
                 int64_t rows, int64_t col_begin, int64_t cols,
                 std::vector<float>* out) {
  for (int64_t i = row_begin; i < row_begin + rows; ++i) {
    for (int64_t j = col_begin; j < col_begin + cols; ++j) {
      out->push_back(m[i * width + j]);
    }
  }
}

// Tp rank r's part of global tensor `name` (full data `full`, global shape).
// vp: vocabulary parallel (wte split by rows).
std::vector<float> SliceForRank(const std::string& name,
                                const std::vector<int64_t>& shape,
                                const float* full, int tp, int r,
                                bool vp = false) {
  std::vector<float> out;
  const int64_t rows = shape[0];
  const int64_t cols = shape.size() > 1 ? shape[1] : 1;
  if (vp && name == "wte.weight") {
    const int64_t part = rows / tp;  // (V, C): rows
    AppendBlock(full, cols, r * part, part, 0, cols, &out);
  } else if (absl::EndsWith(name, "attn.c_attn.weight") ||
      absl::EndsWith(name, "attn.c_attn.bias")) {
    // (3C, C): the same rows of the q, k and v blocks.
    const int64_t C = rows / 3, Cl = C / tp;
    for (int blk = 0; blk < 3; ++blk) {
      AppendBlock(full, cols, blk * C + r * Cl, Cl, 0, cols, &out);
    }
  } else if (absl::EndsWith(name, "mlp.c_fc.weight") ||
             absl::EndsWith(name, "mlp.c_fc.bias")) {
    const int64_t part = rows / tp;  // (4C, C): rows
    AppendBlock(full, cols, r * part, part, 0, cols, &out);
  } else if (absl::EndsWith(name, "c_proj.weight")) {
    const int64_t part = cols / tp;  // (C, K): columns
    AppendBlock(full, cols, 0, rows, r * part, part, &out);
  } else {
    out.assign(full, full + rows * cols);  // replicated
  }
  return out;
}

// The gradient tp rank r must hold for `name`: its slice of the full
// gradient, except the replicated row-parallel biases, accumulated by rank 0
// only.
std::vector<float> ExpectedLocalGrad(const std::string& name,
                                     const std::vector<int64_t>& shape,
                                     const float* full, int tp, int r) {
  std::vector<float> out = SliceForRank(name, shape, full, tp, r);
  if (r != 0 && absl::EndsWith(name, "c_proj.bias")) {
    std::fill(out.begin(), out.end(), 0.0f);
  }
  return out;
}

// The local flat parameter buffer of `model` sliced from the full one.
std::vector<float> LocalParameters(const StageModel& model,
                                   const std::vector<float>& full) {
  const auto global = GlobalTensors(model.config());
  std::vector<float> local(model.num_parameters());
  for (const LocalTensor& t : model.local_tensors()) {
    const GlobalTensor& g = global.at(t.name);
    std::vector<float> part =
        SliceForRank(t.name, g.shape, full.data() + g.offset,
                     model.options().tp_size, model.options().tp_rank,
                     model.options().vocab_parallel);
    EXPECT_EQ(static_cast<int64_t>(part.size()), t.num_elements()) << t.name;
    std::copy(part.begin(), part.end(), local.begin() + t.offset);
  }
  return local;
}

using TpGroup = InProcessTpGroup;
using TestTpComm = InProcessTpComm;

// ---------------------------------------------------------------------------
// Reference (GptModel) and parallel runs of the same micro-batches.
// ---------------------------------------------------------------------------
struct MicroBatch {
  std::vector<int32_t> tokens, targets;
};

std::vector<MicroBatch> MakeMicroBatches(int m, int B, int T, uint64_t seed) {
  std::vector<MicroBatch> out;
  for (int i = 0; i < m; ++i) {
    out.push_back({RandomTokens(seed + 2 * i, B * T, kV),
                   RandomTokens(seed + 2 * i + 1, B * T, kV)});
  }
  return out;
}

struct Result {
  float loss = 0;  // mean over micro-batches
  std::vector<float> grads;
};

// GptModel: Forward + Backward(1/M) per micro-batch.
Result RunReference(const ModelConfig& config, const std::vector<float>& params,
                    const std::vector<MicroBatch>& mbs, int B, int T,
                    const std::string& backend_name) {
  Result r;
  auto backend = MakeBackend(backend_name);
  auto model = GptModel::Create(config, backend.get(), B, T);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return r;
  EXPECT_TRUE((*model)->SetParametersFromHost(params.data()).ok());
  (*model)->ZeroGrad();
  const float scale = 1.0f / mbs.size();
  double sum = 0;
  for (const MicroBatch& mb : mbs) {
    auto loss = (*model)->Forward(mb.tokens.data(), mb.targets.data(), B, T);
    EXPECT_TRUE(loss.ok()) << loss.status();
    sum += loss.value_or(0.0f);
    EXPECT_TRUE((*model)->Backward(scale).ok());
  }
  r.loss = static_cast<float>(sum / mbs.size());
  r.grads.resize((*model)->num_parameters());
  EXPECT_TRUE((*model)->GradientsToHost(r.grads.data()).ok());
  return r;
}

// A pp x tp layout: stage s holds blocks [bounds[s], bounds[s+1]).
struct Layout {
  std::vector<int> bounds;
  int tp = 1;
  bool sp = false;  // sequence parallel
  bool vp = false;  // vocab parallel
  int stages() const { return static_cast<int>(bounds.size()) - 1; }
};

struct StageResult {
  std::vector<LocalTensor> tensors;
  std::vector<float> grads;
  // The last Backward's GradientReadyFn calls: the ranges, and each range
  // copied when it was reported final.
  std::vector<std::pair<int64_t, int64_t>> ready_ranges;
  std::vector<float> ready_copy;
};
struct RankResult {
  absl::Status status;
  float loss = 0;                     // mean over micro-batches
  std::vector<StageResult> stages;    // [stage]
  std::vector<std::vector<float>> activations;  // every output and dinput
};

// One tp rank: all stages of the pipeline, run one after the other through
// host buffers (GPipe order: all forwards, then all backwards).
absl::Status RunRank(const ModelConfig& config, const Layout& layout, int rank,
                     const std::vector<float>& params,
                     const std::vector<MicroBatch>& mbs, int B, int T,
                     const std::string& backend_name,
                     std::vector<std::unique_ptr<TpGroup>>& groups,
                     RankResult* out) {
  auto backend = MakeBackend(backend_name, /*num_threads=*/1);
  if (backend == nullptr) return absl::InternalError("no backend");
  const int S = layout.stages(), M = static_cast<int>(mbs.size());
  std::vector<std::unique_ptr<TestTpComm>> comms;
  std::vector<std::unique_ptr<StageModel>> stages;
  for (int s = 0; s < S; ++s) {
    StageModelOptions o;
    o.config = config;
    o.layer_begin = layout.bounds[s];
    o.layer_end = layout.bounds[s + 1];
    o.has_embedding = s == 0;
    o.has_head = s == S - 1;
    o.tp_size = layout.tp;
    o.tp_rank = rank;
    o.sequence_parallel = layout.sp;
    o.vocab_parallel = layout.vp;
    o.max_batch = B;
    o.max_seq = T;
    o.activation_slots = M;
    TestTpComm* comm = nullptr;
    if (layout.tp > 1) {
      comms.push_back(
          std::make_unique<TestTpComm>(groups[s].get(), layout.tp, rank));
      comm = comms.back().get();
    }
    auto m = StageModel::Create(o, backend.get(), comm);
    if (!m.ok()) return m.status();
    const std::vector<float> local = LocalParameters(**m, params);
    if (absl::Status st = (*m)->SetParametersFromHost(local.data()); !st.ok()) {
      return st;
    }
    (*m)->ZeroGrad();
    stages.push_back(std::move(*m));
  }
  // With sequence parallelism stages exchange the rank's token chunk.
  const size_t BTC =
      static_cast<size_t>(B) * T * kC / (layout.sp ? layout.tp : 1);
  out->stages.resize(S);
  for (int s = 0; s < S; ++s) {
    out->stages[s].ready_copy.assign(stages[s]->num_parameters(),
                                     std::nanf(""));
  }
  double loss_sum = 0;
  for (int m = 0; m < M; ++m) {
    std::vector<float> in, act(BTC);
    for (int s = 0; s < S; ++s) {
      auto loss = stages[s]->Forward(m, mbs[m].tokens.data(), in.data(),
                                     mbs[m].targets.data(), act.data(), B, T);
      if (!loss.ok()) return loss.status();
      if (s == S - 1) {
        loss_sum += *loss;
      } else {
        out->activations.push_back(act);
        in = act;
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    std::vector<float> dout, din(BTC);
    for (int s = S - 1; s >= 0; --s) {
      StageResult& r = out->stages[s];
      StageModel& stage = *stages[s];
      StageModel::GradientReadyFn on_ready = nullptr;
      if (m == M - 1) {
        on_ready = [&](int64_t begin, int64_t end) {
          r.ready_ranges.push_back({begin, end});
          return stage.backend()->CopyToHost(r.ready_copy.data() + begin,
                                             stage.grads() + begin,
                                             end - begin);
        };
      }
      if (absl::Status st = stage.Backward(m, dout.data(), 1.0f / M,
                                           din.data(), on_ready);
          !st.ok()) {
        return st;
      }
      if (s > 0) {
        out->activations.push_back(din);
        dout = din;
      }
    }
  }
  out->loss = static_cast<float>(loss_sum / M);
  for (int s = 0; s < S; ++s) {
    const StageModel& st = *stages[s];
    if (st.slots_in_use() != 0) return absl::InternalError("slots in use");
    StageResult& r = out->stages[s];
    r.tensors = st.local_tensors();
    r.grads.resize(st.num_parameters());
    if (absl::Status e = st.GradientsToHost(r.grads.data()); !e.ok()) {
      return e;
    }
  }
  return absl::OkStatus();
}

// Every tp rank on its own thread.
std::vector<RankResult> RunParallel(const ModelConfig& config,
                                    const Layout& layout,
                                    const std::vector<float>& params,
                                    const std::vector<MicroBatch>& mbs, int B,
                                    int T, const std::string& backend_name) {
  std::vector<std::unique_ptr<TpGroup>> groups;
  for (int s = 0; s < layout.stages(); ++s) {
    groups.push_back(std::make_unique<TpGroup>(layout.tp));
  }
  std::vector<RankResult> results(layout.tp);
  std::vector<std::thread> threads;
  for (int r = 0; r < layout.tp; ++r) {
    threads.emplace_back([&, r] {
      results[r].status = RunRank(config, layout, r, params, mbs, B, T,
                                  backend_name, groups, &results[r]);
      if (!results[r].status.ok()) {
        for (auto& g : groups) g->Abort();  // unblock the peers
      }
    });
  }
  for (std::thread& t : threads) t.join();
  // Per micro-batch: 2 all-reduces per block forward and 2 backward.
  for (int s = 0; s < layout.stages() && layout.tp > 1 && !layout.sp &&
                  !layout.vp;
       ++s) {
    EXPECT_EQ(groups[s]->collectives(),
              4 * (layout.bounds[s + 1] - layout.bounds[s]) *
                  static_cast<int64_t>(mbs.size()))
        << "stage " << s;
  }
  return results;
}

// Loss and every local gradient against GptModel's, `rtol` relative to the
// largest gradient of the model.
void ExpectMatchesReference(const ModelConfig& config, const Layout& layout,
                            const std::vector<RankResult>& results,
                            const Result& ref, double rtol) {
  const auto global = GlobalTensors(config);
  double scale = 1e-6;
  for (float g : ref.grads) scale = std::max(scale, std::fabs(double{g}));
  const GlobalTensor& wte = global.at("wte.weight");
  const std::vector<float> ref_wte_full(
      ref.grads.begin() + wte.offset,
      ref.grads.begin() + wte.offset + kV * kC);
  for (int r = 0; r < layout.tp; ++r) {
    const RankResult& res = results[r];
    ASSERT_TRUE(res.status.ok()) << "rank " << r << ": " << res.status;
    EXPECT_NEAR(res.loss, ref.loss, 1e-5 * std::fabs(ref.loss)) << "rank " << r;
    ASSERT_EQ(static_cast<int>(res.stages.size()), layout.stages());
    // Activations crossing stages are identical on every tp rank (each
    // rank's chunk with sequence parallelism).
    if (!layout.sp) {
      EXPECT_TRUE(res.activations == results[0].activations) << "rank " << r;
    }
    const std::vector<float> ref_wte =
        SliceForRank("wte.weight", {kV, kC}, ref_wte_full.data(), layout.tp,
                     r, layout.vp);
    std::vector<float> wte_sum(ref_wte.size(), 0.0f);
    std::map<std::string, int> seen;
    for (int s = 0; s < layout.stages(); ++s) {
      const StageResult& st = res.stages[s];
      // The ready ranges: final when reported (bit for bit), decreasing,
      // disjoint, covering the buffer; ln_f first on the last stage.
      EXPECT_EQ(st.ready_copy, st.grads) << "stage " << s << " tp rank " << r;
      ASSERT_FALSE(st.ready_ranges.empty());
      EXPECT_EQ(st.ready_ranges.front().second,
                static_cast<int64_t>(st.grads.size()));
      EXPECT_EQ(st.ready_ranges.back().first, 0);
      for (size_t i = 1; i < st.ready_ranges.size(); ++i) {
        EXPECT_EQ(st.ready_ranges[i].second, st.ready_ranges[i - 1].first);
        EXPECT_LT(st.ready_ranges[i].first, st.ready_ranges[i].second);
      }
      const int blocks = layout.bounds[s + 1] - layout.bounds[s];
      const bool head = s == layout.stages() - 1;
      const bool front = s == 0 || head;  // wte (and wpe)
      EXPECT_EQ(st.ready_ranges.size(),
                static_cast<size_t>(blocks + (head ? 1 : 0) + (front ? 1 : 0)))
          << "stage " << s;
      for (const LocalTensor& t : st.tensors) {
        ++seen[t.name];
        const std::vector<float> actual(
            st.grads.begin() + t.offset,
            st.grads.begin() + t.offset + t.num_elements());
        if (t.name == "wte.weight") {
          for (size_t i = 0; i < actual.size(); ++i) wte_sum[i] += actual[i];
          continue;
        }
        const GlobalTensor& g = global.at(t.name);
        const std::vector<float> expected = ExpectedLocalGrad(
            t.name, g.shape, ref.grads.data() + g.offset, layout.tp, r);
        EXPECT_TRUE(AllClose(actual, expected, rtol, scale))
            << t.name << " stage " << s << " tp rank " << r;
      }
    }
    EXPECT_TRUE(AllClose(wte_sum, ref_wte, rtol, scale))
        << "wte (sum over stages) tp rank " << r;
    // Every tensor is held, wte by the first and the last stage.
    EXPECT_EQ(seen.size(), global.size());
    for (const auto& [name, count] : seen) {
      EXPECT_EQ(count, name == "wte.weight" && layout.stages() > 1 ? 2 : 1)
          << name;
    }
  }
}

class StageModelTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    backend_ = MakeBackend(GetParam());
    ASSERT_NE(backend_, nullptr);
  }

  // The whole model as a single stage on backend_.
  StageModelOptions FullOptions(const ModelConfig& config, int B, int T,
                                int slots = 1) {
    StageModelOptions o;
    o.config = config;
    o.layer_begin = 0;
    o.layer_end = config.n_layer();
    o.has_embedding = true;
    o.has_head = true;
    o.max_batch = B;
    o.max_seq = T;
    o.activation_slots = slots;
    return o;
  }

  void CheckParallel(const ModelConfig& config, const Layout& layout, int M,
                     uint64_t seed) {
    const int B = 2, T = kT;
    const std::vector<float> params = LargeParameters(config, seed);
    const std::vector<MicroBatch> mbs = MakeMicroBatches(M, B, T, seed + 100);
    const Result ref = RunReference(config, params, mbs, B, T, GetParam());
    const std::vector<RankResult> results =
        RunParallel(config, layout, params, mbs, B, T, GetParam());
    ExpectMatchesReference(config, layout, results, ref, 1e-5);
  }

  std::unique_ptr<Backend> backend_;
};

// (a) One stage, one rank: the same tensors in the same order as GptModel,
// and the same loss, logits and gradients bit for bit.
TEST_P(StageModelTest, SingleStageEqualsGptModel) {
  const ModelConfig config = TinyConfig(2, 2);
  const int B = 2, T = kT;
  auto gpt = GptModel::Create(config, backend_.get(), B, T);
  auto stage = StageModel::Create(FullOptions(config, B, T), backend_.get(),
                                  nullptr);
  ASSERT_TRUE(gpt.ok() && stage.ok()) << stage.status();
  ASSERT_EQ((*stage)->num_parameters(), (*gpt)->num_parameters());
  const std::vector<TensorSpec>& specs = (*gpt)->tensor_specs();
  const std::vector<LocalTensor>& local = (*stage)->local_tensors();
  ASSERT_EQ(local.size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(local[i].name, specs[i].name);
    EXPECT_EQ(local[i].local_shape, specs[i].shape);
    EXPECT_EQ(local[i].offset, (*gpt)->TensorOffset(specs[i].name).value());
    EXPECT_EQ((*stage)->TensorOffset(specs[i].name).value(), local[i].offset);
  }

  const std::vector<float> params = LargeParameters(config, 1);
  ASSERT_TRUE((*gpt)->SetParametersFromHost(params.data()).ok());
  ASSERT_TRUE((*stage)->SetParametersFromHost(params.data()).ok());
  std::vector<float> back(params.size());
  ASSERT_TRUE((*stage)->ParametersToHost(back.data()).ok());
  EXPECT_EQ(back, params);

  const std::vector<int32_t> tok = RandomTokens(2, B * T, kV);
  const std::vector<int32_t> tgt = RandomTokens(3, B * T, kV);
  (*gpt)->ZeroGrad();
  (*stage)->ZeroGrad();
  auto l_gpt = (*gpt)->Forward(tok.data(), tgt.data(), B, T);
  ASSERT_TRUE(l_gpt.ok());
  ASSERT_TRUE((*gpt)->Backward(0.7f).ok());
  auto l_stage =
      (*stage)->Forward(0, tok.data(), nullptr, tgt.data(), nullptr, B, T);
  ASSERT_TRUE(l_stage.ok()) << l_stage.status();
  ASSERT_TRUE((*stage)->Backward(0, nullptr, 0.7f, nullptr).ok());
  EXPECT_EQ(*l_stage, *l_gpt);
  std::vector<float> g_gpt(params.size()), g_stage(params.size());
  ASSERT_TRUE((*gpt)->GradientsToHost(g_gpt.data()).ok());
  ASSERT_TRUE((*stage)->GradientsToHost(g_stage.data()).ok());
  EXPECT_EQ(g_stage, g_gpt);

  // Logits-only forward.
  ASSERT_TRUE((*gpt)->Forward(tok.data(), nullptr, 1, 5).ok());
  auto zero = (*stage)->Forward(0, tok.data(), nullptr, nullptr, nullptr, 1, 5);
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(*zero, 0.0f);
  std::vector<float> lg_gpt(5 * kV), lg_stage(5 * kV);
  ASSERT_TRUE((*gpt)->LogitsToHost(lg_gpt.data()).ok());
  ASSERT_TRUE((*stage)->LogitsToHost(0, lg_stage.data()).ok());
  EXPECT_EQ(lg_stage, lg_gpt);
  EXPECT_EQ((*stage)->Backward(0, nullptr, 1.0f, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  (*stage)->ReleaseSlot(0);
  EXPECT_EQ((*stage)->slots_in_use(), 0);
  EXPECT_EQ((*stage)->LogitsToHost(0, lg_stage.data()).code(),
            absl::StatusCode::kFailedPrecondition);
}

// (b) A 3-block model in 3 stages (and 2 stages), 2 micro-batches in 2
// slots each.
TEST_P(StageModelTest, PipelineSplitMatchesGptModel) {
  CheckParallel(TinyConfig(3, 2), {{0, 1, 2, 3}, 1}, 2, 10);
  CheckParallel(TinyConfig(3, 2), {{0, 2, 3}, 1}, 2, 20);
  CheckParallel(TinyConfig(3, 2), {{0, 1, 3}, 1}, 1, 25);
}

// Edge stages: an embedding-only first stage and a head-only last stage.
TEST_P(StageModelTest, StagesWithoutBlocks) {
  CheckParallel(TinyConfig(2, 2), {{0, 0, 2, 2}, 1}, 2, 30);
}

// (c) Tensor parallelism: tp=2, tp=4 (4 heads), tp=2 with 2 stages.
TEST_P(StageModelTest, TensorParallelTwo) {
  CheckParallel(TinyConfig(2, 2), {{0, 2}, 2}, 1, 40);
}

TEST_P(StageModelTest, TensorParallelFour) {
  CheckParallel(TinyConfig(2, 4), {{0, 2}, 4}, 2, 50);
}

TEST_P(StageModelTest, TensorParallelWithPipeline) {
  CheckParallel(TinyConfig(3, 2), {{0, 1, 3}, 2}, 2, 60);
}

// (d) Sequence parallelism and vocabulary parallelism, alone and together,
// tp = 2 and 4, one stage and two (so the stages exchange token chunks and
// the tied wte slice sits on both ends), against GptModel.
TEST_P(StageModelTest, SequenceAndVocabParallel) {
  for (int tp : {2, 4}) {
    for (bool sp : {false, true}) {
      for (bool vp : {false, true}) {
        if (!sp && !vp) continue;
        SCOPED_TRACE(absl::StrCat("tp ", tp, " sp ", sp, " vp ", vp));
        Layout one{{0, 2}, tp, sp, vp};
        CheckParallel(TinyConfig(2, 4), one, 2, 70 + tp);
        Layout two{{0, 1, 2}, tp, sp, vp};
        CheckParallel(TinyConfig(2, 4), two, 2, 80 + tp);
        Layout ends{{0, 0, 2, 2}, tp, sp, vp};  // embedding-only, head-only
        CheckParallel(TinyConfig(2, 4), ends, 1, 90 + tp);
      }
    }
  }
}

// Sequence parallelism stores the LayerNorm region at 1/tp.
TEST_P(StageModelTest, SequenceParallelDividesLayerNormRegion) {
  const ModelConfig config = TinyConfig(2, 4);
  StageModelOptions o = FullOptions(config, 2, kT);
  o.tp_size = 4;
  TpGroup group(4);
  TestTpComm comm(&group, 4, 1);
  o.tp_rank = 1;
  auto plain = StageModel::Create(o, backend_.get(), &comm);
  o.sequence_parallel = true;
  auto seq = StageModel::Create(o, backend_.get(), &comm);
  ASSERT_TRUE(plain.ok() && seq.ok());
  const auto& a = (*plain)->activation_memory();
  const auto& b = (*seq)->activation_memory();
  EXPECT_GT(a.layernorm_region_per_slot, 0);
  EXPECT_EQ(b.layernorm_region_per_slot * 4, a.layernorm_region_per_slot);
  EXPECT_EQ(a.per_slot - b.per_slot,
            a.layernorm_region_per_slot - b.layernorm_region_per_slot);
}

// Local shapes under tp, for a middle stage.
TEST_P(StageModelTest, LocalTensorsOfMiddleStage) {
  const ModelConfig config = TinyConfig(3, 4);
  TpGroup group(4);
  TestTpComm comm(&group, 4, 3);
  StageModelOptions o;
  o.config = config;
  o.layer_begin = 1;
  o.layer_end = 2;
  o.tp_size = 4;
  o.tp_rank = 3;
  o.max_batch = 1;
  o.max_seq = 4;
  auto m = StageModel::Create(o, backend_.get(), &comm);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::vector<std::pair<std::string, std::vector<int64_t>>> want = {
      {"h.1.ln_1.weight", {16}},         {"h.1.ln_1.bias", {16}},
      {"h.1.attn.c_attn.weight", {12, 16}}, {"h.1.attn.c_attn.bias", {12}},
      {"h.1.attn.c_proj.weight", {16, 4}},  {"h.1.attn.c_proj.bias", {16}},
      {"h.1.ln_2.weight", {16}},         {"h.1.ln_2.bias", {16}},
      {"h.1.mlp.c_fc.weight", {16, 16}},    {"h.1.mlp.c_fc.bias", {16}},
      {"h.1.mlp.c_proj.weight", {16, 16}},  {"h.1.mlp.c_proj.bias", {16}},
  };
  const std::vector<LocalTensor>& local = (*m)->local_tensors();
  ASSERT_EQ(local.size(), want.size());
  int64_t offset = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(local[i].name, want[i].first);
    EXPECT_EQ(local[i].local_shape, want[i].second) << want[i].first;
    EXPECT_EQ(local[i].offset, offset);
    offset += local[i].num_elements();
  }
  EXPECT_EQ((*m)->num_parameters(), offset);
  EXPECT_EQ((*m)->TensorOffset("wte.weight").status().code(),
            absl::StatusCode::kNotFound);

  // A last stage without the embedding holds wte (tied head) first.
  o.layer_begin = 2;
  o.layer_end = 3;
  o.has_head = true;
  auto last = StageModel::Create(o, backend_.get(), &comm);
  ASSERT_TRUE(last.ok());
  EXPECT_EQ((*last)->local_tensors().front().name, "wte.weight");
  EXPECT_EQ((*last)->local_tensors().back().name, "ln_f.bias");
  EXPECT_EQ((*last)->local_tensors().size(), 15u);
}

// (d) 1F1B-style slot usage: F0 F1 B0 F0' B1 B0' equals GptModel's three
// micro-batches accumulated.
TEST_P(StageModelTest, OneForwardOneBackwardSlots) {
  const ModelConfig config = TinyConfig(2, 2);
  const int B = 2, T = kT;
  const std::vector<float> params = LargeParameters(config, 70);
  const std::vector<MicroBatch> mbs = MakeMicroBatches(3, B, T, 170);
  const Result ref = RunReference(config, params, mbs, B, T, GetParam());

  auto m = StageModel::Create(FullOptions(config, B, T, /*slots=*/2),
                              backend_.get(), nullptr);
  ASSERT_TRUE(m.ok());
  StageModel& model = **m;
  ASSERT_TRUE(model.SetParametersFromHost(params.data()).ok());
  model.ZeroGrad();
  const float scale = 1.0f / 3;
  auto fwd = [&](int slot, int mb) {
    return model.Forward(slot, mbs[mb].tokens.data(), nullptr,
                         mbs[mb].targets.data(), nullptr, B, T);
  };
  double loss = 0;
  auto l0 = fwd(0, 0);
  auto l1 = fwd(1, 1);
  ASSERT_TRUE(l0.ok() && l1.ok());
  EXPECT_EQ(model.slots_in_use(), 2);
  EXPECT_TRUE(model.slot_in_use(0) && model.slot_in_use(1));
  EXPECT_EQ(fwd(0, 2).status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(model.Backward(0, nullptr, scale, nullptr).ok());
  EXPECT_EQ(model.Backward(0, nullptr, scale, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  auto l2 = fwd(0, 2);
  ASSERT_TRUE(l2.ok());
  ASSERT_TRUE(model.Backward(1, nullptr, scale, nullptr).ok());
  ASSERT_TRUE(model.Backward(0, nullptr, scale, nullptr).ok());
  loss = (double{*l0} + *l1 + *l2) / 3;
  EXPECT_EQ(model.slots_in_use(), 0);
  EXPECT_EQ(model.max_slots_in_use(), 2);
  model.ResetMaxSlotsInUse();
  EXPECT_EQ(model.max_slots_in_use(), 0);

  EXPECT_NEAR(loss, ref.loss, 1e-6 * ref.loss);
  std::vector<float> grads(model.num_parameters());
  ASSERT_TRUE(model.GradientsToHost(grads.data()).ok());
  EXPECT_TRUE(AllClose(grads, ref.grads, 1e-6));
}

// Evaluation: a forward released without backward leaves the gradients
// alone and frees the slot.
TEST_P(StageModelTest, ReleaseSlotForEvaluation) {
  const ModelConfig config = TinyConfig(1, 2);
  auto m = StageModel::Create(FullOptions(config, 1, kT), backend_.get(),
                              nullptr);
  ASSERT_TRUE(m.ok());
  const std::vector<float> params = LargeParameters(config, 80);
  ASSERT_TRUE((*m)->SetParametersFromHost(params.data()).ok());
  (*m)->ZeroGrad();
  const std::vector<int32_t> tok = RandomTokens(4, kT, kV);
  auto loss = (*m)->Forward(0, tok.data(), nullptr, tok.data(), nullptr, 1, kT);
  ASSERT_TRUE(loss.ok());
  EXPECT_GT(*loss, 0.0f);
  (*m)->ReleaseSlot(0);
  (*m)->ReleaseSlot(7);  // out of range: no-op
  EXPECT_EQ((*m)->slots_in_use(), 0);
  EXPECT_EQ((*m)->Backward(0, nullptr, 1.0f, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  std::vector<float> grads((*m)->num_parameters());
  ASSERT_TRUE((*m)->GradientsToHost(grads.data()).ok());
  EXPECT_TRUE(std::all_of(grads.begin(), grads.end(),
                          [](float g) { return g == 0.0f; }));
}

TEST_P(StageModelTest, ForwardAndBackwardValidate) {
  const ModelConfig config = TinyConfig(2, 2);
  const int B = 2, T = kT;
  std::vector<int32_t> tok(B * T, 1), tgt(B * T, 2);
  std::vector<float> act(B * T * kC, 0.1f), dact(B * T * kC);
  const auto kInvalid = absl::StatusCode::kInvalidArgument;

  // First stage (embedding, no head).
  StageModelOptions o = FullOptions(config, B, T, 2);
  o.layer_end = 1;
  o.has_head = false;
  auto first = StageModel::Create(o, backend_.get(), nullptr);
  ASSERT_TRUE(first.ok());
  auto fcode = [&](int slot, const int32_t* t, float* out, int b, int s) {
    return (*first)->Forward(slot, t, nullptr, nullptr, out, b, s)
        .status()
        .code();
  };
  EXPECT_EQ(fcode(-1, tok.data(), act.data(), B, T), kInvalid);
  EXPECT_EQ(fcode(2, tok.data(), act.data(), B, T), kInvalid);
  EXPECT_EQ(fcode(0, tok.data(), act.data(), B + 1, T), kInvalid);
  EXPECT_EQ(fcode(0, tok.data(), act.data(), 0, T), kInvalid);
  EXPECT_EQ(fcode(0, tok.data(), act.data(), B, T + 1), kInvalid);
  EXPECT_EQ(fcode(0, tok.data(), act.data(), B, 0), kInvalid);
  EXPECT_EQ(fcode(0, nullptr, act.data(), B, T), kInvalid);
  EXPECT_EQ(fcode(0, tok.data(), nullptr, B, T), kInvalid);
  tok[3] = kV;
  EXPECT_EQ(fcode(0, tok.data(), act.data(), B, T), kInvalid);
  tok[3] = -1;
  EXPECT_EQ(fcode(0, tok.data(), act.data(), B, T), kInvalid);
  tok[3] = 0;
  EXPECT_EQ((*first)->slots_in_use(), 0) << "failed forwards hold no slot";
  ASSERT_EQ(fcode(0, tok.data(), act.data(), B, T), absl::StatusCode::kOk);
  EXPECT_EQ(fcode(0, tok.data(), act.data(), B, T),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*first)->Backward(0, nullptr, 1.0f, nullptr).code(), kInvalid);
  EXPECT_EQ((*first)->Backward(1, dact.data(), 1.0f, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*first)->Backward(5, dact.data(), 1.0f, nullptr).code(),
            kInvalid);
  EXPECT_TRUE((*first)->Backward(0, dact.data(), 1.0f, nullptr).ok());

  // Last stage (input, head).
  o = FullOptions(config, B, T, 1);
  o.layer_begin = 1;
  o.has_embedding = false;
  auto last = StageModel::Create(o, backend_.get(), nullptr);
  ASSERT_TRUE(last.ok());
  EXPECT_EQ((*last)->Forward(0, tok.data(), nullptr, tgt.data(), nullptr, B, T)
                .status()
                .code(),
            kInvalid);  // no input
  tgt[B * T - 1] = kV;
  EXPECT_EQ((*last)->Forward(0, nullptr, act.data(), tgt.data(), nullptr, B, T)
                .status()
                .code(),
            kInvalid);
  tgt[B * T - 1] = 2;
  // Tokens are ignored after the first stage (even invalid ones).
  tok[0] = -5;
  ASSERT_TRUE(
      (*last)->Forward(0, tok.data(), act.data(), tgt.data(), nullptr, B, T)
          .ok());
  EXPECT_EQ((*last)->Backward(0, nullptr, 1.0f, nullptr).code(), kInvalid);
  EXPECT_TRUE((*last)->Backward(0, nullptr, 1.0f, dact.data()).ok());
  EXPECT_EQ((*last)->max_slots_in_use(), 1);
}

TEST_P(StageModelTest, CreateValidates) {
  const ModelConfig config = TinyConfig(2, 2);
  auto code = [&](const StageModelOptions& o, TpComm* comm = nullptr) {
    return StageModel::Create(o, backend_.get(), comm).status().code();
  };
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  const StageModelOptions good = FullOptions(config, 2, kT);
  EXPECT_EQ(code(good), absl::StatusCode::kOk);
  EXPECT_EQ(StageModel::Create(good, nullptr, nullptr).status().code(),
            kInvalid);
  StageModelOptions o = good;
  o.layer_end = 3;
  EXPECT_EQ(code(o), kInvalid);
  o = good;
  o.layer_begin = 2;
  o.layer_end = 1;
  EXPECT_EQ(code(o), kInvalid);
  o = good;
  o.layer_begin = -1;
  EXPECT_EQ(code(o), kInvalid);
  o = good;
  o.layer_begin = o.layer_end = 1;
  o.has_embedding = o.has_head = false;
  EXPECT_EQ(code(o), kInvalid);  // holds nothing
  o = good;
  o.max_batch = 0;
  EXPECT_EQ(code(o), kInvalid);
  o = good;
  o.max_seq = kT + 1;
  EXPECT_EQ(code(o), kInvalid);
  o = good;
  o.activation_slots = 0;
  EXPECT_EQ(code(o), kInvalid);
  o = good;
  o.config.set_n_head(3);
  EXPECT_EQ(code(o), kInvalid);

  TpGroup group(2);
  TestTpComm comm0(&group, 2, 0), comm1(&group, 2, 1);
  o = good;
  o.tp_size = 2;
  EXPECT_EQ(code(o), kInvalid);  // no comm
  EXPECT_EQ(code(o, &comm0), absl::StatusCode::kOk);
  EXPECT_EQ(code(o, &comm1), kInvalid);  // rank mismatch
  o.tp_rank = 2;
  EXPECT_EQ(code(o, &comm0), kInvalid);
  o = good;
  o.tp_size = 4;  // n_head = 2
  TpGroup group4(4);
  TestTpComm comm4(&group4, 4, 0);
  EXPECT_EQ(code(o, &comm4), kInvalid);
  // Sequence parallelism: max_seq divisible by tp; vocab parallelism:
  // vocab_size divisible by tp.
  o = good;
  o.tp_size = 2;
  o.sequence_parallel = true;
  o.max_seq = 7;
  EXPECT_EQ(code(o, &comm0), kInvalid);
  o.max_seq = 6;
  EXPECT_EQ(code(o, &comm0), absl::StatusCode::kOk);
  o = good;
  o.tp_size = 2;
  o.vocab_parallel = true;
  o.config.set_vocab_size(33);
  EXPECT_EQ(code(o, &comm0), kInvalid);
  o.config.set_vocab_size(34);
  EXPECT_EQ(code(o, &comm0), absl::StatusCode::kOk);
}

INSTANTIATE_TEST_SUITE_P(Backends, StageModelTest,
                         ::testing::Values("cpu", "reference"),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           return i.param;
                         });

}  // namespace
}  // namespace lmps
