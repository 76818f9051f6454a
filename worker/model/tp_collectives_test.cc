// Finite-difference checks of the tensor-parallel collectives' backward
// passes (tp_collectives.h): sequence parallelism's token gather/scatter and
// the vocabulary-parallel embedding and cross-entropy. The tp ranks run as
// threads joined by an in-process TpComm; each check perturbs one input
// element of one rank, reruns the forward on every rank and compares the
// central difference of a scalar objective with the backward pass.
#include "worker/model/tp_collectives.h"

#include <cmath>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "worker/backend/cpu_backend.h"
#include "worker/backend/test_util.h"
#include "worker/testing/in_process_tp_comm.h"

namespace lmps {
namespace {

using ::lmps::testing::RandomTokens;
using ::lmps::testing::RandomVector;

using Tensors = std::vector<std::vector<float>>;  // [rank]

// Runs fn(rank, comm, backend) on `tp` threads; every status must be OK.
void RunRanks(int tp,
              const std::function<absl::Status(int, TpComm&, Backend&)>& fn) {
  InProcessTpGroup group(tp);
  std::vector<absl::Status> st(tp);
  std::vector<std::thread> threads;
  for (int r = 0; r < tp; ++r) {
    threads.emplace_back([&, r] {
      InProcessTpComm comm(&group, tp, r);
      auto be = CpuBackend::Create({.num_threads = 1});
      st[r] = be.ok() ? fn(r, comm, **be) : be.status();
      if (!st[r].ok()) group.Abort();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < tp; ++r) ASSERT_TRUE(st[r].ok()) << r << ": " << st[r];
}

// Backend buffer initialised from host (CPU backend: freed at exit of fn).
struct Buf {
  Backend& be;
  float* p = nullptr;
  Buf(Backend& b, const std::vector<float>& host) : be(b) {
    p = *be.Alloc(host.size() + 1);
    (void)be.CopyToBackend(p, host.data(), host.size());
  }
  Buf(Backend& b, size_t n) : be(b) {
    p = *be.Alloc(n + 1);
    be.Zero(p, n + 1);
  }
  ~Buf() { be.Free(p); }
  std::vector<float> Host(size_t n) const {
    std::vector<float> h(n);
    (void)be.CopyToHost(h.data(), p, n);
    return h;
  }
};

// Objective sum_i w[i] tanh(y[i]) and its gradient w (1 - tanh^2).
double Objective(const std::vector<float>& y, const std::vector<float>& w) {
  double l = 0;
  for (size_t i = 0; i < y.size(); ++i) l += w[i] * std::tanh(y[i]);
  return l;
}
std::vector<float> ObjectiveGrad(const std::vector<float>& y,
                                 const std::vector<float>& w) {
  std::vector<float> g(y.size());
  for (size_t i = 0; i < y.size(); ++i) {
    const double t = std::tanh(y[i]);
    g[i] = static_cast<float>(w[i] * (1 - t * t));
  }
  return g;
}

// Central differences of `loss` (over all ranks' inputs `x`) against `grad`.
void CheckFiniteDifferences(Tensors x, const Tensors& grad,
                            const std::function<double(const Tensors&)>& loss,
                            double eps = 1e-2, double tol = 2e-3) {
  double scale = 1e-3;
  for (const auto& g : grad) {
    for (float v : g) scale = std::max(scale, std::fabs(double{v}));
  }
  for (size_t r = 0; r < x.size(); ++r) {
    for (size_t i = 0; i < x[r].size(); ++i) {
      const float keep = x[r][i];
      x[r][i] = keep + static_cast<float>(eps);
      const double up = loss(x);
      x[r][i] = keep - static_cast<float>(eps);
      const double down = loss(x);
      x[r][i] = keep;
      const double fd = (up - down) / (2 * eps);
      ASSERT_NEAR(grad[r][i], fd, tol * scale)
          << "rank " << r << " element " << i;
    }
  }
}

constexpr int kN = 8, kC = 3;

class TpCollectivesTest : public ::testing::TestWithParam<int> {};

// GatherTokens: full = all-gather(local); backward = reduce-scatter.
TEST_P(TpCollectivesTest, GatherTokensBackwardIsTheAdjoint) {
  const int tp = GetParam();
  const size_t full_n = kN * kC, local_n = full_n / tp;
  Tensors x(tp), w(tp);
  for (int r = 0; r < tp; ++r) {
    x[r] = RandomVector(10 + r, local_n, -1, 1);
    w[r] = RandomVector(20 + r, full_n, -1, 1);
  }
  auto loss = [&](const Tensors& in) {
    std::vector<double> l(tp);
    RunRanks(tp, [&](int r, TpComm& comm, Backend& be) {
      Buf a(be, in[r]), full(be, full_n);
      absl::Status s = GatherTokensForward(comm, be, a.p, full.p, full_n);
      l[r] = Objective(full.Host(full_n), w[r]);
      return s;
    });
    double sum = 0;
    for (double v : l) sum += v;
    return sum;
  };
  Tensors grad(tp);
  RunRanks(tp, [&](int r, TpComm& comm, Backend& be) {
    Buf a(be, x[r]), full(be, full_n);
    absl::Status s = GatherTokensForward(comm, be, a.p, full.p, full_n);
    if (!s.ok()) return s;
    Buf dfull(be, ObjectiveGrad(full.Host(full_n), w[r])), dlocal(be, local_n);
    s = GatherTokensBackward(comm, be, dfull.p, dlocal.p, full_n);
    grad[r] = dlocal.Host(local_n);
    return s;
  });
  CheckFiniteDifferences(x, grad, loss);
}

// ScatterTokens: local = reduce-scatter(partial); backward = all-gather.
TEST_P(TpCollectivesTest, ScatterTokensBackwardIsTheAdjoint) {
  const int tp = GetParam();
  const size_t full_n = kN * kC, local_n = full_n / tp;
  Tensors x(tp), w(tp);
  for (int r = 0; r < tp; ++r) {
    x[r] = RandomVector(30 + r, full_n, -1, 1);
    w[r] = RandomVector(40 + r, local_n, -1, 1);
  }
  auto loss = [&](const Tensors& in) {
    std::vector<double> l(tp);
    RunRanks(tp, [&](int r, TpComm& comm, Backend& be) {
      Buf a(be, in[r]), local(be, local_n);
      absl::Status s = ScatterTokensForward(comm, be, a.p, local.p, full_n);
      l[r] = Objective(local.Host(local_n), w[r]);
      return s;
    });
    double sum = 0;
    for (double v : l) sum += v;
    return sum;
  };
  Tensors grad(tp);
  RunRanks(tp, [&](int r, TpComm& comm, Backend& be) {
    Buf a(be, x[r]), local(be, local_n);
    absl::Status s = ScatterTokensForward(comm, be, a.p, local.p, full_n);
    if (!s.ok()) return s;
    Buf dl(be, ObjectiveGrad(local.Host(local_n), w[r])), dp(be, full_n);
    s = ScatterTokensBackward(comm, be, dl.p, dp.p, full_n);
    grad[r] = dp.Host(full_n);
    return s;
  });
  CheckFiniteDifferences(x, grad, loss);
}

// Vocab-parallel cross-entropy: the loss equals the full-vocabulary
// cross-entropy, and its gradient w.r.t. each rank's logit columns matches
// finite differences of c * sum_n loss_n.
TEST_P(TpCollectivesTest, VocabParallelCrossEntropy) {
  const int tp = GetParam();
  const int V = 12, Vl = V / tp, N = 5;
  const float c = 0.7f;
  const std::vector<int32_t> targets = RandomTokens(7, N, V);
  Tensors x(tp);  // logits_r [N, Vl]
  for (int r = 0; r < tp; ++r) x[r] = RandomVector(50 + r, N * Vl, -2, 2);
  auto run = [&](const Tensors& in, Tensors* grads) {
    std::vector<std::vector<float>> losses(tp, std::vector<float>(N));
    RunRanks(tp, [&](int r, TpComm& comm, Backend& be) {
      const VocabShard shard{r * Vl, (r + 1) * Vl};
      Buf logits(be, in[r]), probs(be, N * Vl), scratch(be, (tp + 2) * N);
      absl::Status s = VocabParallelCrossEntropyForward(
          comm, be, logits.p, targets.data(), shard, N, probs.p,
          losses[r].data(), scratch.p);
      if (!s.ok() || grads == nullptr) return s;
      Buf d(be, N * Vl);
      s = VocabParallelCrossEntropyBackward(be, probs.p, targets.data(), shard,
                                            c, N, d.p);
      (*grads)[r] = d.Host(N * Vl);
      return s;
    });
    for (int r = 1; r < tp; ++r) EXPECT_EQ(losses[r], losses[0]);
    return losses[0];
  };
  // Against the full-vocabulary cross-entropy.
  const std::vector<float> losses = run(x, nullptr);
  for (int n = 0; n < N; ++n) {
    double mx = -1e30, sum = 0, zt = 0;
    for (int v = 0; v < V; ++v) {
      const float z = x[v / Vl][n * Vl + v % Vl];
      mx = std::max(mx, double{z});
      if (v == targets[n]) zt = z;
    }
    for (int v = 0; v < V; ++v) sum += std::exp(x[v / Vl][n * Vl + v % Vl] - mx);
    EXPECT_NEAR(losses[n], std::log(sum) - (zt - mx), 1e-5) << n;
  }
  Tensors grad(tp);
  run(x, &grad);
  CheckFiniteDifferences(x, grad, [&](const Tensors& in) {
    double l = 0;
    for (float v : run(in, nullptr)) l += c * v;
    return l;
  });
}

// Vocab-parallel embedding: the partials summed over ranks equal
// wte[token] + wpe[t]; the gradients w.r.t. each rank's wte rows and the
// replicated wpe match finite differences.
TEST_P(TpCollectivesTest, VocabParallelEmbedding) {
  const int tp = GetParam();
  const int V = 8, Vl = V / tp, B = 2, T = 3, C = kC, N = B * T;
  const std::vector<int32_t> tokens = {0, 5, 7, 5, 1, V - 1};
  const std::vector<float> w = RandomVector(60, N * C, -1, 1);
  // x[r] = wte_r [Vl, C] then wpe [T, C] (the same wpe on every rank is
  // perturbed through rank 0's copy; the others take it from there).
  Tensors x(tp);
  const std::vector<float> wpe = RandomVector(70, T * C, -1, 1);
  for (int r = 0; r < tp; ++r) {
    x[r] = RandomVector(80 + r, Vl * C, -1, 1);
    if (r == 0) x[r].insert(x[r].end(), wpe.begin(), wpe.end());
  }
  auto run = [&](const Tensors& in, Tensors* grads) {
    std::vector<float> out0;
    RunRanks(tp, [&](int r, TpComm& comm, Backend& be) {
      const VocabShard shard{r * Vl, (r + 1) * Vl};
      const std::vector<float> wte_r(in[r].begin(), in[r].begin() + Vl * C);
      const std::vector<float> wpe_all(in[0].begin() + Vl * C, in[0].end());
      Buf wte(be, wte_r), wp(be, wpe_all), zero(be, T * C), out(be, N * C);
      const std::vector<int32_t> ids =
          LocalTokenIds(shard, tokens.data(), tokens.size());
      int32_t* dev_ids = *be.AllocInt32(N);
      absl::Status s = be.CopyToBackend(dev_ids, ids.data(), N);
      if (s.ok()) {
        s = VocabParallelEmbeddingForward(be, out.p, dev_ids, tokens.data(),
                                          shard, wte.p, wp.p, zero.p, r == 0,
                                          B, T, C);
      }
      if (s.ok()) s = comm.AllReduceSum(&be, out.p, N * C);
      const std::vector<float> y = out.Host(N * C);
      if (r == 0) out0 = y;
      if (s.ok() && grads != nullptr) {
        Buf dout(be, ObjectiveGrad(y, w)), dwte(be, Vl * C), dwpe(be, T * C),
            scratch(be, T * C);
        s = VocabParallelEmbeddingBackward(be, dwte.p, dwpe.p, scratch.p,
                                           dout.p, dev_ids, tokens.data(),
                                           shard, B, T, C);
        (*grads)[r] = dwte.Host(Vl * C);
        // wpe is replicated: its gradient is the same on every rank; rank
        // 0's copy stands for it.
        if (r == 0) {
          const std::vector<float> g = dwpe.Host(T * C);
          (*grads)[r].insert((*grads)[r].end(), g.begin(), g.end());
        }
      }
      be.Free(dev_ids);
      return s;
    });
    return out0;
  };
  const std::vector<float> y = run(x, nullptr);
  for (int n = 0; n < N; ++n) {
    const int v = tokens[n], t = n % T;
    for (int k = 0; k < C; ++k) {
      EXPECT_NEAR(y[n * C + k], x[v / Vl][(v % Vl) * C + k] + wpe[t * C + k],
                  1e-6);
    }
  }
  Tensors grad(tp);
  run(x, &grad);
  CheckFiniteDifferences(x, grad, [&](const Tensors& in) {
    return Objective(run(in, nullptr), w);
  });
}

INSTANTIATE_TEST_SUITE_P(GroupSizes, TpCollectivesTest,
                         ::testing::Values(1, 2, 4),
                         [](const auto& info) {
                           return absl::StrCat("tp", info.param);
                         });

}  // namespace
}  // namespace lmps
