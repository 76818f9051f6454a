// ParallelLayout: where every parameter element lives in a dp x pp x tp
// layout -- which pipeline stage computes which transformer blocks, and
// which element ranges of each tensor a worker (pp_rank, tp_rank) holds and
// pushes. A pure function of (ModelConfig, LayoutConfig): the scheduler, the
// parameter-server shards and the workers all derive the same answer.
//
// Worker ranks: rank = (dp_rank * pp + pp_rank) * tp + tp_rank (tp fastest,
// so a tensor-parallel group is consecutive ranks).
//
// Pipeline stages: the n_layer blocks are cut into pp contiguous, non-empty
// ranges minimising the largest stage cost, where a block costs its
// per-token forward FLOPs (24 C^2 + 4 T C) and the last stage also pays for
// the LM head and cross-entropy (2 V C). The embeddings (wte, wpe) sit on the
// first stage; the final LayerNorm and the LM head, tied to wte, on the last.
// wte is therefore held by stage 0 and stage pp - 1; both push its gradient
// and the shards sum the two.
//
// Tensor parallel (Megatron-LM, Shoeybi et al. 2019), tp ranks r in [0, tp),
// C = n_embd, Cl = C / tp, F = 4C, Fl = F / tp; matrices are out x in:
//   attn.c_attn (3C, C)  column-parallel: Y = X A^T with A split along its
//                        output rows. q, k and v are split alike so every
//                        rank holds whole heads (n_head / tp of them): rank
//                        r holds rows [j C + r Cl, j C + (r+1) Cl) for
//                        j = 0 (q), 1 (k), 2 (v) -- a (3Cl, C) matrix; the
//                        bias (3C) the same ranges.
//   attn.c_proj (C, C)   row-parallel: Y = sum_r X_r A_r^T with A split along
//                        its input columns: rank r holds columns
//                        [r Cl, (r+1) Cl) of every row -- a (C, Cl) matrix --
//                        and X_r is its heads' output; the partial products
//                        are all-reduced. Its bias is replicated.
//   mlp.c_fc (F, C)      column-parallel: rows [r Fl, (r+1) Fl) -- (Fl, C);
//                        bias (F) the same range.
//   mlp.c_proj (C, F)    row-parallel: columns [r Fl, (r+1) Fl) of every
//                        row -- (C, Fl); bias replicated.
//   LayerNorms, row-parallel biases, wte, wpe: replicated on every tp rank
//   (each rank computes them on identical inputs, so their gradients are
//   identical on every rank); only tp rank 0 pushes them. With sequence
//   parallelism the LayerNorms see 1/tp of the tokens, and the workers
//   all-reduce their gradients before the push (worker/model/stage_model.h),
//   so the same holds.
//   wte (V, C) with layout.vocab_parallel: split by rows (kVocabRows), rank
//                        r holds rows [r V/tp, (r+1) V/tp) -- (V/tp, C) --
//                        and pushes them (both stages of the tied
//                        embedding push the same rows; the shards sum).
// A worker's local copy of a tensor is the concatenation of its held ranges
// in element order, which is exactly the local matrix shapes above.
//
// Thread-safety: immutable after Create; safe to share.
#ifndef LMPS_COMMON_MODEL_PARALLEL_LAYOUT_H_
#define LMPS_COMMON_MODEL_PARALLEL_LAYOUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/model_spec.h"
#include "proto/lmps.pb.h"

namespace lmps {

struct StageRange {
  int layer_begin = 0;  // first transformer block of the stage
  int layer_end = 0;    // one past the last
  bool has_embedding = false;
  bool has_head = false;
};

struct ElementRange {
  int64_t begin = 0;  // first element (inclusive)
  int64_t end = 0;    // one past the last
  int64_t size() const { return end - begin; }
};

enum class TpSplit {
  kReplicated,  // every tp rank holds all of it; tp rank 0 pushes
  kColumnQkv,   // attn.c_attn: q, k and v blocks split by output rows
  kColumn,      // mlp.c_fc: output rows
  kRow,         // c_proj weights: input columns
  kVocabRows,   // wte with vocab_parallel: rows (vocabulary entries)
};

struct WorkerCoords {
  int dp = 0, pp = 0, tp = 0;
};

class ParallelLayout {
 public:
  // InvalidArgumentError, saying what would be valid, when the layout does
  // not fit the model: n_head not divisible by tp, more stages than layers,
  // dp/pp/tp outside [1, 1024] or tp > 64; sequence_parallel or
  // vocab_parallel with tp = 1, block_size (sequence_parallel) or
  // vocab_size (vocab_parallel) not divisible by tp.
  static absl::StatusOr<ParallelLayout> Create(const ModelConfig& model,
                                               const LayoutConfig& layout);

  int dp() const { return dp_; }
  int pp() const { return pp_; }
  int tp() const { return tp_; }
  bool sequence_parallel() const { return sequence_parallel_; }
  bool vocab_parallel() const { return vocab_parallel_; }
  int num_workers() const { return dp_ * pp_ * tp_; }
  WorkerCoords Coords(int rank) const;
  int Rank(const WorkerCoords& c) const;

  const StageRange& stage(int pp_rank) const { return stages_[pp_rank]; }
  const std::vector<StageRange>& stages() const { return stages_; }
  // Per-token forward FLOPs of each stage (for logs and the README).
  const std::vector<double>& stage_costs() const { return stage_costs_; }

  // The model's tensors (GptTensorSpecs order) and their split.
  const std::vector<TensorSpec>& tensors() const { return tensors_; }
  TpSplit split(int tensor) const { return splits_[tensor]; }
  // Stages that compute with `tensor` (two for wte when pp > 1).
  std::vector<int> StagesOf(int tensor) const;

  // The element ranges of tensor `tensor` worker (pp_rank, tp_rank) holds:
  // what it pulls and computes with. Sorted, disjoint; empty when its stage
  // does not use the tensor.
  std::vector<ElementRange> Held(int tensor, int pp_rank, int tp_rank) const;
  // What it pushes: Held for split tensors, Held of tp rank 0 only for
  // replicated ones (empty for other tp ranks).
  std::vector<ElementRange> Pushed(int tensor, int pp_rank,
                                   int tp_rank) const;
  // The local shape of Held(tensor, ...) (e.g. (3C/tp, C) for c_attn).
  std::vector<int64_t> LocalShape(int tensor) const;
  // Floats a worker holds in all (its local buffer size).
  int64_t HeldElements(int pp_rank, int tp_rank) const;

 private:
  ParallelLayout() = default;
  bool StageUses(int tensor, int pp_rank) const;

  int dp_ = 1, pp_ = 1, tp_ = 1;
  bool sequence_parallel_ = false, vocab_parallel_ = false;
  ModelConfig model_;
  std::vector<StageRange> stages_;
  std::vector<double> stage_costs_;
  std::vector<TensorSpec> tensors_;
  std::vector<TpSplit> splits_;
  std::vector<int> layer_of_;  // block of each tensor, -1 outside blocks
};

// Intersects sorted ranges with [begin, end) and shifts them by -begin (the
// part of a chunk [begin, end) of the tensor, in chunk offsets).
std::vector<ElementRange> IntersectRanges(
    const std::vector<ElementRange>& ranges, int64_t begin, int64_t end);

}  // namespace lmps

#endif  // LMPS_COMMON_MODEL_PARALLEL_LAYOUT_H_
