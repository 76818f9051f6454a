#include "common/model/balanced_cuts.h"

#include <algorithm>
#include <limits>

namespace lmps {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The reference's update: candidate j for best[p][i] replaces the current
// one only if it is better by more than a relative 1e-9 (rounding), so the
// earliest of equal candidates stays.
void Consider(const std::vector<double>& prev, const std::vector<double>& prefix,
              double extra, int i, int j, double* best, int* arg) {
  if (prev[j] == kInf) return;
  const double v = std::max(prev[j], prefix[i] - prefix[j] + extra);
  if (v < *best - 1e-9 * std::max(1.0, v)) {
    *best = v;
    *arg = j;
  }
}

// Cut points from the table of arguments.
std::vector<int> Backtrack(const std::vector<std::vector<int>>& arg, int n,
                           int parts) {
  std::vector<int> cuts(parts + 1, n);
  for (int p = parts; p >= 1; --p) cuts[p - 1] = arg[p][cuts[p]];
  return cuts;
}

std::vector<double> Prefix(const std::vector<double>& costs) {
  std::vector<double> prefix(costs.size() + 1, 0);
  for (size_t i = 0; i < costs.size(); ++i) prefix[i + 1] = prefix[i] + costs[i];
  return prefix;
}

}  // namespace

std::vector<int> BalancedCutsReference(const std::vector<double>& costs,
                                       const std::vector<double>& extra,
                                       int parts) {
  const int n = static_cast<int>(costs.size());
  const std::vector<double> prefix = Prefix(costs);
  // best[p][i]: the smallest max over the first p parts covering items [0, i).
  std::vector<std::vector<double>> best(parts + 1,
                                        std::vector<double>(n + 1, kInf));
  std::vector<std::vector<int>> arg(parts + 1, std::vector<int>(n + 1, -1));
  best[0][0] = 0;
  for (int p = 1; p <= parts; ++p) {
    for (int i = p; i <= n - (parts - p); ++i) {
      for (int j = p - 1; j < i; ++j) {
        Consider(best[p - 1], prefix, extra[p - 1], i, j, &best[p][i],
                 &arg[p][i]);
      }
    }
  }
  return Backtrack(arg, n, parts);
}

std::vector<int> BalancedCuts(const std::vector<double>& costs,
                              const std::vector<double>& extra, int parts) {
  const int n = static_cast<int>(costs.size());
  for (double c : costs) {
    if (c != costs[0]) return BalancedCutsReference(costs, extra, parts);
  }
  const std::vector<double> prefix = Prefix(costs);
  std::vector<std::vector<double>> best(parts + 1,
                                        std::vector<double>(n + 1, kInf));
  std::vector<std::vector<int>> arg(parts + 1, std::vector<int>(n + 1, -1));
  best[0][0] = 0;
  for (int p = 1; p <= parts; ++p) {
    const std::vector<double>& prev = best[p - 1];
    for (int i = p; i <= n - (parts - p); ++i) {
      // The first j in [p - 1, i) where the first p - 1 parts cost at least
      // the last one (prev[j] is non-decreasing, infinite where [0, j)
      // cannot hold p - 1 parts; the last part's sum decreases in j).
      int lo = p - 1, hi = i;
      while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        if (prev[mid] >= prefix[i] - prefix[mid] + extra[p - 1]) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      // Left of the crossing the candidates fall, right of it they rise: the
      // reference's choice is next to it. Two on each side absorb rounding.
      for (int j = std::max(p - 1, lo - 2); j <= std::min(i - 1, lo + 1); ++j) {
        Consider(prev, prefix, extra[p - 1], i, j, &best[p][i], &arg[p][i]);
      }
    }
  }
  return Backtrack(arg, n, parts);
}

}  // namespace lmps
