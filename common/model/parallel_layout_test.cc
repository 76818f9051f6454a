#include "common/model/parallel_layout.h"

#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

ModelConfig Model(int layers, int heads, int embd, int vocab = 256) {
  ModelConfig m;
  m.set_n_layer(layers);
  m.set_n_head(heads);
  m.set_n_embd(embd);
  m.set_block_size(16);
  m.set_vocab_size(vocab);
  return m;
}

LayoutConfig Layout(int dp, int pp, int tp) {
  LayoutConfig l;
  l.set_dp(dp);
  l.set_pp(pp);
  l.set_tp(tp);
  l.set_num_shards(1);
  return l;
}

TEST(ParallelLayoutTest, StagesCoverEveryLayerOnce) {
  for (int layers : {1, 2, 3, 5, 12}) {
    for (int pp = 1; pp <= layers; ++pp) {
      auto l = ParallelLayout::Create(Model(layers, 4, 32), Layout(1, pp, 1));
      ASSERT_TRUE(l.ok()) << l.status();
      int next = 0;
      for (int s = 0; s < pp; ++s) {
        const StageRange& r = l->stage(s);
        EXPECT_EQ(r.layer_begin, next);
        EXPECT_GT(r.layer_end, r.layer_begin) << "stage " << s << " empty";
        EXPECT_EQ(r.has_embedding, s == 0);
        EXPECT_EQ(r.has_head, s == pp - 1);
        next = r.layer_end;
      }
      EXPECT_EQ(next, layers);
    }
  }
}

TEST(ParallelLayoutTest, BalancesByCompute) {
  // Cheap head: 4 layers over 2 stages split evenly.
  auto even = ParallelLayout::Create(Model(4, 4, 256, 256), Layout(1, 2, 1));
  ASSERT_TRUE(even.ok());
  EXPECT_EQ(even->stage(0).layer_end, 2);
  // A head as costly as several blocks (V = 50304, C = 64): the last stage
  // gets fewer blocks.
  auto heavy = ParallelLayout::Create(Model(8, 4, 64, 50304), Layout(1, 2, 1));
  ASSERT_TRUE(heavy.ok());
  // The head costs ~65 blocks: the last stage keeps its one block.
  EXPECT_EQ(heavy->stage(0).layer_end, 7);
  // A head worth ~1.5 blocks (V = 1200, C = 64) on 6 layers: 4 + 2 would
  // cost max(4, 3.5); 3 + 3 costs 4.5. Every other cut is worse.
  auto mid = ParallelLayout::Create(Model(6, 4, 64, 1200), Layout(1, 2, 1));
  ASSERT_TRUE(mid.ok());
  EXPECT_EQ(mid->stage(0).layer_end, 4);
  const auto& c = mid->stage_costs();
  const double block = 24.0 * 64 * 64 + 4.0 * 16 * 64;
  const double max = std::max(c[0], c[1]);
  EXPECT_GE(std::max(c[0] - block, c[1] + block), max);
  EXPECT_GE(std::max(c[0] + block, c[1] - block), max);
}

TEST(ParallelLayoutTest, RejectsInvalidLayoutsSayingWhatIsValid) {
  auto bad_tp = ParallelLayout::Create(Model(2, 4, 32), Layout(1, 1, 3));
  ASSERT_FALSE(bad_tp.ok());
  EXPECT_NE(bad_tp.status().message().find("valid tp: 1, 2, 4"),
            std::string::npos)
      << bad_tp.status();
  auto bad_pp = ParallelLayout::Create(Model(2, 4, 32), Layout(1, 3, 1));
  ASSERT_FALSE(bad_pp.ok());
  EXPECT_NE(bad_pp.status().message().find("valid: pp in [1, 2]"),
            std::string::npos)
      << bad_pp.status();
  EXPECT_FALSE(ParallelLayout::Create(Model(2, 4, 32), Layout(0 - 1, 1, 1)).ok());
}

TEST(ParallelLayoutTest, RanksRoundTripWithTpFastest) {
  auto l = ParallelLayout::Create(Model(4, 4, 32), Layout(2, 2, 2));
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->num_workers(), 8);
  for (int r = 0; r < 8; ++r) EXPECT_EQ(l->Rank(l->Coords(r)), r);
  WorkerCoords c = l->Coords(5);  // (dp 1, pp 0, tp 1)
  EXPECT_EQ(c.dp, 1);
  EXPECT_EQ(c.pp, 0);
  EXPECT_EQ(c.tp, 1);
}

// Every element is pushed by exactly one worker of a replica, except wte
// which the first and the last stage both push when pp > 1; held ranges of a
// split tensor tile it across tp ranks, and their sizes match LocalShape.
TEST(ParallelLayoutTest, PushedRangesCoverEveryElementOnce) {
  for (bool vp : {false, true})
  for (int pp : {1, 2, 3}) {
    for (int tp : {1, 2, 4}) {
      if (vp && tp == 1) continue;
      LayoutConfig config = Layout(1, pp, tp);
      config.set_vocab_parallel(vp);
      auto l = ParallelLayout::Create(Model(3, 4, 32), config);
      ASSERT_TRUE(l.ok()) << l.status();
      int64_t held_total = 0;
      for (int t = 0; t < static_cast<int>(l->tensors().size()); ++t) {
        const TensorSpec& spec = l->tensors()[t];
        std::vector<int> pushes(spec.num_elements(), 0);
        for (int s = 0; s < pp; ++s) {
          std::vector<int> held(spec.num_elements(), 0);
          for (int r = 0; r < tp; ++r) {
            int64_t n = 0;
            for (const ElementRange& e : l->Held(t, s, r)) {
              for (int64_t i = e.begin; i < e.end; ++i) ++held[i];
              n += e.size();
            }
            if (n > 0) {
              int64_t local = 1;
              for (int64_t d : l->LocalShape(t)) local *= d;
              EXPECT_EQ(n, local) << spec.name;
            }
            for (const ElementRange& e : l->Pushed(t, s, r)) {
              for (int64_t i = e.begin; i < e.end; ++i) ++pushes[i];
            }
          }
          const bool uses = !l->Held(t, s, 0).empty();
          const int want = !uses ? 0
                           : l->split(t) == TpSplit::kReplicated ? tp
                                                                 : 1;
          for (int64_t i = 0; i < spec.num_elements(); ++i) {
            ASSERT_EQ(held[i], want) << spec.name << " element " << i;
          }
        }
        const int want = (spec.name == "wte.weight" && pp > 1) ? 2 : 1;
        for (int64_t i = 0; i < spec.num_elements(); ++i) {
          ASSERT_EQ(pushes[i], want) << spec.name << " pp=" << pp
                                     << " tp=" << tp << " element " << i;
        }
      }
      for (int s = 0; s < pp; ++s) {
        for (int r = 0; r < tp; ++r) held_total += l->HeldElements(s, r);
      }
      if (pp == 1 && tp == 1) {
        EXPECT_EQ(held_total, GptNumParameters(Model(3, 4, 32)));
      }
      if (tp > 1) {
        EXPECT_GT(held_total, GptNumParameters(Model(3, 4, 32)));
      }
    }
  }
}

TEST(ParallelLayoutTest, ColumnQkvHoldsWholeHeadsOfQKAndV) {
  auto l = ParallelLayout::Create(Model(1, 4, 8), Layout(1, 1, 2));
  ASSERT_TRUE(l.ok());
  int qkv = -1;
  for (int t = 0; t < static_cast<int>(l->tensors().size()); ++t) {
    if (l->tensors()[t].name == "h.0.attn.c_attn.weight") qkv = t;
  }
  ASSERT_GE(qkv, 0);
  // C = 8, Cl = 4: rank 1 holds rows 4-7, 12-15, 20-23 (8 columns each).
  std::vector<ElementRange> r = l->Held(qkv, 0, 1);
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].begin, 4 * 8);
  EXPECT_EQ(r[0].end, 8 * 8);
  EXPECT_EQ(r[1].begin, 12 * 8);
  EXPECT_EQ(r[2].end, 24 * 8);
}

// Vocab parallel: wte's rows split by tp rank, pushed by every rank.
TEST(ParallelLayoutTest, VocabParallelSplitsWteRows) {
  LayoutConfig config = Layout(1, 2, 4);
  config.set_vocab_parallel(true);
  auto l = ParallelLayout::Create(Model(2, 4, 32, 256), config);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->split(0), TpSplit::kVocabRows);
  EXPECT_EQ(l->LocalShape(0), (std::vector<int64_t>{64, 32}));
  for (int s : {0, 1}) {
    for (int r = 0; r < 4; ++r) {
      const std::vector<ElementRange> held = l->Held(0, s, r);
      ASSERT_EQ(held.size(), 1u);
      EXPECT_EQ(held[0].begin, r * 64 * 32);
      EXPECT_EQ(held[0].end, (r + 1) * 64 * 32);
      EXPECT_EQ(l->Pushed(0, s, r).size(), 1u);
    }
  }
  // wpe stays replicated (tp rank 0 pushes it).
  EXPECT_EQ(l->split(1), TpSplit::kReplicated);
  EXPECT_TRUE(l->Pushed(1, 0, 1).empty());
}

TEST(ParallelLayoutTest, IntersectRanges) {
  std::vector<ElementRange> r = {{0, 4}, {10, 14}, {20, 30}};
  std::vector<ElementRange> x = IntersectRanges(r, 2, 22);
  ASSERT_EQ(x.size(), 3u);
  EXPECT_EQ(x[0].begin, 0);
  EXPECT_EQ(x[0].end, 2);
  EXPECT_EQ(x[1].begin, 8);
  EXPECT_EQ(x[1].end, 12);
  EXPECT_EQ(x[2].begin, 18);
  EXPECT_EQ(x[2].end, 20);
  EXPECT_TRUE(IntersectRanges(r, 4, 10).empty());
}

}  // namespace
}  // namespace lmps
