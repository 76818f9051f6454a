#include "worker/backend/cpu_reference.h"

#include <cmath>
#include <vector>

namespace lmps {
namespace {

constexpr double kLayerNormEps = 1e-5;
constexpr double kGeluScale = 0.7978845608028654;  // sqrt(2 / pi)

}  // namespace

absl::StatusOr<std::unique_ptr<ReferenceBackend>> ReferenceBackend::Create() {
  return std::unique_ptr<ReferenceBackend>(new ReferenceBackend());
}

void ReferenceBackend::Zero(float* p, size_t n) {
  for (size_t i = 0; i < n; ++i) p[i] = 0.0f;
}

void ReferenceBackend::Axpy(float* y, float alpha, const float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// out[B,T,C] = wte[inp[b,t]] + wpe[t].
void ReferenceBackend::EncoderForward(float* out, const int32_t* inp,
                                      const float* wte, const float* wpe,
                                      int B, int T, int C) {
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      float* out_bt = out + (static_cast<size_t>(b) * T + t) * C;
      const float* wte_ix = wte + static_cast<size_t>(inp[b * T + t]) * C;
      const float* wpe_t = wpe + static_cast<size_t>(t) * C;
      for (int i = 0; i < C; ++i) out_bt[i] = wte_ix[i] + wpe_t[i];
    }
  }
}

void ReferenceBackend::EncoderBackward(float* dwte, float* dwpe,
                                       const float* dout, const int32_t* inp,
                                       int B, int T, int C) {
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      const float* dout_bt = dout + (static_cast<size_t>(b) * T + t) * C;
      float* dwte_ix = dwte + static_cast<size_t>(inp[b * T + t]) * C;
      float* dwpe_t = dwpe + static_cast<size_t>(t) * C;
      for (int i = 0; i < C; ++i) {
        dwte_ix[i] += dout_bt[i];
        dwpe_t[i] += dout_bt[i];
      }
    }
  }
}

// out[N,C] = (inp - mean) * rstd * weight + bias.
void ReferenceBackend::LayerNormForward(float* out, float* mean, float* rstd,
                                        const float* inp, const float* weight,
                                        const float* bias, int N, int C) {
  for (int n = 0; n < N; ++n) {
    const float* x = inp + static_cast<size_t>(n) * C;
    double m = 0.0;
    for (int i = 0; i < C; ++i) m += x[i];
    m /= C;
    double v = 0.0;
    for (int i = 0; i < C; ++i) v += (x[i] - m) * (x[i] - m);
    v /= C;
    const double s = 1.0 / std::sqrt(v + kLayerNormEps);
    float* o = out + static_cast<size_t>(n) * C;
    for (int i = 0; i < C; ++i) {
      o[i] = static_cast<float>((x[i] - m) * s * weight[i] + bias[i]);
    }
    mean[n] = static_cast<float>(m);
    rstd[n] = static_cast<float>(s);
  }
}

void ReferenceBackend::LayerNormBackward(float* dinp, float* dweight,
                                         float* dbias, const float* dout,
                                         const float* inp, const float* weight,
                                         const float* mean, const float* rstd,
                                         int N, int C) {
  for (int n = 0; n < N; ++n) {
    const float* dout_n = dout + static_cast<size_t>(n) * C;
    const float* inp_n = inp + static_cast<size_t>(n) * C;
    float* dinp_n = dinp + static_cast<size_t>(n) * C;
    const double m = mean[n], s = rstd[n];
    // Two reductions: mean(dnorm) and mean(dnorm * norm).
    double dnorm_mean = 0.0, dnorm_norm_mean = 0.0;
    for (int i = 0; i < C; ++i) {
      const double norm = (inp_n[i] - m) * s;
      const double dnorm = static_cast<double>(weight[i]) * dout_n[i];
      dnorm_mean += dnorm;
      dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean /= C;
    dnorm_norm_mean /= C;
    for (int i = 0; i < C; ++i) {
      const double norm = (inp_n[i] - m) * s;
      const double dnorm = static_cast<double>(weight[i]) * dout_n[i];
      dbias[i] += dout_n[i];
      dweight[i] += static_cast<float>(norm * dout_n[i]);
      dinp_n[i] += static_cast<float>(
          (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s);
    }
  }
}

// out[N,OC] = inp[N,C] @ weight[OC,C]^T + bias[OC].
void ReferenceBackend::MatmulForward(float* out, const float* inp,
                                     const float* weight, const float* bias,
                                     int N, int C, int OC) {
  for (int n = 0; n < N; ++n) {
    for (int o = 0; o < OC; ++o) {
      double acc = bias != nullptr ? bias[o] : 0.0;
      for (int i = 0; i < C; ++i) {
        acc += static_cast<double>(inp[static_cast<size_t>(n) * C + i]) *
               weight[static_cast<size_t>(o) * C + i];
      }
      out[static_cast<size_t>(n) * OC + o] = static_cast<float>(acc);
    }
  }
}

void ReferenceBackend::MatmulBackward(float* dinp, float* dweight,
                                      float* dbias, const float* dout,
                                      const float* inp, const float* weight,
                                      int N, int C, int OC) {
  // dinp[N,C] += dout[N,OC] @ weight[OC,C].
  for (int n = 0; n < N; ++n) {
    for (int i = 0; i < C; ++i) {
      double acc = 0.0;
      for (int o = 0; o < OC; ++o) {
        acc += static_cast<double>(dout[static_cast<size_t>(n) * OC + o]) *
               weight[static_cast<size_t>(o) * C + i];
      }
      dinp[static_cast<size_t>(n) * C + i] += static_cast<float>(acc);
    }
  }
  // dweight[OC,C] += dout^T @ inp; dbias[OC] += column sums of dout.
  for (int o = 0; o < OC; ++o) {
    for (int i = 0; i < C; ++i) {
      double acc = 0.0;
      for (int n = 0; n < N; ++n) {
        acc += static_cast<double>(dout[static_cast<size_t>(n) * OC + o]) *
               inp[static_cast<size_t>(n) * C + i];
      }
      dweight[static_cast<size_t>(o) * C + i] += static_cast<float>(acc);
    }
    if (dbias != nullptr) {
      double acc = 0.0;
      for (int n = 0; n < N; ++n) acc += dout[static_cast<size_t>(n) * OC + o];
      dbias[o] += static_cast<float>(acc);
    }
  }
}

// qkv[B,T,3C] -> att[B,NH,T,T], out[B,T,C].
void ReferenceBackend::AttentionForward(float* out, float* att,
                                        const float* qkv, int B, int T, int C,
                                        int NH) {
  const int C3 = 3 * C;
  const int hs = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < NH; ++h) {
      for (int t = 0; t < T; ++t) {
        const float* q = qkv + (static_cast<size_t>(b) * T + t) * C3 + h * hs;
        float* att_row =
            att + ((static_cast<size_t>(b) * NH + h) * T + t) * T;
        // Scores and their maximum over the causal window.
        double maxval = -INFINITY;
        for (int j = 0; j <= t; ++j) {
          const float* k =
              qkv + (static_cast<size_t>(b) * T + j) * C3 + C + h * hs;
          double dot = 0.0;
          for (int i = 0; i < hs; ++i) dot += static_cast<double>(q[i]) * k[i];
          dot *= scale;
          att_row[j] = static_cast<float>(dot);
          if (dot > maxval) maxval = dot;
        }
        double sum = 0.0;
        for (int j = 0; j <= t; ++j) sum += std::exp(att_row[j] - maxval);
        for (int j = 0; j < T; ++j) {
          att_row[j] = j <= t ? static_cast<float>(
                                    std::exp(att_row[j] - maxval) / sum)
                              : 0.0f;
        }
        float* o = out + (static_cast<size_t>(b) * T + t) * C + h * hs;
        for (int i = 0; i < hs; ++i) {
          double acc = 0.0;
          for (int j = 0; j <= t; ++j) {
            const float* v =
                qkv + (static_cast<size_t>(b) * T + j) * C3 + 2 * C + h * hs;
            acc += static_cast<double>(att_row[j]) * v[i];
          }
          o[i] = static_cast<float>(acc);
        }
      }
    }
  }
}

void ReferenceBackend::AttentionBackward(float* dqkv, float* scratch,
                                         const float* dout, const float* qkv,
                                         const float* att, int B, int T, int C,
                                         int NH) {
  (void)scratch;  // The reference recomputes everything row by row.
  const int C3 = 3 * C;
  const int hs = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hs));
  std::vector<double> datt(T);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < NH; ++h) {
      for (int t = 0; t < T; ++t) {
        const float* att_row =
            att + ((static_cast<size_t>(b) * NH + h) * T + t) * T;
        const float* dout_t =
            dout + (static_cast<size_t>(b) * T + t) * C + h * hs;
        const float* q = qkv + (static_cast<size_t>(b) * T + t) * C3 + h * hs;
        float* dq = dqkv + (static_cast<size_t>(b) * T + t) * C3 + h * hs;
        // datt[j] = dout_t . v_j;  dv_j += att[t,j] * dout_t.
        double datt_dot_att = 0.0;
        for (int j = 0; j <= t; ++j) {
          const size_t row = (static_cast<size_t>(b) * T + j) * C3;
          const float* v = qkv + row + 2 * C + h * hs;
          float* dv = dqkv + row + 2 * C + h * hs;
          double acc = 0.0;
          for (int i = 0; i < hs; ++i) {
            acc += static_cast<double>(dout_t[i]) * v[i];
            dv[i] += att_row[j] * dout_t[i];
          }
          datt[j] = acc;
          datt_dot_att += acc * att_row[j];
        }
        // Softmax backward, then the scaled dot product.
        for (int j = 0; j <= t; ++j) {
          const double dpre = att_row[j] * (datt[j] - datt_dot_att) * scale;
          const size_t row = (static_cast<size_t>(b) * T + j) * C3;
          const float* k = qkv + row + C + h * hs;
          float* dk = dqkv + row + C + h * hs;
          for (int i = 0; i < hs; ++i) {
            dq[i] += static_cast<float>(dpre * k[i]);
            dk[i] += static_cast<float>(dpre * q[i]);
          }
        }
      }
    }
  }
}

void ReferenceBackend::GeluForward(float* out, const float* inp, size_t N) {
  for (size_t i = 0; i < N; ++i) {
    const double x = inp[i];
    const double u = kGeluScale * (x + 0.044715 * x * x * x);
    out[i] = static_cast<float>(0.5 * x * (1.0 + std::tanh(u)));
  }
}

void ReferenceBackend::GeluBackward(float* dinp, const float* inp,
                                    const float* dout, size_t N) {
  for (size_t i = 0; i < N; ++i) {
    const double x = inp[i];
    const double u = kGeluScale * (x + 0.044715 * x * x * x);
    const double th = std::tanh(u);
    const double sech2 = 1.0 - th * th;
    const double du = kGeluScale * (1.0 + 3.0 * 0.044715 * x * x);
    const double grad = 0.5 * (1.0 + th) + 0.5 * x * sech2 * du;
    dinp[i] += static_cast<float>(grad * dout[i]);
  }
}

void ReferenceBackend::ResidualForward(float* out, const float* inp1,
                                       const float* inp2, size_t N) {
  for (size_t i = 0; i < N; ++i) out[i] = inp1[i] + inp2[i];
}

void ReferenceBackend::ResidualBackward(float* dinp1, float* dinp2,
                                        const float* dout, size_t N) {
  for (size_t i = 0; i < N; ++i) {
    dinp1[i] += dout[i];
    dinp2[i] += dout[i];
  }
}

void ReferenceBackend::CrossEntropyForward(float* losses, float* probs,
                                           const float* logits,
                                           const int32_t* targets, int N,
                                           int V) {
  for (int n = 0; n < N; ++n) {
    const float* x = logits + static_cast<size_t>(n) * V;
    float* p = probs + static_cast<size_t>(n) * V;
    double maxval = -INFINITY;
    for (int v = 0; v < V; ++v) maxval = x[v] > maxval ? x[v] : maxval;
    double sum = 0.0;
    for (int v = 0; v < V; ++v) sum += std::exp(x[v] - maxval);
    for (int v = 0; v < V; ++v) {
      p[v] = static_cast<float>(std::exp(x[v] - maxval) / sum);
    }
    // log-sum-exp form: exact even when the target's probability is tiny.
    losses[n] = static_cast<float>(std::log(sum) + maxval - x[targets[n]]);
  }
}

void ReferenceBackend::CrossEntropyBackward(float* dlogits, const float* probs,
                                            const int32_t* targets,
                                            float dloss, int N, int V) {
  for (int n = 0; n < N; ++n) {
    for (int v = 0; v < V; ++v) {
      const float indicator = v == targets[n] ? 1.0f : 0.0f;
      dlogits[static_cast<size_t>(n) * V + v] +=
          (probs[static_cast<size_t>(n) * V + v] - indicator) * dloss;
    }
  }
}

}  // namespace lmps
