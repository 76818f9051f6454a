// gpt_cuda_bench: throughput and MFU of a GPT-2 training step (ZeroGrad,
// Forward with the loss, Backward; no optimiser, which lmps runs on the
// parameter servers) on the CUDA backend.
//
//   bazel run //bench:gpt_cuda_bench -- --batch=8 --matmul=bf16
//
// Default model: GPT-2 small (12 layers, C=768, 12 heads, T=1024,
// V=50257). FLOPs per step, counted as in the PaLM paper (appendix B) and
// llm.c: 6 * N * tokens for the weight products (forward 2N, backward 4N
// per token; N = all parameters, the tied embedding included as the LM
// head) plus 12 * L * C * T * tokens for the attention products
// (QK^T and AV, forward and backward, over the full T x T square). MFU is
// achieved FLOP/s over --peak_flops, by default 989e12, the dense bf16
// tensor-core peak of an H100 SXM, whatever --matmul is: with --matmul=bf16
// the products run on bf16 tensor cores (that peak); with --matmul=tf32
// they run in TF32, whose dense peak is half of that (494.7e12), so 50% MFU
// is its ceiling.
//
// Exits 0 with a message when there is no CUDA device. Compare with
// torch_gpt_bench.py (the same model in PyTorch eager) on the same GPU.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "common/model/model_spec.h"
#include "proto/lmps.pb.h"
#include "worker/backend/cuda/cuda_backend.h"
#include "worker/model/gpt.h"

ABSL_FLAG(int, batch, 8, "micro-batch size B");
ABSL_FLAG(int, seq, 1024, "sequence length T (<= block_size)");
ABSL_FLAG(int, layers, 12, "n_layer");
ABSL_FLAG(int, embd, 768, "n_embd");
ABSL_FLAG(int, heads, 12, "n_head");
ABSL_FLAG(int, vocab, 50257, "vocab_size (50304 = padded to 128)");
ABSL_FLAG(int, block_size, 1024, "block_size (context length)");
ABSL_FLAG(int, warmup, 3, "untimed steps");
ABSL_FLAG(int, steps, 10, "timed steps");
ABSL_FLAG(int, device, 0, "CUDA device");
ABSL_FLAG(std::string, matmul, "bf16",
          "matrix-product input precision: tf32 or bf16 (CudaBackendOptions)");
ABSL_FLAG(double, peak_flops, 989e12,
          "peak FLOP/s for MFU (H100 SXM dense bf16)");

namespace lmps {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int Main() {
  absl::StatusOr<int> count = CudaBackend::DeviceCount();
  if (!count.ok()) {
    std::printf("gpt_cuda_bench: %s; skipping\n",
                count.status().ToString().c_str());
    return 0;
  }
  absl::StatusOr<MatmulPrecision> precision =
      ParseMatmulPrecision(absl::GetFlag(FLAGS_matmul));
  if (!precision.ok()) {
    std::fprintf(stderr, "gpt_cuda_bench: --matmul: %s\n",
                 precision.status().ToString().c_str());
    return 1;
  }
  absl::StatusOr<std::unique_ptr<CudaBackend>> backend = CudaBackend::Create(
      {.device = absl::GetFlag(FLAGS_device), .matmul_precision = *precision});
  if (!backend.ok()) {
    std::fprintf(stderr, "gpt_cuda_bench: %s\n",
                 backend.status().ToString().c_str());
    return 1;
  }
  ModelConfig config;
  config.set_n_layer(absl::GetFlag(FLAGS_layers));
  config.set_n_embd(absl::GetFlag(FLAGS_embd));
  config.set_n_head(absl::GetFlag(FLAGS_heads));
  config.set_vocab_size(absl::GetFlag(FLAGS_vocab));
  config.set_block_size(absl::GetFlag(FLAGS_block_size));
  const int B = absl::GetFlag(FLAGS_batch), T = absl::GetFlag(FLAGS_seq);
  absl::StatusOr<std::unique_ptr<GptModel>> model =
      GptModel::Create(config, backend->get(), B, T);
  if (!model.ok()) {
    std::fprintf(stderr, "gpt_cuda_bench: %s\n",
                 model.status().ToString().c_str());
    return 1;
  }
  GptModel& m = **model;
  if (absl::Status s = m.InitParameters(1337); !s.ok()) {
    std::fprintf(stderr, "gpt_cuda_bench: %s\n", s.ToString().c_str());
    return 1;
  }
  const size_t n_tokens = static_cast<size_t>(B) * T;
  std::mt19937 rng(42);
  std::uniform_int_distribution<int32_t> token(0, config.vocab_size() - 1);
  std::vector<int32_t> tokens(n_tokens), targets(n_tokens);
  for (size_t i = 0; i < n_tokens; ++i) {
    tokens[i] = token(rng);
    targets[i] = token(rng);
  }

  const int64_t N = m.num_parameters();
  const double L = config.n_layer(), C = config.n_embd();
  const double flops_per_token = 6.0 * N + 12.0 * L * C * T;
  const double flops_per_step = flops_per_token * n_tokens;
  std::printf("device: %s\n", (*backend)->device_description().c_str());
  std::printf("matmul precision: %s\n",
              std::string(MatmulPrecisionName(*precision)).c_str());
  std::printf(
      "model: L=%d C=%d NH=%d V=%d, %lld parameters; B=%d T=%d (%zu tokens "
      "per step)\n",
      config.n_layer(), config.n_embd(), config.n_head(), config.vocab_size(),
      static_cast<long long>(N), B, T, n_tokens);
  std::printf("FLOPs per step: %.3f TFLOP (%.3g per token)\n",
              flops_per_step / 1e12, flops_per_token);

  const int warmup = absl::GetFlag(FLAGS_warmup);
  const int steps = absl::GetFlag(FLAGS_steps);
  std::vector<double> fwd_s, bwd_s, step_s;
  float loss = 0.0f;
  for (int i = 0; i < warmup + steps; ++i) {
    const Clock::time_point t0 = Clock::now();
    m.ZeroGrad();
    // Forward returns after copying the losses to the host (synchronous).
    absl::StatusOr<float> l = m.Forward(tokens.data(), targets.data(), B, T);
    const Clock::time_point t1 = Clock::now();
    absl::Status s = l.ok() ? m.Backward() : l.status();  // synchronises
    const Clock::time_point t2 = Clock::now();
    if (!s.ok()) {
      std::fprintf(stderr, "gpt_cuda_bench: step %d: %s\n", i,
                   s.ToString().c_str());
      return 1;
    }
    loss = *l;
    if (i >= warmup) {
      fwd_s.push_back(Seconds(t0, t1));
      bwd_s.push_back(Seconds(t1, t2));
      step_s.push_back(Seconds(t0, t2));
    }
  }
  if (steps <= 0) return 0;
  auto mean = [](const std::vector<double>& v) {
    double s = 0.0;
    for (double x : v) s += x;
    return s / v.size();
  };
  const double step = mean(step_s);
  const double best = *std::min_element(step_s.begin(), step_s.end());
  const double achieved = flops_per_step / step;
  std::printf("loss: %.4f (ln V = %.4f)\n", loss,
              std::log(static_cast<double>(config.vocab_size())));
  std::printf(
      "step: %.2f ms mean, %.2f ms best (forward %.2f ms, backward %.2f ms) "
      "over %d steps\n",
      step * 1e3, best * 1e3, mean(fwd_s) * 1e3, mean(bwd_s) * 1e3, steps);
  std::printf("tokens/s: %.0f\n", n_tokens / step);
  std::printf("achieved: %.1f TFLOP/s; MFU: %.1f%% of %.4g FLOP/s\n",
              achieved / 1e12,
              100.0 * achieved / absl::GetFlag(FLAGS_peak_flops),
              absl::GetFlag(FLAGS_peak_flops));
  std::printf("cuBLASLt fallbacks: %lld\n",
              static_cast<long long>((*backend)->gemm_fallbacks()));
  if (*precision == MatmulPrecision::kBf16) {
    // Once per parameter version: the number of weight tensors, since the
    // benchmark never changes the parameters after the first step.
    std::printf("bf16 weight conversions: %lld\n",
                static_cast<long long>((*backend)->bf16_weight_conversions()));
  }
  return 0;
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return lmps::Main();
}
