// BalancedCuts: the contiguous split of a pipeline's layers into stages
// that minimises the most expensive stage (ParallelLayout's stage cuts).
//
// Given costs[0..n) (one per layer, non-negative), extra[0..parts) (added to
// part p: the embeddings to the first stage, the head to the last) and
// 1 <= parts <= n, it returns cut points c[0] = 0 < c[1] < ... < c[parts] =
// n (part p holds layers [c[p], c[p+1])) whose largest part sum
//   max_p (costs[c[p]] + ... + costs[c[p+1] - 1] + extra[p])
// is the smallest possible. Ties prefer the earliest cut, so the result is
// deterministic.
//
// BalancedCutsReference is the textbook dynamic program, O(parts * n^2):
//   best[p][i] = min over j of max(best[p-1][j], sum(costs[j..i)) + extra[p-1])
// BalancedCuts computes the same table in O(parts * n * log n) when the
// costs are equal (what ParallelLayout passes: every block of a GPT has the
// same cost): then best[p-1][j] is non-decreasing in j and the last part's
// sum decreasing, so the minimum over j lies where the two cross, found by
// binary search; the few candidates around it are tried in the reference's
// order and with its tie rule. With unequal costs it falls back to the
// reference. balanced_cuts_test checks both agree.
//
// Thread-safe: pure functions.
#ifndef LMPS_COMMON_MODEL_BALANCED_CUTS_H_
#define LMPS_COMMON_MODEL_BALANCED_CUTS_H_

#include <vector>

namespace lmps {

std::vector<int> BalancedCuts(const std::vector<double>& costs,
                              const std::vector<double>& extra, int parts);

std::vector<int> BalancedCutsReference(const std::vector<double>& costs,
                                       const std::vector<double>& extra,
                                       int parts);

}  // namespace lmps

#endif  // LMPS_COMMON_MODEL_BALANCED_CUTS_H_
