#include "common/formats/hf_gpt2.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace lmps {
namespace {

ModelConfig Small() {
  ModelConfig c;
  c.set_n_layer(2);
  c.set_n_head(2);
  c.set_n_embd(4);
  c.set_block_size(3);
  c.set_vocab_size(5);
  return c;
}

std::vector<SafeTensor> Numbered(const ModelConfig& config) {
  std::vector<SafeTensor> out;
  float v = 0.5f;
  for (const TensorSpec& s : GptTensorSpecs(config)) {
    SafeTensor t{s.name, s.shape, std::vector<float>(s.num_elements())};
    for (float& x : t.data) x = (v += 1.25f);
    out.push_back(std::move(t));
  }
  return out;
}

TEST(HfGpt2Test, ProjectionMatricesAreTheConv1DWeights) {
  EXPECT_TRUE(IsHfConv1DWeight("h.0.attn.c_attn.weight"));
  EXPECT_TRUE(IsHfConv1DWeight("h.11.attn.c_proj.weight"));
  EXPECT_TRUE(IsHfConv1DWeight("h.3.mlp.c_fc.weight"));
  EXPECT_TRUE(IsHfConv1DWeight("h.3.mlp.c_proj.weight"));
  EXPECT_FALSE(IsHfConv1DWeight("h.3.mlp.c_proj.bias"));
  EXPECT_FALSE(IsHfConv1DWeight("wte.weight"));
  EXPECT_FALSE(IsHfConv1DWeight("wpe.weight"));
  EXPECT_FALSE(IsHfConv1DWeight("h.0.ln_1.weight"));
  EXPECT_FALSE(IsHfConv1DWeight("transformer.h.0.attn.c_attn.weight"));
  int conv = 0;
  for (const TensorSpec& s : GptTensorSpecs(Small())) {
    const std::vector<int64_t> hf = HfGpt2Shape(s);
    if (IsHfConv1DWeight(s.name)) {
      ++conv;
      EXPECT_EQ(hf, (std::vector<int64_t>{s.shape[1], s.shape[0]})) << s.name;
    } else {
      EXPECT_EQ(hf, s.shape) << s.name;
    }
  }
  EXPECT_EQ(conv, 4 * 2);
  // c_attn: lmps (3C, C), Hugging Face (C, 3C).
  EXPECT_EQ(HfGpt2Shape(GptTensorSpecs(Small())[4]),
            (std::vector<int64_t>{4, 12}));
}

TEST(HfGpt2Test, AttentionBuffers) {
  int64_t layer = -1;
  EXPECT_TRUE(IsHfGpt2AttentionBuffer("h.7.attn.bias", &layer));
  EXPECT_EQ(layer, 7);
  EXPECT_TRUE(IsHfGpt2AttentionBuffer("h.0.attn.masked_bias"));
  EXPECT_FALSE(IsHfGpt2AttentionBuffer("h.0.attn.c_attn.bias"));
  EXPECT_FALSE(IsHfGpt2AttentionBuffer("h.x.attn.bias"));
  EXPECT_FALSE(IsHfGpt2AttentionBuffer("h.+1.attn.bias"));
  EXPECT_FALSE(IsHfGpt2AttentionBuffer("transformer.h.0.attn.bias"));
  EXPECT_FALSE(IsHfGpt2AttentionBuffer("h..attn.bias"));
}

TEST(HfGpt2Test, LmpsToHfRenamesAndTransposes) {
  const ModelConfig c = Small();
  const std::vector<SafeTensor> lmps = Numbered(c);
  auto hf = LmpsToHfGpt2(c, lmps);
  ASSERT_TRUE(hf.ok()) << hf.status();
  ASSERT_EQ(hf->size(), lmps.size());
  for (size_t i = 0; i < lmps.size(); ++i) {
    const SafeTensor& a = lmps[i];
    const SafeTensor& b = (*hf)[i];
    EXPECT_EQ(b.name, "transformer." + a.name);
    if (!IsHfConv1DWeight(a.name)) {
      EXPECT_EQ(b.shape, a.shape);
      EXPECT_EQ(b.data, a.data) << a.name;
      continue;
    }
    const int64_t out = a.shape[0], in = a.shape[1];
    ASSERT_EQ(b.shape, (std::vector<int64_t>{in, out}));
    for (int64_t r = 0; r < out; ++r) {
      for (int64_t k = 0; k < in; ++k) {
        ASSERT_EQ(b.data[k * out + r], a.data[r * in + k]) << a.name;
      }
    }
  }
  EXPECT_EQ(TransposeMatrix(TransposeMatrix(lmps[4].data, 12, 4), 4, 12),
            lmps[4].data);
}

TEST(HfGpt2Test, LmpsToHfRejectsOtherTensors) {
  const ModelConfig c = Small();
  std::vector<SafeTensor> lmps = Numbered(c);
  lmps[6].shape = {2, 8};
  auto r = LmpsToHfGpt2(c, lmps);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("h.0.attn.c_proj.weight"),
            std::string::npos)
      << r.status();
  EXPECT_NE(r.status().message().find("[4, 4]"), std::string::npos);
  lmps.pop_back();
  EXPECT_EQ(LmpsToHfGpt2(c, lmps).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(HfGpt2Test, ConfigJsonRoundTrips) {
  ModelConfig c = Small();
  const std::string json = HfGpt2ConfigJson(c);
  for (const char* want :
       {"\"model_type\": \"gpt2\"", "\"GPT2LMHeadModel\"",
        "\"activation_function\": \"gelu_new\"",
        "\"layer_norm_epsilon\": 1e-05", "\"n_positions\": 3", "\"n_ctx\": 3",
        "\"n_embd\": 4", "\"n_head\": 2", "\"n_layer\": 2", "\"vocab_size\": 5",
        "\"tie_word_embeddings\": true", "\"resid_pdrop\": 0.0",
        "\"eos_token_id\": null"}) {
    EXPECT_NE(json.find(want), std::string::npos) << want << "\n" << json;
  }
  auto back = ParseHfGpt2ConfigJson(json, "config.json");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ShortDebugString(), c.ShortDebugString());
  c.set_vocab_size(50257);
  EXPECT_NE(HfGpt2ConfigJson(c).find("\"eos_token_id\": 50256"),
            std::string::npos);
}

TEST(HfGpt2Test, ConfigJsonDefaultsAreGpt2Small) {
  auto c = ParseHfGpt2ConfigJson("{}", "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(ModelConfigSummary(*c),
            "n_layer=12 n_head=12 n_embd=768 block_size=1024 "
            "vocab_size=50257");
  // The Hub's gpt2 config.json, in part.
  auto hub = ParseHfGpt2ConfigJson(
      R"({"activation_function": "gelu_new", "architectures":
          ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "embd_pdrop": 0.1,
          "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
          "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
          "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1,
          "task_specific_params": {"text-generation": {"do_sample": true}},
          "vocab_size": 50257})",
      "config.json");
  ASSERT_TRUE(hub.ok()) << hub.status();
  EXPECT_EQ(hub->n_layer(), 12);
}

TEST(HfGpt2Test, ConfigJsonOfAnotherArchitectureIsRejected) {
  struct Case {
    const char* json;
    const char* needle;
  };
  for (const Case& k : {
           Case{R"({"activation_function": "gelu"})", "activation_function"},
           Case{R"({"activation_function": "relu"})", "tanh approximation"},
           Case{R"({"layer_norm_epsilon": 1e-6})", "eps 1e-5"},
           Case{R"({"n_embd": 8, "n_head": 2, "n_inner": 16})", "n_inner"},
           Case{R"({"scale_attn_weights": false})", "scale_attn_weights"},
           Case{R"({"scale_attn_by_inverse_layer_idx": true})",
                "scale_attn_by_inverse_layer_idx"},
           Case{R"({"add_cross_attention": true})", "cross-attention"},
           Case{R"({"tie_word_embeddings": false})", "tied"},
           Case{R"({"model_type": "gpt_neo"})", "gpt_neo"},
           Case{R"({"n_layer": "4"})", "\"n_layer\" is not an integer"},
           Case{R"({"n_head": 0})", "out of range"},
           Case{R"({"n_embd": 10, "n_head": 4})", "divisible"},
           Case{"[1, 2]", "not a JSON object"},
           Case{"{\"n_layer\": ", "not a JSON object"},
       }) {
    auto r = ParseHfGpt2ConfigJson(k.json, "dir/config.json");
    ASSERT_FALSE(r.ok()) << k.json;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find(k.needle), std::string::npos)
        << k.json << " -> " << r.status();
    EXPECT_NE(r.status().message().find("dir/config.json"), std::string::npos);
  }
  // What lmps implements is accepted.
  for (const char* ok :
       {R"({"activation_function": "gelu_pytorch_tanh"})",
        R"({"activation_function": "gelu_fast", "n_inner": 3072})",
        R"({"n_inner": null, "reorder_and_upcast_attn": true})"}) {
    EXPECT_TRUE(ParseHfGpt2ConfigJson(ok, "config.json").ok()) << ok;
  }
}

}  // namespace
}  // namespace lmps
