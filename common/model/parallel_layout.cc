#include "common/model/parallel_layout.h"

#include <algorithm>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model/balanced_cuts.h"

namespace lmps {
namespace {

// Block index of "h.{l}.…", or -1.
int LayerOf(const std::string& name) {
  if (!absl::StartsWith(name, "h.")) return -1;
  const size_t dot = name.find('.', 2);
  int l = -1;
  if (dot == std::string::npos || !absl::SimpleAtoi(name.substr(2, dot - 2), &l)) {
    return -1;
  }
  return l;
}

TpSplit SplitOf(const std::string& name) {
  if (absl::EndsWith(name, "attn.c_attn.weight") ||
      absl::EndsWith(name, "attn.c_attn.bias")) {
    return TpSplit::kColumnQkv;
  }
  if (absl::EndsWith(name, "mlp.c_fc.weight") ||
      absl::EndsWith(name, "mlp.c_fc.bias")) {
    return TpSplit::kColumn;
  }
  if (absl::EndsWith(name, "attn.c_proj.weight") ||
      absl::EndsWith(name, "mlp.c_proj.weight")) {
    return TpSplit::kRow;
  }
  return TpSplit::kReplicated;
}

}  // namespace

absl::StatusOr<ParallelLayout> ParallelLayout::Create(
    const ModelConfig& model, const LayoutConfig& layout) {
  if (absl::Status s = ValidateModelConfig(model); !s.ok()) return s;
  const int dp = layout.dp() == 0 ? 1 : layout.dp();
  const int pp = layout.pp() == 0 ? 1 : layout.pp();
  const int tp = layout.tp() == 0 ? 1 : layout.tp();
  if (dp < 1 || pp < 1 || tp < 1 || dp > 1024 || pp > 1024 || tp > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout: dp and pp must be in [1, 1024] and tp in [1, 64] (got dp=",
        dp, " pp=", pp, " tp=", tp, ")"));
  }
  if (pp > model.n_layer()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout: pp=", pp, " pipeline stages but the model has only ",
        model.n_layer(), " layers; valid: pp in [1, ", model.n_layer(),
        "] (every stage needs at least one layer)"));
  }
  if (model.n_head() % tp != 0) {
    std::vector<int> valid;
    for (int t = 1; t <= std::min(64, model.n_head()); ++t) {
      if (model.n_head() % t == 0) valid.push_back(t);
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "layout: tp=", tp, " does not divide n_head=", model.n_head(),
        " (every tensor-parallel rank holds whole attention heads); valid tp: ",
        absl::StrJoin(valid, ", ")));
  }
  if ((layout.sequence_parallel() || layout.vocab_parallel()) && tp == 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout: ",
        layout.sequence_parallel() ? "sequence_parallel" : "vocab_parallel",
        " needs tensor parallelism (tp > 1), got tp=1"));
  }
  if (layout.sequence_parallel() && model.block_size() % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layout: sequence_parallel splits the sequence over the tp ranks, but "
        "the sequence length block_size=", model.block_size(),
        " is not divisible by tp=", tp,
        "; use a block_size that is a multiple of ", tp));
  }
  if (layout.vocab_parallel() && model.vocab_size() % tp != 0) {
    const int padded = (model.vocab_size() + tp - 1) / tp * tp;
    return absl::InvalidArgumentError(absl::StrCat(
        "layout: vocab_parallel splits wte's rows over the tp ranks, but "
        "vocab_size=", model.vocab_size(), " is not divisible by tp=", tp,
        "; pad the vocabulary, e.g. vocab_size: ", padded));
  }
  ParallelLayout l;
  l.sequence_parallel_ = layout.sequence_parallel();
  l.vocab_parallel_ = layout.vocab_parallel();
  l.dp_ = dp;
  l.pp_ = pp;
  l.tp_ = tp;
  l.model_ = model;
  l.tensors_ = GptTensorSpecs(model);
  for (const TensorSpec& t : l.tensors_) {
    l.splits_.push_back(t.name == "wte.weight" && l.vocab_parallel_
                            ? TpSplit::kVocabRows
                            : SplitOf(t.name));
    l.layer_of_.push_back(LayerOf(t.name));
  }
  const double C = model.n_embd(), T = model.block_size(),
               V = model.vocab_size();
  std::vector<double> costs(model.n_layer(), 24 * C * C + 4 * T * C);
  std::vector<double> extra(pp, 0);
  extra[pp - 1] += 2 * V * C;
  const std::vector<int> cuts = BalancedCuts(costs, extra, pp);
  for (int s = 0; s < pp; ++s) {
    StageRange r;
    r.layer_begin = cuts[s];
    r.layer_end = cuts[s + 1];
    r.has_embedding = s == 0;
    r.has_head = s == pp - 1;
    l.stages_.push_back(r);
    l.stage_costs_.push_back((r.layer_end - r.layer_begin) * costs[0] +
                             extra[s]);
  }
  return l;
}

WorkerCoords ParallelLayout::Coords(int rank) const {
  WorkerCoords c;
  c.tp = rank % tp_;
  c.pp = (rank / tp_) % pp_;
  c.dp = rank / (tp_ * pp_);
  return c;
}

int ParallelLayout::Rank(const WorkerCoords& c) const {
  return (c.dp * pp_ + c.pp) * tp_ + c.tp;
}

bool ParallelLayout::StageUses(int tensor, int pp_rank) const {
  const StageRange& s = stages_[pp_rank];
  const int layer = layer_of_[tensor];
  if (layer >= 0) return layer >= s.layer_begin && layer < s.layer_end;
  const std::string& name = tensors_[tensor].name;
  if (name == "wte.weight") return s.has_embedding || s.has_head;
  if (name == "wpe.weight") return s.has_embedding;
  return s.has_head;  // ln_f
}

std::vector<int> ParallelLayout::StagesOf(int tensor) const {
  std::vector<int> out;
  for (int s = 0; s < pp_; ++s) {
    if (StageUses(tensor, s)) out.push_back(s);
  }
  return out;
}

std::vector<ElementRange> ParallelLayout::Held(int tensor, int pp_rank,
                                               int tp_rank) const {
  std::vector<ElementRange> out;
  if (tensor < 0 || tensor >= static_cast<int>(tensors_.size()) ||
      pp_rank < 0 || pp_rank >= pp_ || tp_rank < 0 || tp_rank >= tp_ ||
      !StageUses(tensor, pp_rank)) {
    return out;
  }
  const TensorSpec& t = tensors_[tensor];
  const int64_t r = tp_rank;
  const int64_t C = model_.n_embd();
  const int64_t cols = t.shape.size() == 2 ? t.shape[1] : 1;
  switch (splits_[tensor]) {
    case TpSplit::kReplicated:
      out.push_back({0, t.num_elements()});
      break;
    case TpSplit::kColumnQkv: {
      const int64_t cl = C / tp_;
      for (int64_t j = 0; j < 3; ++j) {
        out.push_back({(j * C + r * cl) * cols, (j * C + (r + 1) * cl) * cols});
      }
      break;
    }
    case TpSplit::kVocabRows:
    case TpSplit::kColumn: {
      const int64_t rows = t.shape[0] / tp_;
      out.push_back({r * rows * cols, (r + 1) * rows * cols});
      break;
    }
    case TpSplit::kRow: {
      const int64_t rows = t.shape[0], w = cols / tp_;
      out.reserve(rows);
      for (int64_t i = 0; i < rows; ++i) {
        out.push_back({i * cols + r * w, i * cols + (r + 1) * w});
      }
      break;
    }
  }
  return out;
}

std::vector<ElementRange> ParallelLayout::Pushed(int tensor, int pp_rank,
                                                 int tp_rank) const {
  if (tensor >= 0 && tensor < static_cast<int>(splits_.size()) &&
      splits_[tensor] == TpSplit::kReplicated && tp_rank != 0) {
    return {};
  }
  return Held(tensor, pp_rank, tp_rank);
}

std::vector<int64_t> ParallelLayout::LocalShape(int tensor) const {
  std::vector<int64_t> shape = tensors_[tensor].shape;
  switch (splits_[tensor]) {
    case TpSplit::kReplicated:
      break;
    case TpSplit::kColumnQkv:
    case TpSplit::kColumn:
    case TpSplit::kVocabRows:
      shape[0] /= tp_;
      break;
    case TpSplit::kRow:
      shape[1] /= tp_;
      break;
  }
  return shape;
}

int64_t ParallelLayout::HeldElements(int pp_rank, int tp_rank) const {
  int64_t n = 0;
  for (int t = 0; t < static_cast<int>(tensors_.size()); ++t) {
    for (const ElementRange& r : Held(t, pp_rank, tp_rank)) n += r.size();
  }
  return n;
}

std::vector<ElementRange> IntersectRanges(
    const std::vector<ElementRange>& ranges, int64_t begin, int64_t end) {
  std::vector<ElementRange> out;
  auto it = std::upper_bound(
      ranges.begin(), ranges.end(), begin,
      [](int64_t v, const ElementRange& r) { return v < r.end; });
  for (; it != ranges.end() && it->begin < end; ++it) {
    const int64_t b = std::max(it->begin, begin), e = std::min(it->end, end);
    if (b < e) out.push_back({b - begin, e - begin});
  }
  return out;
}

}  // namespace lmps
