#include "common/formats/gpt2_weights.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/formats/hf_gpt2.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

namespace fs = std::filesystem;

ModelConfig Small() {
  ModelConfig c;
  c.set_n_layer(2);
  c.set_n_head(2);
  c.set_n_embd(4);
  c.set_block_size(3);
  c.set_vocab_size(5);
  return c;
}

// lmps tensors with distinct values that are not round numbers.
std::vector<SafeTensor> Lmps(const ModelConfig& config) {
  std::vector<SafeTensor> out;
  uint32_t x = 12345;
  for (const TensorSpec& s : GptTensorSpecs(config)) {
    SafeTensor t{s.name, s.shape, std::vector<float>(s.num_elements())};
    for (float& v : t.data) {
      x = x * 1664525u + 1013904223u;
      v = static_cast<float>(x >> 8) / 16777216.0f - 0.5f;
    }
    out.push_back(std::move(t));
  }
  return out;
}

std::vector<float> Flatten(const std::vector<SafeTensor>& tensors) {
  std::vector<float> flat;
  for (const SafeTensor& t : tensors) {
    flat.insert(flat.end(), t.data.begin(), t.data.end());
  }
  return flat;
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), 4 * a.size()) == 0;
}

std::string Dir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A safetensors file with tensors of any dtype: (name, dtype, shape, bytes).
struct RawTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

std::string RawFile(const std::vector<RawTensor>& tensors) {
  std::string header = "{";
  std::string data;
  for (const RawTensor& t : tensors) {
    if (header.size() > 1) header += ",";
    absl::StrAppend(&header, "\"", t.name, "\":{\"dtype\":\"", t.dtype,
                    "\",\"shape\":[", absl::StrJoin(t.shape, ","),
                    "],\"data_offsets\":[", data.size(), ",",
                    data.size() + t.bytes.size(), "]}");
    data += t.bytes;
  }
  header += "}";
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

RawTensor F32(const SafeTensor& t) {
  return {t.name, "F32", t.shape,
          std::string(reinterpret_cast<const char*>(t.data.data()),
                      4 * t.data.size())};
}

// Hugging Face tensors of `lmps` (prefixed when `prefix`) plus extras.
std::vector<RawTensor> Hf(const ModelConfig& c,
                          const std::vector<SafeTensor>& lmps, bool prefix) {
  std::vector<RawTensor> out;
  const absl::StatusOr<std::vector<SafeTensor>> hf = LmpsToHfGpt2(c, lmps);
  EXPECT_TRUE(hf.ok()) << hf.status();
  for (SafeTensor t : hf.value()) {
    if (!prefix) t.name = t.name.substr(kHfGpt2Prefix.size());
    out.push_back(F32(t));
  }
  return out;
}

absl::StatusOr<Gpt2Weights> LoadRaw(const std::string& dir,
                                    const std::vector<RawTensor>& tensors,
                                    const ModelConfig& model) {
  WriteText(dir + "/model.safetensors", RawFile(tensors));
  return Gpt2Weights::Load(dir, &model);
}

void ExpectError(const absl::StatusOr<Gpt2Weights>& r, absl::StatusCode code,
                 const std::vector<std::string>& needles) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), code) << r.status();
  for (const std::string& n : needles) {
    EXPECT_NE(r.status().message().find(n), std::string::npos)
        << "'" << n << "' not in: " << r.status();
  }
}

TEST(Gpt2WeightsTest, LmpsToHfToLmpsIsBitExact) {
  const ModelConfig c = Small();
  const std::vector<SafeTensor> lmps = Lmps(c);
  auto hf = LmpsToHfGpt2(c, lmps);
  ASSERT_TRUE(hf.ok()) << hf.status();
  const std::string dir = Dir("roundtrip");
  ASSERT_TRUE(
      WriteSafetensorsFile(dir + "/model.safetensors", *hf, {{"format", "pt"}})
          .ok());
  WriteText(dir + "/config.json", HfGpt2ConfigJson(c));
  // The model comes from config.json.
  auto w = Gpt2Weights::Load(dir, nullptr);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->layout(), Gpt2Layout::kHuggingFace);
  EXPECT_EQ(w->path(), dir + "/model.safetensors");
  EXPECT_EQ(w->model().ShortDebugString(), c.ShortDebugString());
  EXPECT_TRUE(BitEqual(w->Flat(), Flatten(lmps)));
  // Any element range, e.g. a shard's chunk that cuts rows.
  for (size_t i = 0; i < lmps.size(); ++i) {
    const int64_t n = lmps[i].data.size();
    for (int64_t b = 0; b <= n; b += 3) {
      for (int64_t e = b; e <= n; e += 5) {
        std::vector<float> got(e - b);
        w->CopyRange(i, b, e, got.data());
        ASSERT_TRUE(BitEqual(got, std::vector<float>(lmps[i].data.begin() + b,
                                                     lmps[i].data.begin() + e)))
            << lmps[i].name << " [" << b << ", " << e << ")";
      }
    }
  }
  // lmps's own layout reads back unchanged.
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/lmps.safetensors", lmps).ok());
  auto same = Gpt2Weights::Load(dir + "/lmps.safetensors", &c);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(same->layout(), Gpt2Layout::kLmps);
  EXPECT_TRUE(BitEqual(same->Flat(), Flatten(lmps)));
}

TEST(Gpt2WeightsTest, AcceptsTheHuggingFaceVariants) {
  const ModelConfig c = Small();
  const std::vector<SafeTensor> lmps = Lmps(c);
  const std::string dir = Dir("variants");
  const RawTensor mask{
      "h.0.attn.bias", "BOOL", {1, 1, 3, 3}, std::string(9, 1)};
  const float minus = -1e4f;
  const RawTensor masked_bias{
      "h.1.attn.masked_bias",
      "F32",
      {},
      std::string(reinterpret_cast<const char*>(&minus), 4)};
  SafeTensor head = lmps[0];
  head.name = "lm_head.weight";
  struct Variant {
    const char* what;
    bool prefix;
    std::vector<RawTensor> extra;
  };
  RawTensor prefixed_mask = mask;
  prefixed_mask.name = "transformer." + mask.name;
  for (const Variant& v : {
           Variant{"prefixed (save_pretrained)", true, {}},
           Variant{"unprefixed (the Hub's gpt2)", false, {mask, masked_bias}},
           Variant{
               "prefixed, buffers, lm_head", true, {prefixed_mask, F32(head)}},
           Variant{"unprefixed, lm_head", false, {F32(head)}},
       }) {
    std::vector<RawTensor> tensors = v.extra;
    for (RawTensor& t : Hf(c, lmps, v.prefix)) tensors.push_back(t);
    auto w = LoadRaw(dir, tensors, c);
    ASSERT_TRUE(w.ok()) << v.what << ": " << w.status();
    EXPECT_EQ(w->layout(), Gpt2Layout::kHuggingFace) << v.what;
    EXPECT_TRUE(BitEqual(w->Flat(), Flatten(lmps))) << v.what;
  }
  // Without any marker the shape of c_attn tells the layout.
  std::vector<RawTensor> plain = Hf(c, lmps, false);
  auto w = LoadRaw(dir, plain, c);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->layout(), Gpt2Layout::kHuggingFace);
  EXPECT_TRUE(BitEqual(w->Flat(), Flatten(lmps)));
  // Some names prefixed, some not: each is found.
  std::vector<RawTensor> mixed = Hf(c, lmps, true);
  for (size_t i = 0; i < mixed.size(); i += 2) {
    mixed[i].name = mixed[i].name.substr(kHfGpt2Prefix.size());
  }
  w = LoadRaw(dir, mixed, c);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE(BitEqual(w->Flat(), Flatten(lmps)));
}

TEST(Gpt2WeightsTest, MismatchesNameTheTensorAndBothShapes) {
  const ModelConfig c = Small();
  const std::vector<SafeTensor> lmps = Lmps(c);
  const std::string dir = Dir("mismatch");
  // An lmps-layout c_fc in a Hugging Face file.
  std::vector<RawTensor> t = Hf(c, lmps, true);
  for (RawTensor& r : t) {
    if (r.name == "transformer.h.1.mlp.c_fc.weight") r.shape = {16, 4};
  }
  ExpectError(LoadRaw(dir, t, c), absl::StatusCode::kInvalidArgument,
              {"transformer.h.1.mlp.c_fc.weight", "[16, 4]", "[4, 16]",
               "Hugging Face layout", "model.safetensors"});
  // Another model: wider.
  ModelConfig wide = c;
  wide.set_n_embd(8);
  ExpectError(LoadRaw(dir, Hf(c, lmps, true), wide),
              absl::StatusCode::kInvalidArgument,
              {"transformer.wte.weight", "[5, 4]", "[5, 8]"});
  // Fewer layers in the job: the file's extra block is named.
  ModelConfig shallow = c;
  shallow.set_n_layer(1);
  ExpectError(LoadRaw(dir, Hf(c, lmps, true), shallow),
              absl::StatusCode::kInvalidArgument,
              {"transformer.h.1.", "blocks up to h.1", "n_layer=1"});
  // More layers in the job: the first missing tensor is named.
  ModelConfig deep = c;
  deep.set_n_layer(3);
  ExpectError(LoadRaw(dir, Hf(c, lmps, true), deep),
              absl::StatusCode::kNotFound,
              {"transformer.h.2.ln_1.weight' or 'h.2.ln_1.weight"});
  // A tensor with and without the prefix.
  t = Hf(c, lmps, true);
  RawTensor dup = t[1];
  dup.name = "wpe.weight";
  t.push_back(dup);
  ExpectError(LoadRaw(dir, t, c), absl::StatusCode::kInvalidArgument,
              {"both 'transformer.wpe.weight' and 'wpe.weight'"});
  // An untied head.
  t = Hf(c, lmps, true);
  SafeTensor head = lmps[0];
  head.name = "lm_head.weight";
  head.data[3] += 1.0f;
  t.push_back(F32(head));
  ExpectError(LoadRaw(dir, t, c), absl::StatusCode::kInvalidArgument,
              {"lm_head.weight", "ties"});
  // A parameter in double precision (half precision is widened: below).
  t = Hf(c, lmps, true);
  t[2] = {t[2].name, "F64", t[2].shape, std::string(8 * 4, '\0')};
  ExpectError(LoadRaw(dir, t, c), absl::StatusCode::kInvalidArgument,
              {t[2].name, "F64", "F32, F16 and BF16"});
  // A job with a longer context than the file's wpe, or a smaller
  // vocabulary than its wte.
  ModelConfig longer = c;
  longer.set_block_size(4);
  ExpectError(LoadRaw(dir, Hf(c, lmps, true), longer),
              absl::StatusCode::kInvalidArgument,
              {"transformer.wpe.weight", "[3, 4]", "[4, 4]"});
  ModelConfig fewer = c;
  fewer.set_vocab_size(4);
  ExpectError(LoadRaw(dir, Hf(c, lmps, true), fewer),
              absl::StatusCode::kInvalidArgument,
              {"transformer.wte.weight", "[5, 4]", "[4, 4]"});
  // A stray tensor.
  t = Hf(c, lmps, false);
  t.push_back(F32({"score.weight", {2, 4}, std::vector<float>(8)}));
  ExpectError(LoadRaw(dir, t, c), absl::StatusCode::kInvalidArgument,
              {"score.weight"});
}

// F16 and BF16 parameters are widened exactly; a job with a shorter context
// reads wpe's first rows, one with a padded vocabulary gets zero rows after
// the file's tokens (also when config.json says the file's sizes).
TEST(Gpt2WeightsTest, HalfPrecisionShorterContextAndPaddedVocabulary) {
  const ModelConfig c = Small();  // block_size 3, vocab_size 5
  std::vector<SafeTensor> lmps = Lmps(c);
  // Values every half format holds exactly: k / 64, |k| < 64.
  for (SafeTensor& t : lmps) {
    for (size_t i = 0; i < t.data.size(); ++i) {
      t.data[i] = static_cast<float>(static_cast<int>(i % 97) - 48) / 64;
    }
  }
  const std::string dir = Dir("half");
  WriteText(dir + "/config.json", HfGpt2ConfigJson(c));
  for (const char* dtype : {"F16", "BF16"}) {
    SCOPED_TRACE(dtype);
    std::vector<RawTensor> t = Hf(c, lmps, true);
    for (RawTensor& r : t) {
      std::vector<float> v(r.bytes.size() / 4);
      std::memcpy(v.data(), r.bytes.data(), r.bytes.size());
      std::string half(2 * v.size(), '\0');
      for (size_t i = 0; i < v.size(); ++i) {
        uint32_t bits;
        std::memcpy(&bits, &v[i], 4);
        // Exact for these values: BF16 is the upper half; F16 rebiases.
        uint16_t h = static_cast<uint16_t>(bits >> 16);
        if (std::string(dtype) == "F16") {
          const uint32_t sign = (bits >> 16) & 0x8000u;
          const int e = static_cast<int>((bits >> 23) & 0xff) - 127 + 15;
          h = v[i] == 0 ? static_cast<uint16_t>(sign)
                        : static_cast<uint16_t>(sign | (e << 10) |
                                                ((bits >> 13) & 0x3ff));
        }
        std::memcpy(half.data() + 2 * i, &h, 2);
      }
      r.dtype = dtype;
      r.bytes = half;
    }
    auto w = LoadRaw(dir, t, c);
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_TRUE(BitEqual(w->Flat(), Flatten(lmps)));
    ASSERT_FALSE(w->adaptations().empty());
    EXPECT_NE(w->adaptations()[0].find(absl::StrCat(dtype, " widened to F32")),
              std::string::npos)
        << w->adaptations()[0];
  }
  // block_size 2 of the file's 3, vocab_size 7 for the file's 5.
  ModelConfig job = c;
  job.set_block_size(2);
  job.set_vocab_size(7);
  auto w = LoadRaw(dir, Hf(c, lmps, true), job);
  ASSERT_TRUE(w.ok()) << w.status();
  const std::vector<TensorSpec> specs = GptTensorSpecs(job);
  ASSERT_EQ(specs[0].name, "wte.weight");
  ASSERT_EQ(specs[1].name, "wpe.weight");
  std::vector<float> wte(7 * 4), wpe(2 * 4);
  w->CopyRange(0, 0, 28, wte.data());
  w->CopyRange(1, 0, 8, wpe.data());
  std::vector<float> want_wte = lmps[0].data;  // 5 rows, then 2 zero rows
  want_wte.resize(28, 0.0f);
  EXPECT_TRUE(BitEqual(wte, want_wte));
  EXPECT_TRUE(BitEqual(wpe, std::vector<float>(lmps[1].data.begin(),
                                               lmps[1].data.begin() + 8)));
  // A range inside the padding, and one across its start.
  std::vector<float> part(6);
  w->CopyRange(0, 18, 24, part.data());
  EXPECT_TRUE(BitEqual(part, std::vector<float>{lmps[0].data[18],
                                                lmps[0].data[19], 0, 0, 0,
                                                0}));
  ASSERT_EQ(w->adaptations().size(), 2u);
  EXPECT_EQ(w->adaptations()[0],
            "transformer.wte.weight: its 5 tokens, then 2 zero rows "
            "(vocab_size 7)");
  EXPECT_EQ(w->adaptations()[1],
            "transformer.wpe.weight: the first 2 of its 3 positions "
            "(block_size 2)");
  // The rest of the model is unchanged.
  std::vector<float> flat = w->Flat();
  std::vector<float> rest(flat.begin() + 28 + 8, flat.end());
  std::vector<float> lmps_flat = Flatten(lmps);
  EXPECT_TRUE(BitEqual(rest, std::vector<float>(lmps_flat.begin() + 20 + 12,
                                                lmps_flat.end())));
}

TEST(Gpt2WeightsTest, TheFilesConfigMustBeTheJobs) {
  const ModelConfig c = Small();
  const std::vector<SafeTensor> lmps = Lmps(c);
  const std::string dir = Dir("config");
  // n_head is invisible in the shapes; config.json tells.
  ModelConfig heads = c;
  heads.set_n_head(1);
  WriteText(dir + "/config.json", HfGpt2ConfigJson(heads));
  ExpectError(LoadRaw(dir, Hf(c, lmps, true), c),
              absl::StatusCode::kInvalidArgument,
              {dir + "/config.json", "n_head 1 vs 2"});
  // So is lmps_export's metadata.
  ASSERT_TRUE(WriteSafetensorsFile(dir + "/lmps.safetensors", lmps,
                                   {{"lmps.model", heads.ShortDebugString()}})
                  .ok());
  auto r = Gpt2Weights::Load(dir + "/lmps.safetensors", &c);
  ExpectError(r, absl::StatusCode::kInvalidArgument,
              {"lmps.model metadata", "n_head 1 vs 2"});
  // Without a model, the file's own config is used.
  auto own = Gpt2Weights::Load(dir + "/lmps.safetensors", nullptr);
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_EQ(own->model().n_head(), 1);
  // A config.json of another architecture.
  WriteText(dir + "/config.json", R"({"activation_function": "relu"})");
  ExpectError(Gpt2Weights::Load(dir, &c), absl::StatusCode::kInvalidArgument,
              {"activation_function"});
  fs::remove(dir + "/config.json");
  ExpectError(Gpt2Weights::Load(dir, nullptr),
              absl::StatusCode::kInvalidArgument, {"no model config"});
}

TEST(Gpt2WeightsTest, PathsThatHoldNoModel) {
  const ModelConfig c = Small();
  const std::string dir = Dir("paths");
  ExpectError(Gpt2Weights::Load(dir, &c), absl::StatusCode::kNotFound,
              {dir, "without model.safetensors"});
  WriteText(dir + "/model.safetensors.index.json", "{}");
  ExpectError(Gpt2Weights::Load(dir, &c), absl::StatusCode::kInvalidArgument,
              {"sharded"});
  EXPECT_EQ(Gpt2Weights::Load(dir + "/nope.safetensors", &c).status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lmps
