// Test helpers of worker/ps_client_test and worker/ps_client_shm_test: a
// small job spec and random gradients.
#ifndef LMPS_WORKER_PS_CLIENT_TEST_UTIL_H_
#define LMPS_WORKER_PS_CLIENT_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <vector>

#include "common/model/job_spec.h"
#include "common/model/model_spec.h"
#include "proto/lmps.pb.h"

namespace lmps::testing {

// 2 layers, 2 heads, width 8, 2 shards; chunks of at most 10 elements, so
// they straddle the tensor-parallel slices' boundaries.
inline JobSpec Spec(int pp, int tp) {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(2);
  m->set_n_head(2);
  m->set_n_embd(8);
  m->set_block_size(4);
  m->set_vocab_size(16);
  spec.mutable_layout()->set_pp(pp);
  spec.mutable_layout()->set_tp(tp);
  spec.mutable_layout()->set_num_shards(2);
  spec.mutable_train()->set_batch_size(2);
  spec.mutable_train()->set_steps(10);
  spec.mutable_train()->set_checkpoint_interval(1000);
  OptimizerConfig* o = spec.mutable_optimizer();
  o->set_type(ADAMW);
  o->set_lr(0.01f);
  o->set_grad_clip(0.5f);  // active: the gradients' norm is above it
  spec.set_max_chunk_bytes(40);
  spec.set_max_message_bytes(1024);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

// A random gradient per tensor (GptTensorSpecs order): `first` is what the
// first stage computes, `last` is wte's gradient on the last stage (the
// tied LM head); a pp = 1 worker's wte gradient is their sum.
struct Gradient {
  std::vector<std::vector<float>> first;
  std::vector<float> last;
};

inline Gradient RandomGradient(const ModelConfig& model, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-0.05f, 0.05f);
  Gradient g;
  for (const TensorSpec& t : GptTensorSpecs(model)) {
    g.first.emplace_back(t.num_elements());
    for (float& v : g.first.back()) v = u(rng);
  }
  g.last.resize(g.first[0].size());
  for (float& v : g.last) v = u(rng);
  return g;
}

// The flat gradient of the whole model (pp = tp = 1).
inline std::vector<float> FullGradient(const Gradient& g) {
  std::vector<float> out;
  for (size_t t = 0; t < g.first.size(); ++t) {
    for (size_t i = 0; i < g.first[t].size(); ++i) {
      out.push_back(t == 0 ? g.first[t][i] + g.last[i] : g.first[t][i]);
    }
  }
  return out;
}

}  // namespace lmps::testing

#endif  // LMPS_WORKER_PS_CLIENT_TEST_UTIL_H_
