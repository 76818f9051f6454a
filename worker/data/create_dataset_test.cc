#include "worker/data/create_dataset.h"

#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "common/formats/token_shard.h"
#include "common/model/job_spec.h"
#include "gtest/gtest.h"

namespace lmps {
namespace {

std::string TmpDir() {
  const char* dir = std::getenv("TEST_TMPDIR");
  return dir ? dir : "/tmp";
}

JobSpec Spec(const std::string& text_proto) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(text_proto);
  EXPECT_TRUE(spec.ok()) << spec.status();
  return spec.ok() ? *spec : JobSpec();
}

TEST(CreateDatasetTest, ByteTextIsTheDefault) {
  const std::string path = TmpDir() + "/text.txt";
  std::string text;
  for (int i = 0; i < 2000; ++i) text.push_back(static_cast<char>('a' + i % 26));
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
  }
  JobSpec spec = Spec("data { path: '" + path + "' } model { block_size: 16 }");
  EXPECT_EQ(spec.data().format(), BYTE_TEXT);
  auto ds = CreateDataset(spec);
  ASSERT_TRUE(ds.ok()) << ds.status();
  auto direct = TextDataset::Create(path, 0.1f, 16);
  ASSERT_TRUE(direct.ok());
  std::vector<int32_t> x1(4 * 16), y1(4 * 16), x2(4 * 16), y2(4 * 16);
  (*ds)->Batch(Split::kTrain, 9, 4, 4, 0, 4, x1.data(), y1.data());
  (*direct)->Batch(Split::kTrain, 9, 4, 4, 0, 4, x2.data(), y2.data());
  EXPECT_EQ(x1, x2);
  EXPECT_EQ((*ds)->DecodeSample((*ds)->EncodePrompt("The ")), "The ");
}

TEST(CreateDatasetTest, TokenShards) {
  const std::string dir = TmpDir();
  ASSERT_TRUE(WriteTokenShard(dir + "/t.bin", std::vector<uint16_t>(300, 50256)).ok());
  ASSERT_TRUE(WriteTokenShard(dir + "/v.bin", std::vector<uint16_t>(100, 7)).ok());
  const std::string data = "data { format: TOKEN_SHARDS train_shards: '" + dir +
                           "/t.bin' val_shards: '" + dir + "/v.bin' ";
  JobSpec spec = Spec(data + "} model { block_size: 16 vocab_size: 50257 }");
  auto ds = CreateDataset(spec);
  ASSERT_TRUE(ds.ok()) << ds.status();
  EXPECT_EQ((*ds)->train_tokens(), 300);
  EXPECT_EQ((*ds)->val_tokens(), 100);
  // A token the model cannot hold.
  spec = Spec(data + "} model { block_size: 16 vocab_size: 50000 }");
  ds = CreateDataset(spec);
  ASSERT_FALSE(ds.ok());
  EXPECT_NE(ds.status().message().find("token 50256 at index 0"), std::string::npos)
      << ds.status();
  // A tokenizer folder that is given must be readable.
  spec = Spec(data + "tokenizer_dir: '/nonexistent' } model { block_size: 16 vocab_size: 50257 }");
  ds = CreateDataset(spec);
  ASSERT_FALSE(ds.ok());
  EXPECT_NE(ds.status().message().find("data.tokenizer_dir: cannot read '/nonexistent/encoder.json'"),
            std::string::npos)
      << ds.status();
}

// nanoGPT's headerless train.bin/val.bin give the same batches as llm.c
// shards of the same tokens.
TEST(CreateDatasetTest, RawTokensEqualTokenShards) {
  const std::string dir = TmpDir();
  std::vector<uint16_t> train(500), val(120);
  for (size_t i = 0; i < train.size(); ++i) train[i] = (i * 7919) % 50257;
  for (size_t i = 0; i < val.size(); ++i) val[i] = (i * 104729) % 50257;
  ASSERT_TRUE(WriteTokenShard(dir + "/lt.bin", train).ok());
  ASSERT_TRUE(WriteTokenShard(dir + "/lv.bin", val).ok());
  for (const auto& [name, tokens] :
       {std::pair<std::string, const std::vector<uint16_t>*>{"/rt.bin", &train},
        {"/rv.bin", &val}}) {
    std::ofstream f(dir + name, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(tokens->data()),
            static_cast<std::streamsize>(tokens->size() * 2));
  }
  const std::string model = " model { block_size: 16 vocab_size: 50304 }";
  auto llmc = CreateDataset(Spec(
      "data { format: TOKEN_SHARDS train_shards: '" + dir + "/lt.bin' val_shards: '" +
      dir + "/lv.bin' }" + model));
  auto raw = CreateDataset(Spec(
      "data { format: RAW_TOKENS train_shards: '" + dir + "/rt.bin' val_shards: '" +
      dir + "/rv.bin' }" + model));
  ASSERT_TRUE(llmc.ok()) << llmc.status();
  ASSERT_TRUE(raw.ok()) << raw.status();
  EXPECT_EQ((*raw)->train_tokens(), 500);
  EXPECT_EQ((*raw)->val_tokens(), 120);
  for (Split split : {Split::kTrain, Split::kVal}) {
    std::vector<int32_t> x1(4 * 16), y1(4 * 16), x2(4 * 16), y2(4 * 16);
    (*llmc)->Batch(split, 3, 5, 4, 0, 4, x1.data(), y1.data());
    (*raw)->Batch(split, 3, 5, 4, 0, 4, x2.data(), y2.data());
    EXPECT_EQ(x1, x2);
    EXPECT_EQ(y1, y2);
  }
  // An llm.c shard read as raw tokens has its header's bytes as tokens, and
  // the raw file read as llm.c's fails on the magic.
  EXPECT_FALSE(CreateDataset(Spec("data { format: TOKEN_SHARDS train_shards: '" + dir +
                                  "/rt.bin' val_shards: '" + dir + "/rv.bin' }" + model))
                   .ok());
}

TEST(CreateDatasetTest, SpecValidation) {
  EXPECT_FALSE(ParseJobSpec("data { format: TOKEN_SHARDS }").ok());
  EXPECT_FALSE(ParseJobSpec("data { format: RAW_TOKENS train_shards: 'a' }").ok());
  EXPECT_FALSE(ParseJobSpec("data { format: TOKEN_SHARDS train_shards: 'a' val_shards: 'b' } "
                            "model { vocab_size: 70000 }").ok());
  EXPECT_TRUE(ParseJobSpec("data { format: TOKEN_SHARDS train_shards: 'a' val_shards: 'b' } "
                           "model { vocab_size: 50304 }").ok());
}

}  // namespace
}  // namespace lmps
