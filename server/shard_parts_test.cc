// ParameterShard with pipeline and tensor-parallel workers: chunks owned in
// parts by several workers.
#include "server/shard_test_util.h"

namespace lmps {
namespace shard_test {
namespace {

// ---------------------------------------------------------------------------
// Pipeline and tensor parallel: chunks owned in parts by several workers.
// ---------------------------------------------------------------------------

// 2 layers, 2 heads, width 8, pp = 2, tp = 2; chunks of at most 10 elements,
// so they straddle the tensor-parallel slices' boundaries.
JobSpec ParallelSpec(int pp, int tp, int num_shards) {
  JobSpec spec = Spec(1, num_shards, ADAMW);
  spec.mutable_model()->set_n_layer(2);
  spec.mutable_layout()->set_pp(pp);
  spec.mutable_layout()->set_tp(tp);
  spec.set_max_chunk_bytes(40);  // messages: 1024 bytes, the minimum
  spec.mutable_optimizer()->set_grad_clip(0.5f);  // the norm is above it
  return spec;
}

ParallelLayout Layout(const JobSpec& spec) {
  absl::StatusOr<ParallelLayout> l =
      ParallelLayout::Create(spec.model(), spec.layout());
  EXPECT_TRUE(l.ok()) << l.status();
  return *l;
}

int TensorIndex(const ParallelLayout& layout, const std::string& name) {
  for (size_t t = 0; t < layout.tensors().size(); ++t) {
    if (layout.tensors()[t].name == name) return static_cast<int>(t);
  }
  ADD_FAILURE() << name;
  return -1;
}

// A random gradient per tensor (GptTensorSpecs order); wte's is what the
// first stage pushes, `wte_last` what the last stage pushes (the tied
// embedding's two contributions).
struct FullGradient {
  std::vector<std::vector<float>> tensors;
  std::vector<float> wte_last;
  // The gradient of a pp = 1 worker: the two wte parts summed.
  std::vector<float> Summed(int t) const {
    std::vector<float> g = tensors[t];
    if (t == 0) {
      for (size_t i = 0; i < g.size(); ++i) g[i] += wte_last[i];
    }
    return g;
  }
};

FullGradient RandomGradient(const JobSpec& spec, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-0.05f, 0.05f);
  FullGradient g;
  for (const TensorSpec& t : GptTensorSpecs(spec.model())) {
    g.tensors.emplace_back(t.num_elements());
    for (float& v : g.tensors.back()) v = u(rng);
  }
  EXPECT_EQ(GptTensorSpecs(spec.model())[0].name, "wte.weight");
  g.wte_last.resize(g.tensors[0].size());
  for (float& v : g.wte_last) v = u(rng);
  return g;
}

PushRequest Header(const ParameterShard& shard, int pp, int tp,
                   int64_t step) {
  PushRequest m;
  m.set_worker_id("w");
  m.set_dp_rank(0);
  m.set_pp_rank(pp);
  m.set_tp_rank(tp);
  m.set_step(step);
  m.set_partition_version(shard.partition().version());
  return m;
}

// The push stream of worker (pp, tp) of dp rank 0 to `shard`: its Pushed
// ranges of every chunk, each range cut in two slices, 3 slices a message.
// pp = tp = 1 (full = true): whole chunks of the summed gradient.
std::vector<PushRequest> PartStream(const ParameterShard& shard,
                                    const ParallelLayout& layout,
                                    const FullGradient& g, int pp, int tp,
                                    int64_t step) {
  std::vector<PushRequest> stream;
  int slices = 0;
  for (const ChunkDesc& c : ChunksOfShard(shard.partition(), shard.shard())) {
    const int t = TensorIndex(layout, c.tensor());
    const std::vector<float> values =
        layout.pp() == 1 ? g.Summed(t)
                         : (t == 0 && pp == layout.pp() - 1 && pp > 0
                                ? g.wte_last
                                : g.tensors[t]);
    for (const ElementRange& r :
         IntersectRanges(layout.Pushed(t, pp, tp), c.begin(), c.end())) {
      const int64_t mid = r.begin + r.size() / 2;
      for (auto [b, e] : {std::pair<int64_t, int64_t>{mid, r.end},
                          {r.begin, mid}}) {
        if (b == e) continue;
        if (stream.empty() || slices == 3) {
          stream.push_back(Header(shard, pp, tp, step));
          slices = 0;
        }
        ChunkSlice* s = stream.back().add_slices();
        s->set_tensor(c.tensor());
        s->set_chunk(c.index());
        s->set_offset(b);
        s->set_dtype(F32);
        EncodePayload(F32, values.data() + c.begin() + b, e - b,
                      s->mutable_data());
        ++slices;
      }
    }
  }
  return stream;
}

// Pushes `g` for `step` to every shard of a pp = tp = 1 job (`ref`) and, as
// the four workers' parts, to the pp = 2, tp = 2 job (`par`); applies both
// and expects equal parameters. Checks incompleteness before the last part
// and that retried parts are duplicates.
void PushBothAndApply(std::vector<std::unique_ptr<ParameterShard>>& ref,
                      std::vector<std::unique_ptr<ParameterShard>>& par,
                      const ParallelLayout& ref_layout,
                      const ParallelLayout& layout, const FullGradient& g,
                      int64_t step) {
  double ref_ss = 0, par_ss = 0;
  for (auto& shard : ref) {
    ASSERT_TRUE(
        shard->Push(PartStream(*shard, ref_layout, g, 0, 0, step)).ok());
    ref_ss += *shard->GradNorm(step, Soon());
  }
  // Last worker first on odd steps: arrival order must not matter.
  std::vector<std::pair<int, int>> order = {{0, 0}, {0, 1}, {1, 0}, {1, 1}};
  if (step % 2 == 1) std::reverse(order.begin(), order.end());
  for (auto& shard : par) {
    for (size_t w = 0; w < order.size(); ++w) {
      const auto [pp, tp] = order[w];
      const auto stream = PartStream(*shard, layout, g, pp, tp, step);
      if (stream.empty()) continue;  // nothing of this worker's here
      if (w + 1 == order.size()) {
        // Before the last part the step is incomplete, and the timeout
        // names the missing worker.
        auto gn = shard->GradNorm(step, absl::Now() + absl::Milliseconds(20));
        ASSERT_EQ(gn.status().code(), absl::StatusCode::kDeadlineExceeded);
        EXPECT_NE(gn.status().message().find(absl::StrCat(
                      "dp rank 0 (pp ", pp, ", tp ", tp, ") pushed 0 of")),
                  std::string::npos)
            << gn.status();
        EXPECT_EQ(shard->Apply(step, 1.0).status().code(),
                  absl::StatusCode::kFailedPrecondition);
      }
      auto r = shard->Push(stream);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_GT(r->chunks_accepted(), 0);
      EXPECT_EQ(r->chunks_duplicate(), 0);
      if (w == 0) {  // a retried RPC
        auto dup = shard->Push(stream);
        ASSERT_TRUE(dup.ok()) << dup.status();
        EXPECT_EQ(dup->chunks_accepted(), 0);
        EXPECT_EQ(dup->chunks_duplicate(), r->chunks_accepted());
      }
    }
    par_ss += *shard->GradNorm(step, Soon());
  }
  EXPECT_NEAR(par_ss, ref_ss, 1e-9 * ref_ss);
  for (auto& shard : ref) ASSERT_TRUE(shard->Apply(step, ref_ss).ok());
  for (auto& shard : par) ASSERT_TRUE(shard->Apply(step, par_ss).ok());
  for (size_t s = 0; s < ref.size(); ++s) {
    const ShardCheckpoint a = ref[s]->Snapshot(), b = par[s]->Snapshot();
    ASSERT_EQ(a.chunks.size(), b.chunks.size());
    for (size_t c = 0; c < a.chunks.size(); ++c) {
      ASSERT_EQ(a.chunks[c].params.size(), b.chunks[c].params.size());
      for (size_t i = 0; i < a.chunks[c].params.size(); ++i) {
        ASSERT_NEAR(a.chunks[c].params[i], b.chunks[c].params[i], 1e-6)
            << a.chunks[c].desc.ShortDebugString() << " element " << i;
      }
    }
  }
}

TEST(ShardTest, PipelineAndTensorPartsEqualAFullPush) {
  for (int num_shards : {1, 2}) {
    SCOPED_TRACE(num_shards);
    const JobSpec ref_spec = ParallelSpec(1, 1, num_shards);
    const JobSpec spec = ParallelSpec(2, 2, num_shards);
    const ParallelLayout ref_layout = Layout(ref_spec), layout = Layout(spec);
    std::vector<std::unique_ptr<ParameterShard>> ref, par;
    for (int s = 0; s < num_shards; ++s) {
      ref.push_back(MakeShard(Options(ref_spec, s)));
      par.push_back(MakeShard(Options(spec, s)));
      ASSERT_NE(par.back(), nullptr);
    }
    // Two steps: the second reuses the step slot, whose summed buffers must
    // start from zero again.
    for (int64_t step = 0; step < 2; ++step) {
      PushBothAndApply(ref, par, ref_layout, layout,
                       RandomGradient(spec, 7 + step), step);
      if (HasFailure()) return;
    }
  }
}

TEST(ShardTest, PartsOutsideTheWorkersShareAreRejected) {
  const JobSpec spec = ParallelSpec(2, 2, 1);
  const ParallelLayout layout = Layout(spec);
  auto shard = MakeShard(Options(spec, 0));
  ASSERT_NE(shard, nullptr);
  const FullGradient g = RandomGradient(spec, 3);
  using Code = absl::StatusCode;
  const auto chunks = ChunksOfShard(shard->partition(), 0);
  auto chunk_of = [&](const std::string& tensor, int64_t element) {
    for (const ChunkDesc& c : chunks) {
      if (c.tensor() == tensor && c.begin() <= element && element < c.end()) {
        return c;
      }
    }
    ADD_FAILURE() << tensor;
    return ChunkDesc();
  };
  auto slice = [&](PushRequest* m, const ChunkDesc& c, int64_t b, int64_t e) {
    ChunkSlice* s = m->add_slices();
    s->set_tensor(c.tensor());
    s->set_chunk(c.index());
    s->set_offset(b);
    s->set_dtype(F32);
    std::vector<float> v(e - b, 0.01f);
    EncodePayload(F32, v.data(), v.size(), s->mutable_data());
  };

  // tp rank 1 pushing a replicated LayerNorm tensor.
  PushRequest m = Header(*shard, 0, 1, 0);
  const ChunkDesc ln = chunk_of("h.0.ln_1.weight", 0);
  slice(&m, ln, 0, ln.end() - ln.begin());
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 "(dp rank 0, pp 0, tp 1) owns no part of tensor "
                 "'h.0.ln_1.weight' chunk 0");
  // Stage 1 pushing a block of stage 0.
  m = Header(*shard, 1, 0, 0);
  slice(&m, ln, 0, ln.end() - ln.begin());
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument, "owns no part of");

  // tp rank 0 pushing tp rank 1's slice of a chunk holding both (a chunk
  // of a column-parallel tensor straddling the boundary from tp rank 0's
  // rows to tp rank 1's).
  ChunkDesc straddle;
  std::vector<ElementRange> mine, theirs;
  for (const ChunkDesc& c : chunks) {
    const int t = TensorIndex(layout, c.tensor());
    if (layout.split(t) == TpSplit::kReplicated) continue;
    mine = IntersectRanges(layout.Pushed(t, 0, 0), c.begin(), c.end());
    theirs = IntersectRanges(layout.Pushed(t, 0, 1), c.begin(), c.end());
    if (mine.size() == 1 && theirs.size() == 1 &&
        mine[0].end == theirs[0].begin) {
      straddle = c;
      break;
    }
  }
  ASSERT_FALSE(straddle.tensor().empty());
  const std::string name =
      absl::StrCat("tensor '", straddle.tensor(), "' chunk ", straddle.index());
  m = Header(*shard, 0, 0, 0);
  slice(&m, straddle, theirs[0].begin, theirs[0].end);
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 absl::StrCat("push from (dp rank 0, pp 0, tp 0) for step 0: ",
                              name, " misses elements [", mine[0].begin, ", ",
                              mine[0].end, ") of its part"));
  // Its own part and one element more; its own part less one element.
  m = Header(*shard, 0, 0, 0);
  slice(&m, straddle, mine[0].begin, mine[0].end + 1);
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 absl::StrCat(name, " has elements [", mine[0].end, ", ",
                              mine[0].end + 1, ") outside its part"));
  m = Header(*shard, 0, 0, 0);
  slice(&m, straddle, mine[0].begin, mine[0].end - 1);
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 absl::StrCat("misses elements [", mine[0].end - 1, ", ",
                              mine[0].end, ") of its part"));
  // Both parts from tp rank 0.
  m = Header(*shard, 0, 0, 0);
  slice(&m, straddle, mine[0].begin, theirs[0].end);
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 "outside its part");
  // A row-parallel chunk holding several ranges of tp rank 1 in stage 1:
  // it pushes all but the first.
  ChunkDesc rows;
  std::vector<ElementRange> part;
  for (const ChunkDesc& c : chunks) {
    const int t = TensorIndex(layout, c.tensor());
    if (layout.split(t) != TpSplit::kRow) continue;
    part = IntersectRanges(layout.Pushed(t, 1, 1), c.begin(), c.end());
    if (part.size() >= 2) {
      rows = c;
      break;
    }
  }
  ASSERT_FALSE(rows.tensor().empty());
  m = Header(*shard, 1, 1, 0);
  for (size_t i = 1; i < part.size(); ++i) {
    slice(&m, rows, part[i].begin, part[i].end);
  }
  ExpectRejected(shard.get(), {m}, Code::kInvalidArgument,
                 absl::StrCat("(dp rank 0, pp 1, tp 1) for step 0: tensor '",
                              rows.tensor(), "' chunk ", rows.index(),
                              " misses elements [", part[0].begin, ", ",
                              part[0].end, ")"));
  // Ranks out of range, or changing within the stream.
  auto good = PartStream(*shard, layout, g, 1, 1, 0);
  ASSERT_GE(good.size(), 2u);
  auto s = good;
  for (auto& msg : s) msg.set_pp_rank(2);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "out of range");
  s = good;
  for (auto& msg : s) msg.set_tp_rank(-1);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "out of range");
  s = good;
  s.back().set_tp_rank(0);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "stream started");

  // Nothing was received: the good parts still complete the step.
  for (int pp = 0; pp < 2; ++pp) {
    for (int tp = 0; tp < 2; ++tp) {
      auto r = shard->Push(PartStream(*shard, layout, g, pp, tp, 0));
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->chunks_duplicate(), 0);
    }
  }
  EXPECT_TRUE(shard->GradNorm(0, Soon()).ok());
  EXPECT_EQ(shard->duplicate_chunks(), 0);
}

TEST(ShardTest, OwnedOnlyPullReturnsExactlyTheHeldRanges) {
  const JobSpec spec = ParallelSpec(2, 2, 2);
  const ParallelLayout layout = Layout(spec);
  std::vector<std::unique_ptr<ParameterShard>> shards;
  for (int s = 0; s < 2; ++s) shards.push_back(MakeShard(Options(spec, s)));
  const std::vector<TensorSpec> specs = GptTensorSpecs(spec.model());
  // The full parameters (deterministic initialisation).
  std::vector<std::vector<float>> full;
  for (const TensorSpec& t : specs) {
    full.emplace_back(t.num_elements());
    InitTensorRange(t, spec.train().seed(), 0, t.num_elements(),
                    full.back().data());
  }
  std::map<std::pair<std::string, int>, int64_t> begin_of;
  for (const ChunkDesc& c : shards[0]->partition().chunks()) {
    begin_of[{c.tensor(), c.index()}] = c.begin();
  }
  for (int pp = 0; pp < 2; ++pp) {
    for (int tp = 0; tp < 2; ++tp) {
      SCOPED_TRACE(absl::StrCat("pp ", pp, " tp ", tp));
      // Elements returned, per tensor.
      std::vector<std::vector<int>> seen(specs.size());
      for (size_t t = 0; t < specs.size(); ++t) {
        seen[t].assign(specs[t].num_elements(), 0);
      }
      int64_t floats = 0;
      for (auto& shard : shards) {
        PullRequest pull;
        pull.set_owned_only(true);
        pull.set_pp_rank(pp);
        pull.set_tp_rank(tp);
        auto msgs = shard->Pull(pull, Soon());
        ASSERT_TRUE(msgs.ok()) << msgs.status();
        for (const PullResponse& msg : *msgs) {
          int64_t payload = 0;
          for (const ChunkSlice& s : msg.slices()) {
            payload += s.data().size();
            const int t = TensorIndex(layout, s.tensor());
            std::vector<float> v(s.data().size() / 4);
            DecodePayload(F32, s.data(), v.data());
            const int64_t at =
                begin_of.at({s.tensor(), s.chunk()}) + s.offset();
            for (size_t i = 0; i < v.size(); ++i) {
              ++seen[t][at + i];
              ASSERT_EQ(v[i], full[t][at + i]) << s.tensor() << " " << at + i;
            }
            floats += v.size();
          }
          EXPECT_LE(payload, spec.max_message_bytes());
        }
      }
      EXPECT_EQ(floats, layout.HeldElements(pp, tp));
      for (size_t t = 0; t < specs.size(); ++t) {
        std::vector<int> want(specs[t].num_elements(), 0);
        for (const ElementRange& r : layout.Held(t, pp, tp)) {
          std::fill(want.begin() + r.begin, want.begin() + r.end, 1);
        }
        EXPECT_EQ(seen[t], want) << specs[t].name;
      }
    }
  }
  // The tensors filter.
  PullRequest pull;
  pull.set_owned_only(true);
  pull.set_pp_rank(1);
  pull.set_tp_rank(1);
  pull.add_tensors("h.1.attn.c_attn.bias");
  int64_t floats = 0;
  for (auto& shard : shards) {
    auto msgs = shard->Pull(pull, Soon());
    ASSERT_TRUE(msgs.ok()) << msgs.status();
    for (const PullResponse& msg : *msgs) {
      for (const ChunkSlice& s : msg.slices()) {
        EXPECT_EQ(s.tensor(), "h.1.attn.c_attn.bias");
        floats += s.data().size() / 4;
      }
    }
  }
  EXPECT_EQ(floats, 12);  // q, k and v: 4 of 8 each
  // Ranks out of range.
  pull.set_pp_rank(2);
  EXPECT_EQ(shards[0]->Pull(pull, Soon()).status().code(),
            absl::StatusCode::kInvalidArgument);
  pull.set_pp_rank(0);
  pull.set_tp_rank(-1);
  EXPECT_EQ(shards[0]->Pull(pull, Soon()).status().code(),
            absl::StatusCode::kInvalidArgument);
  // owned_only = false: whole chunks, ranks ignored.
  pull.set_owned_only(false);
  pull.clear_tensors();
  floats = 0;
  for (auto& shard : shards) {
    auto msgs = shard->Pull(pull, Soon());
    ASSERT_TRUE(msgs.ok()) << msgs.status();
    for (const PullResponse& msg : *msgs) {
      for (const ChunkSlice& s : msg.slices()) floats += s.data().size() / 4;
    }
  }
  EXPECT_EQ(floats, shards[0]->num_elements() + shards[1]->num_elements());
}

// Elastic resize: StopAt(s) checkpoints step s once it exists and refuses
// pulls of steps >= s (workers stop after s - 1); a stop step the shard is
// already past is refused, one it is at checkpoints at once.
TEST(ShardTest, StopAtCheckpointsTheBoundaryAndEndsPulls) {
  const std::string dir = TestDir("stop_at");
  JobSpec spec = Spec(2, 2, ADAMW);
  spec.mutable_train()->set_checkpoint_interval(100);
  ShardOptions o = Options(spec, 1);
  o.checkpoint_dir = dir;
  auto a = MakeShard(o);
  auto step = [](ParameterShard* s, int64_t t) {
    ASSERT_TRUE(s->Push(Stream(*s, 0, t)).ok());
    ASSERT_TRUE(s->Push(Stream(*s, 1, t)).ok());
    const double ss = *s->GradNorm(t, Soon());
    ASSERT_TRUE(s->Apply(t, ss).ok());
  };
  ASSERT_EQ(*a->StopAt(2), 0);
  step(a.get(), 0);
  EXPECT_TRUE(a->Pull(PullFor(1), Soon()).ok());
  step(a.get(), 1);
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir, 1), std::vector<int64_t>{2});
  auto pull = a->Pull(PullFor(2), Soon());
  EXPECT_EQ(pull.status().code(), absl::StatusCode::kAborted);
  EXPECT_NE(pull.status().message().find("for a resize"), std::string::npos);
  EXPECT_EQ(ReasonOf(pull.status()), STOPPED_FOR_RESIZE);
  EXPECT_EQ(ReasonOf(a->GradNorm(2, Soon()).status()), STOPPED_FOR_RESIZE);
  EXPECT_EQ(a->StopAt(1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReasonOf(a->StopAt(1).status()), STOP_STEP_PASSED);

  const std::string dir2 = TestDir("stop_at_now");
  o.checkpoint_dir = dir2;
  auto b = MakeShard(o);
  step(b.get(), 0);
  ASSERT_EQ(*b->StopAt(1), 1);  // at the boundary already: checkpoint now
  EXPECT_EQ(*ListCompleteCheckpointSteps(dir2, 1), std::vector<int64_t>{1});
}


}  // namespace
}  // namespace shard_test
}  // namespace lmps
