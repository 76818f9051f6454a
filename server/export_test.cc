#include "server/export.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/formats/hf_gpt2.h"
#include "common/model/init.h"
#include "common/model/job_spec.h"
#include "common/model/model_spec.h"
#include "common/model/partition.h"
#include "common/text/gpt2_test_vocab.h"
#include "gtest/gtest.h"
#include "server/checkpoint.h"
#include "server/shard.h"

namespace lmps {
namespace {

JobSpec Spec() {
  JobSpec spec;
  ModelConfig* m = spec.mutable_model();
  m->set_n_layer(2);
  m->set_n_head(2);
  m->set_n_embd(8);
  m->set_block_size(4);
  m->set_vocab_size(16);
  spec.mutable_layout()->set_num_shards(3);
  spec.mutable_optimizer()->set_type(SGD);
  spec.set_max_chunk_bytes(200);
  ApplyJobSpecDefaults(&spec);
  return spec;
}

ExportOptions Hf(const std::string& tokenizer_dir = "") {
  ExportOptions o;
  o.format = ExportFormat::kHuggingFace;
  o.tokenizer_dir = tokenizer_dir;
  return o;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string TestDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::string dir = std::string(tmp ? tmp : "/tmp") + "/" + name;
  EXPECT_EQ(std::system(("rm -rf '" + dir + "'").c_str()), 0);
  return dir;
}

std::vector<std::unique_ptr<ParameterShard>> Shards(
    const JobSpec& spec, const std::string& dir,
    const std::string& init_from = "") {
  std::vector<std::unique_ptr<ParameterShard>> shards;
  for (int s = 0; s < spec.layout().num_shards(); ++s) {
    ShardOptions o;
    o.shard = s;
    o.spec = spec;
    o.map = *ComputePartition(spec.model(), spec.layout().num_shards(),
                              spec.max_chunk_bytes());
    o.checkpoint_dir = dir;
    o.init_from_safetensors = init_from;
    auto shard = ParameterShard::Create(o);
    EXPECT_TRUE(shard.ok()) << shard.status();
    shards.push_back(std::move(*shard));
  }
  return shards;
}

TEST(ExportTest, FreshShardsExportTheInitialisation) {
  const std::string dir = TestDir("fresh");
  const JobSpec spec = Spec();
  auto shards = Shards(spec, dir);
  for (auto& s : shards) ASSERT_TRUE(s->WriteCheckpoint().ok());
  EXPECT_EQ(*LatestCompleteStep(dir), 0);

  const std::string out = dir + "/model.safetensors";
  auto model = ExportCheckpoint(dir, -1, out);
  ASSERT_TRUE(model.ok()) << model.status();
  auto file = ReadSafetensorsFile(out);
  ASSERT_TRUE(file.ok()) << file.status();
  const auto specs = GptTensorSpecs(spec.model());
  ASSERT_EQ(file->tensors.size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const SafeTensor& t = file->tensors[i];
    EXPECT_EQ(t.name, specs[i].name);  // canonical order
    EXPECT_EQ(t.shape, specs[i].shape);
    std::vector<float> want(specs[i].num_elements());
    InitTensorRange(specs[i], spec.train().seed(), 0, want.size(), want.data());
    EXPECT_EQ(t.data, want) << t.name;
  }
  EXPECT_EQ(file->metadata.at("format"), "pt");
  EXPECT_EQ(file->metadata.at("lmps.step"), "0");
}

// One SGD step on every shard with a constant gradient, then a checkpoint:
// parameters away from the initialisation, at step 1.
void StepAndCheckpoint(std::vector<std::unique_ptr<ParameterShard>>* shards) {
  for (auto& s : *shards) {
    std::vector<PushRequest> stream(1);
    stream[0].set_partition_version(s->partition().version());
    for (const ChunkDesc& c : ChunksOfShard(s->partition(), s->shard())) {
      ChunkSlice* slice = stream[0].add_slices();
      slice->set_tensor(c.tensor());
      slice->set_chunk(c.index());
      slice->set_dtype(F32);
      std::vector<float> g(c.end() - c.begin(), 0.25f);
      slice->set_data(
          std::string(reinterpret_cast<char*>(g.data()), 4 * g.size()));
    }
    ASSERT_TRUE(s->Push(stream).ok());
    ASSERT_TRUE(s->GradNorm(0, absl::InfiniteFuture()).ok());
    ASSERT_TRUE(s->Apply(0, 0.0).ok());
    ASSERT_TRUE(s->WriteCheckpoint().ok());
  }
}

void ExpectSameParameters(
    const std::vector<std::unique_ptr<ParameterShard>>& a,
    const std::vector<std::unique_ptr<ParameterShard>>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t s = 0; s < a.size(); ++s) {
    const ShardCheckpoint x = a[s]->Snapshot();
    const ShardCheckpoint y = b[s]->Snapshot();
    ASSERT_EQ(x.chunks.size(), y.chunks.size());
    for (size_t c = 0; c < x.chunks.size(); ++c) {
      EXPECT_EQ(x.chunks[c].params, y.chunks[c].params)
          << x.chunks[c].desc.ShortDebugString();
    }
  }
}

TEST(ExportTest, RoundTripsThroughTheShards) {
  const std::string dir = TestDir("roundtrip");
  const JobSpec spec = Spec();
  auto shards = Shards(spec, dir);
  StepAndCheckpoint(&shards);
  const std::string out = dir + "/step1.safetensors";
  auto exported = ExportCheckpoint(dir, 1, out);
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->model.step, 1);
  EXPECT_EQ(exported->tokenizer, "");
  // New shards initialised from the export hold the same parameters.
  auto copies = Shards(spec, dir + "/other", out);
  ExpectSameParameters(shards, copies);
}

// --format=hf: a directory with Hugging Face's names, Conv1D shapes and
// config.json; shards initialised from it (each copying its chunks, which
// cut the transposed matrices mid-row) hold exactly the exported parameters.
TEST(ExportTest, HuggingFaceFormatRoundTripsThroughTheShards) {
  const std::string dir = TestDir("hf");
  const JobSpec spec = Spec();
  auto shards = Shards(spec, dir);
  StepAndCheckpoint(&shards);
  const std::string out = dir + "/hf";
  auto exported = ExportCheckpoint(dir, 1, out, Hf());
  ASSERT_TRUE(exported.ok()) << exported.status();
  const AssembledModel* model = &exported->model;
  // A job on bytes has no GPT-2 tokenizer to carry.
  EXPECT_EQ(exported->tokenizer,
            "no tokenizer files: the job's tokens are bytes (BYTE_TEXT)");
  EXPECT_FALSE(std::ifstream(out + "/vocab.json").good());
  auto file = ReadSafetensorsFile(out + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const auto specs = GptTensorSpecs(spec.model());
  ASSERT_EQ(file->tensors.size(), specs.size());  // no lm_head.weight
  for (size_t i = 0; i < specs.size(); ++i) {
    const SafeTensor& t = file->tensors[i];
    EXPECT_EQ(t.name, "transformer." + specs[i].name);
    EXPECT_EQ(t.shape, HfGpt2Shape(specs[i]));
    const SafeTensor& lmps = model->tensors[i];
    if (IsHfConv1DWeight(specs[i].name)) {
      EXPECT_EQ(t.data,
                TransposeMatrix(lmps.data, lmps.shape[0], lmps.shape[1]))
          << t.name;
    } else {
      EXPECT_EQ(t.data, lmps.data) << t.name;
    }
  }
  EXPECT_EQ(file->metadata.at("format"), "pt");  // from_pretrained needs it
  std::ifstream in(out + "/config.json");
  std::stringstream json;
  json << in.rdbuf();
  auto config = ParseHfGpt2ConfigJson(json.str(), "config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->ShortDebugString(), spec.model().ShortDebugString());

  auto copies = Shards(spec, dir + "/other", out);
  ExpectSameParameters(shards, copies);
  // Exporting that again gives the same bytes.
  for (auto& s : copies) ASSERT_TRUE(s->WriteCheckpoint().ok());
  ASSERT_TRUE(ExportCheckpoint(dir + "/other", 0, dir + "/hf2", Hf()).ok());
  auto again = ReadSafetensorsFile(dir + "/hf2/model.safetensors");
  ASSERT_TRUE(again.ok());
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(again->tensors[i].data, file->tensors[i].data);
  }
}

// A job trained on token files gets GPT-2's tokenizer files beside the
// model, checked and copied: vocab.json and merges.txt are encoder.json and
// vocab.bpe byte for byte.
TEST(ExportTest, HuggingFaceFormatCarriesTheTokenizerOfATokenJob) {
  const std::string dir = TestDir("hf_tokenizer");
  JobSpec spec = Spec();
  spec.mutable_model()->set_vocab_size(264);
  spec.mutable_data()->set_format(TOKEN_SHARDS);
  spec.mutable_data()->set_train_shards("train_*.bin");
  spec.mutable_data()->set_val_shards("val_*.bin");
  auto shards = Shards(spec, dir);
  for (auto& s : shards) ASSERT_TRUE(s->WriteCheckpoint().ok());
  const std::string vocab = dir + "/vocab";
  std::filesystem::create_directories(vocab);
  const TestVocab v = MakeTestVocab({{"a", "b"}}, {"<|endoftext|>"});
  std::ofstream(vocab + "/encoder.json") << v.encoder_json;
  std::ofstream(vocab + "/vocab.bpe") << v.vocab_bpe;

  auto exported = ExportCheckpoint(dir, 0, dir + "/hf", Hf(vocab));
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->tokenizer,
            "GPT-2's tokenizer from " + vocab +
                " (258 tokens): vocab.json, merges.txt, "
                "tokenizer_config.json");
  EXPECT_EQ(ReadAll(dir + "/hf/vocab.json"), v.encoder_json);
  EXPECT_EQ(ReadAll(dir + "/hf/merges.txt"), v.vocab_bpe);
  const std::string config = ReadAll(dir + "/hf/tokenizer_config.json");
  EXPECT_NE(config.find("\"model_max_length\": 4,"), std::string::npos)
      << config;
  EXPECT_NE(config.find("\"eos_token\": \"<|endoftext|>\""),
            std::string::npos)
      << config;

  // A tokenizer larger than the model's vocabulary is not the job's: an
  // error when named, left out (and said) when it is the default's.
  spec.mutable_model()->set_vocab_size(200);
  auto small = Shards(spec, dir + "/small");
  for (auto& s : small) ASSERT_TRUE(s->WriteCheckpoint().ok());
  auto named = ExportCheckpoint(dir + "/small", 0, dir + "/hf_small",
                                Hf(vocab));
  EXPECT_EQ(named.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(named.status().message().find(
                "has 258 tokens, more than the model's vocab_size 200"),
            std::string::npos)
      << named.status();
  EXPECT_FALSE(std::filesystem::exists(dir + "/hf_small"));

  auto missing = ExportCheckpoint(dir, 0, dir + "/hf_missing",
                                  Hf(dir + "/no_such_folder"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("--tokenizer_dir: cannot read " +
                                            dir + "/no_such_folder/"),
            std::string::npos)
      << missing.status();

  // Not named: the job's data.tokenizer_dir, here without the files.
  spec.mutable_model()->set_vocab_size(264);
  spec.mutable_data()->set_tokenizer_dir(dir + "/no_such_folder");
  auto unnamed_shards = Shards(spec, dir + "/unnamed");
  for (auto& s : unnamed_shards) ASSERT_TRUE(s->WriteCheckpoint().ok());
  auto unnamed =
      ExportCheckpoint(dir + "/unnamed", 0, dir + "/hf_unnamed", Hf());
  ASSERT_TRUE(unnamed.ok()) << unnamed.status();
  EXPECT_EQ(unnamed->tokenizer,
            "no tokenizer files: GPT-2's vocabulary is not in " + dir +
                "/no_such_folder (scripts/install_deps.sh installs it; or "
                "--tokenizer_dir)");
  EXPECT_TRUE(std::filesystem::exists(dir + "/hf_unnamed/model.safetensors"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/hf_unnamed/vocab.json"));
}

TEST(ExportTest, FormatNames) {
  EXPECT_EQ(*ParseExportFormat("lmps"), ExportFormat::kLmps);
  EXPECT_EQ(*ParseExportFormat("hf"), ExportFormat::kHuggingFace);
  auto bad = ParseExportFormat("onnx");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("hf"), std::string::npos);
}

TEST(ExportTest, IncompleteStepsAreSkippedOrReported) {
  const std::string dir = TestDir("incomplete");
  const JobSpec spec = Spec();
  auto shards = Shards(spec, dir);
  for (auto& s : shards) ASSERT_TRUE(s->WriteCheckpoint().ok());
  // Step 0 is complete; a later step exists only for shard 0.
  ShardCheckpoint later = shards[0]->Snapshot();
  later.header.step = 9;
  ASSERT_TRUE(WriteShardCheckpoint(dir, later).ok());
  EXPECT_EQ(*LatestCompleteStep(dir), 0);
  auto model = AssembleCheckpoint(dir, 9);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(model.status().message().find("step_00000009/shard_1.ckpt"),
            std::string::npos)
      << model.status();
  EXPECT_EQ(LatestCompleteStep(dir + "/nothing").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace lmps
