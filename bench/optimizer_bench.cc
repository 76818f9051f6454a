// The parameter shard's per-step arithmetic against memory bandwidth: the
// gradient norm (ShardMeanAndSumSquares: divide by dp, sum of squares in
// blocks) and the AdamW step (OptimizerStep over the same blocks, as
// ParameterShard::OptimizerStepLocked runs it) over --params fp32
// parameters in chunks of --chunk elements, with 1 thread and with each
// --threads count, against memcpy of the same bytes on one thread measured
// in the same run. Prints per pass ms, GB/s of the bytes it must move (norm:
// read and write the gradient, 8 B per parameter; AdamW: read g, p, m, v and
// write p, m, v, 28 B) and the ratio to memcpy (which reads and writes: 2
// B moved per byte copied).
//
//   bazel run -c opt //bench:optimizer_bench -- --params=62000000 --threads=2
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/types/span.h"
#include "common/threads/thread_pool.h"
#include "proto/lmps.pb.h"
#include "server/optimizer.h"

ABSL_FLAG(int64_t, params, 62000000,
          "parameters of the shard (default: half of GPT-2 small)");
ABSL_FLAG(int64_t, chunk, 1 << 20, "elements per chunk (4 MiB chunks)");
ABSL_FLAG(std::string, threads, "2", "comma-separated thread counts besides 1");
ABSL_FLAG(int, repeats, 5, "timed passes (the median is printed)");

namespace {

template <typename F>
double MedianSeconds(int repeats, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < repeats + 1; ++r) {  // the first pass warms up
    const auto start = std::chrono::steady_clock::now();
    f();
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    if (r > 0) t.push_back(s);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int64_t n = absl::GetFlag(FLAGS_params);
  const int64_t chunk = absl::GetFlag(FLAGS_chunk);
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));
  std::vector<int> counts = {1};
  for (absl::string_view t :
       absl::StrSplit(absl::GetFlag(FLAGS_threads), ',', absl::SkipEmpty())) {
    int k = 0;
    if (!absl::SimpleAtoi(t, &k) || k < 1) {
      std::fprintf(stderr, "optimizer_bench: bad --threads entry '%s'\n",
                   std::string(t).c_str());
      return 2;
    }
    if (k != 1) counts.push_back(k);
  }
  if (n < 1 || chunk < 1) {
    std::fprintf(stderr, "optimizer_bench: --params and --chunk must be >= 1\n");
    return 2;
  }
  std::vector<float> g(n, 1e-3f), p(n, 0.5f), m(n, 0.0f), v(n, 0.0f);
  std::vector<int64_t> sizes;
  for (int64_t b = 0; b < n; b += chunk) sizes.push_back(std::min(chunk, n - b));

  // Baseline: one thread copying the 28 B per parameter AdamW moves (as
  // 14 B read + 14 B written).
  std::vector<char> src(14 * n, 1), dst(14 * n);
  const double copy_s = MedianSeconds(
      repeats, [&] { std::memcpy(dst.data(), src.data(), src.size()); });
  const double copy_gbs = 28.0 * n / copy_s / 1e9;
  std::printf("optimizer_bench: %lld parameters in chunks of %lld; memcpy (1 "
              "thread) moves %.2f GB/s (read + write)\n",
              static_cast<long long>(n), static_cast<long long>(chunk),
              copy_gbs);

  lmps::OptimizerConfig opt;
  opt.set_type(lmps::ADAMW);
  opt.set_lr(1e-3f);
  opt.set_weight_decay(0.1f);
  double norm1 = 0, adam1 = 0;
  for (int threads : counts) {
    std::unique_ptr<lmps::ThreadPool> pool;
    if (threads > 1) pool = std::make_unique<lmps::ThreadPool>(threads);
    std::vector<absl::Span<float>> chunks;
    for (int64_t b = 0, c = 0; b < n; b += sizes[c++]) {
      chunks.push_back(absl::MakeSpan(g.data() + b, sizes[c]));
    }
    volatile double sink = 0;
    const double norm_s = MedianSeconds(repeats, [&] {
      // Divides by 1.0f: the gradient stays the same pass after pass.
      sink = sink + lmps::ShardMeanAndSumSquares(1.0f, chunks, pool.get());
    });
    int64_t step = 0;
    const double adam_s = MedianSeconds(repeats, [&] {
      lmps::ParallelForBlocks(
          pool.get(), sizes, lmps::kNormBlockElements,
          [&](int, int c, int64_t begin, int64_t end) {
            const int64_t at = c * chunk + begin;
            const int64_t len = end - begin;
            std::vector<absl::Span<float>> state = {
                absl::MakeSpan(m.data() + at, len),
                absl::MakeSpan(v.data() + at, len)};
            lmps::OptimizerStep(opt, 1e-3, step, /*decays=*/true, 1.0f,
                                absl::MakeSpan(g.data() + at, len),
                                absl::MakeSpan(p.data() + at, len), state);
          });
      ++step;
    });
    if (threads == 1) {
      norm1 = norm_s;
      adam1 = adam_s;
    }
    const double norm_gbs = 8.0 * n / norm_s / 1e9;
    const double adam_gbs = 28.0 * n / adam_s / 1e9;
    std::printf(
        "threads %d: norm %.1f ms (%.2f GB/s, memcpy ratio %.2f, x%.2f vs 1 "
        "thread); AdamW %.1f ms (%.2f ns/param, %.2f GB/s, memcpy ratio "
        "%.2f, x%.2f vs 1 thread)\n",
        threads, 1e3 * norm_s, norm_gbs, norm_gbs / copy_gbs, norm1 / norm_s,
        1e3 * adam_s, 1e9 * adam_s / n, adam_gbs, adam_gbs / copy_gbs,
        adam1 / adam_s);
  }
  return 0;
}
