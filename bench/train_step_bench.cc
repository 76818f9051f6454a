// Training-step throughput of GptModel on the CPU backend: tokens/s of
// forward + backward + a plain SGD update (params -= lr * grads) on a fixed
// random batch. bench/torch_train_step.py runs the same step in PyTorch;
// bench/train_step_vs_torch.sh compares the two.
//
// Output: a config line, per-phase milliseconds per step, and
//   lmps tokens/s: <value>
// where <value> is B*T over the MEDIAN step time: robust against other
// processes stealing the cores for part of the run (the mean is printed
// too). Then the step's matrix-product rate against OpenBLAS's peak,
// measured in the same run with the same threads (--peak_n cubed sgemm,
// best of 3):
//   lmps matmul GFLOP/s: X; OpenBLAS sgemm peak: Y GFLOP/s
//   lmps / OpenBLAS peak ratio: X/Y
//   OpenBLAS-peak tokens/s: Z   (B*T per step at that peak: a ceiling)
// The step's matmul FLOPs count every matrix product of forward and
// backward (backward = 2 x forward): per block 2*B*T*12*C^2 forward for
// the four weight products and 2 * 2*B*T^2*C for Q K^T and att V (the full
// T x T, causal masking not subtracted), plus 2*B*T*V*C for the tied head.
// The ratio bounds what any implementation of the same model can gain per
// core: PyTorch at the same tokens/s would be at the same fraction.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "common/model/rng.h"
#include "proto/lmps.pb.h"
#include "worker/backend/cpu_backend.h"
#include "worker/model/gpt.h"

ABSL_FLAG(int, n_layer, 4, "transformer blocks");
ABSL_FLAG(int, n_head, 4, "attention heads");
ABSL_FLAG(int, n_embd, 256, "model width");
ABSL_FLAG(int, block_size, 128, "sequence length T");
ABSL_FLAG(int, vocab_size, 256, "vocabulary size");
ABSL_FLAG(int, batch, 8, "sequences per step B");
ABSL_FLAG(int, threads, 2, "CPU threads (OpenMP and OpenBLAS)");
ABSL_FLAG(int, steps, 20, "timed steps");
ABSL_FLAG(int, warmup, 3, "untimed steps before timing");
ABSL_FLAG(float, lr, 1e-3f, "SGD learning rate");
ABSL_FLAG(int, peak_n, 1536,
          "size of the square sgemm measuring OpenBLAS's peak (0: skip)");

namespace lmps {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// FLOP/s of OpenBLAS's sgemm on n x n x n (best of 3 after a warm-up), on
// the threads CpuBackend configured.
double SgemmPeak(int n) {
  std::vector<float> a(static_cast<size_t>(n) * n, 0.5f), b = a, c = a;
  double best = 0;
  for (int rep = 0; rep < 4; ++rep) {
    const Clock::time_point t0 = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f,
                a.data(), n, b.data(), n, 0.0f, c.data(), n);
    const double s = Seconds(t0, Clock::now());
    if (rep > 0) best = std::max(best, 2.0 * n * n * n / s);
  }
  return best;
}

absl::Status Run() {
  ModelConfig config;
  config.set_n_layer(absl::GetFlag(FLAGS_n_layer));
  config.set_n_head(absl::GetFlag(FLAGS_n_head));
  config.set_n_embd(absl::GetFlag(FLAGS_n_embd));
  config.set_block_size(absl::GetFlag(FLAGS_block_size));
  config.set_vocab_size(absl::GetFlag(FLAGS_vocab_size));
  const int B = absl::GetFlag(FLAGS_batch), T = config.block_size();
  const int steps = absl::GetFlag(FLAGS_steps);
  const int warmup = absl::GetFlag(FLAGS_warmup);
  const float lr = absl::GetFlag(FLAGS_lr);
  if (steps < 1 || warmup < 0) {
    return absl::InvalidArgumentError("--steps must be >= 1, --warmup >= 0");
  }

  CpuBackendOptions options;
  options.num_threads = absl::GetFlag(FLAGS_threads);
  absl::StatusOr<std::unique_ptr<CpuBackend>> backend =
      CpuBackend::Create(options);
  if (!backend.ok()) return backend.status();
  absl::StatusOr<std::unique_ptr<GptModel>> model =
      GptModel::Create(config, backend->get(), B, T);
  if (!model.ok()) return model.status();
  GptModel& m = **model;
  Backend& be = **backend;
  if (absl::Status s = m.InitParameters(1337); !s.ok()) return s;

  // Random tokens; targets are the next token (as in training).
  std::vector<int32_t> data(static_cast<size_t>(B) * T + 1);
  const uint64_t key = StableKey(1, "bench.tokens");
  for (size_t i = 0; i < data.size(); ++i) {
    data[i] = static_cast<int32_t>(RandomBits(key, i) % config.vocab_size());
  }
  const int32_t* tokens = data.data();
  const int32_t* targets = data.data() + 1;

  std::printf(
      "lmps config: n_layer=%d n_head=%d n_embd=%d block_size=%d vocab=%d "
      "batch=%d threads=%d params=%lld\n",
      config.n_layer(), config.n_head(), config.n_embd(), T,
      config.vocab_size(), B, (*backend)->num_threads(),
      static_cast<long long>(m.num_parameters()));

  double t_fwd = 0, t_bwd = 0, t_upd = 0;
  std::vector<double> step_seconds;
  float first_loss = 0, last_loss = 0;
  Clock::time_point start;
  for (int step = 0; step < warmup + steps; ++step) {
    if (step == warmup) {
      t_fwd = t_bwd = t_upd = 0;
      start = Clock::now();
    }
    const Clock::time_point t0 = Clock::now();
    m.ZeroGrad();
    absl::StatusOr<float> loss = m.Forward(tokens, targets, B, T);
    if (!loss.ok()) return loss.status();
    const Clock::time_point t1 = Clock::now();
    if (absl::Status s = m.Backward(1.0f); !s.ok()) return s;
    const Clock::time_point t2 = Clock::now();
    be.Axpy(m.params(), -lr, m.grads(), m.num_parameters());
    if (absl::Status s = be.Synchronize(); !s.ok()) return s;
    const Clock::time_point t3 = Clock::now();
    t_fwd += Seconds(t0, t1);
    t_bwd += Seconds(t1, t2);
    t_upd += Seconds(t2, t3);
    if (step >= warmup) step_seconds.push_back(Seconds(t0, t3));
    if (step == 0) first_loss = *loss;
    last_loss = *loss;
  }
  const double total = Seconds(start, Clock::now());
  std::printf("lmps loss: first %.4f last %.4f\n", first_loss, last_loss);
  std::printf("lmps ms/step: total %.2f (forward+zero_grad %.2f, backward %.2f, "
              "update %.2f)\n",
              1e3 * total / steps, 1e3 * t_fwd / steps, 1e3 * t_bwd / steps,
              1e3 * t_upd / steps);
  std::sort(step_seconds.begin(), step_seconds.end());
  const double median = step_seconds[step_seconds.size() / 2];
  std::printf("lmps mean tokens/s: %.1f\n",
              static_cast<double>(B) * T * steps / total);
  std::printf("lmps tokens/s: %.1f\n", static_cast<double>(B) * T / median);
  const int peak_n = absl::GetFlag(FLAGS_peak_n);
  if (peak_n > 0) {
    const double bt = static_cast<double>(B) * T, c = config.n_embd();
    const double forward =
        config.n_layer() * (2 * bt * 12 * c * c + 2 * 2 * bt * T * c) +
        2 * bt * config.vocab_size() * c;
    const double rate = 3 * forward / median;
    const double peak = SgemmPeak(peak_n);
    std::printf("lmps matmul GFLOP/s: %.1f; OpenBLAS sgemm peak: %.1f GFLOP/s "
                "(%d^3, %d threads)\n",
                rate / 1e9, peak / 1e9, peak_n, (*backend)->num_threads());
    std::printf("lmps / OpenBLAS peak ratio: %.2f\n", rate / peak);
    // The ceiling: this step with every product at the sgemm peak and
    // nothing else costing time.
    std::printf("OpenBLAS-peak tokens/s: %.1f\n", bt * peak / (3 * forward));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::Status s = lmps::Run();
  if (!s.ok()) {
    std::fprintf(stderr, "train_step_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
