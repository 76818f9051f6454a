#include "common/formats/safetensors.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "gtest/gtest.h"

namespace lmps {
namespace {

std::vector<SafeTensor> Sample() {
  return {{"wte.weight", {2, 3}, {1, 2, 3, 4, 5, 6.5f}},
          {"ln_f.bias", {4}, {-1, 0, 1e-30f, 3e38f}},
          {"scalar", {}, {42}},
          {"empty", {0, 5}, {}}};
}

std::string TempPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

// Rebuilds a file from a hand-written header and data buffer.
std::string Raw(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + data;
}

std::string Floats(std::vector<float> v) {
  return std::string(reinterpret_cast<const char*>(v.data()), 4 * v.size());
}

TEST(SafetensorsTest, RoundTripInMemory) {
  auto bytes = SerializeSafetensors(Sample(), {{"format", "pt"}});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  // Header length, then the JSON, padded to 8 bytes.
  uint64_t n;
  std::memcpy(&n, bytes->data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ((*bytes)[8], '{');
  auto parsed = ParseSafetensors(*bytes);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->tensors.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(parsed->tensors[i].name, Sample()[i].name);
    EXPECT_EQ(parsed->tensors[i].shape, Sample()[i].shape);
    EXPECT_EQ(parsed->tensors[i].data, Sample()[i].data);
  }
  EXPECT_EQ(parsed->metadata.at("format"), "pt");
  ASSERT_NE(parsed->Find("ln_f.bias"), nullptr);
  EXPECT_EQ(parsed->Find("nope"), nullptr);
}

TEST(SafetensorsTest, HeaderIsTheDocumentedJson) {
  auto bytes = SerializeSafetensors({{"a", {2}, {1, 2}}, {"b", {1}, {3}}});
  ASSERT_TRUE(bytes.ok());
  uint64_t n;
  std::memcpy(&n, bytes->data(), 8);
  std::string header = bytes->substr(8, n);
  while (!header.empty() && header.back() == ' ') header.pop_back();
  EXPECT_EQ(header,
            "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
            "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}");
}

TEST(SafetensorsTest, RoundTripFile) {
  const std::string path = TempPath("rt.safetensors");
  ASSERT_TRUE(WriteSafetensorsFile(path, Sample()).ok());
  auto parsed = ReadSafetensorsFile(path);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->tensors.size(), 4u);
  EXPECT_EQ(parsed->Find("wte.weight")->data, Sample()[0].data);
  EXPECT_TRUE(parsed->metadata.empty());
}

TEST(SafetensorsTest, ReadsHandWrittenFileInAnyKeyOrder) {
  // Keys out of data order, escapes and whitespace, as other writers emit.
  std::string header =
      "{ \"b\" : {\"shape\": [1], \"data_offsets\": [8, 12], \"dtype\": "
      "\"F32\"},\n \"__metadata__\": {\"k\\u00e9y\": \"v\\\"\"},"
      "\"a\\/x\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, "
      "8]}}   ";
  auto parsed = ParseSafetensors(Raw(header, Floats({1, 2, 3})));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->tensors.size(), 2u);
  EXPECT_EQ(parsed->tensors[0].name, "a/x");  // file order
  EXPECT_EQ(parsed->tensors[0].data, (std::vector<float>{1, 2}));
  EXPECT_EQ(parsed->tensors[1].data, (std::vector<float>{3}));
  EXPECT_EQ(parsed->metadata.at("k\xc3\xa9y"), "v\"");
}

void ExpectWriterError(const std::vector<SafeTensor>& tensors,
                       const std::string& needle) {
  absl::StatusOr<std::string> bytes = SerializeSafetensors(tensors);
  ASSERT_FALSE(bytes.ok()) << "expected error containing: " << needle;
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument)
      << bytes.status();
  EXPECT_NE(bytes.status().message().find(needle), std::string::npos)
      << bytes.status() << "; want: " << needle;
}

TEST(SafetensorsTest, WriterRejectsBadInput) {
  ExpectWriterError({{"a", {3}, {1, 2}}},
                    "tensor 'a' has shape [3] (3 elements) but 2 values");
  ExpectWriterError({{"a", {1}, {1}}, {"a", {1}, {1}}}, "tensor 'a' appears twice");
  ExpectWriterError({{"", {1}, {1}}}, "invalid tensor name ''");
  ExpectWriterError({{"a", {-1}, {}}}, "tensor 'a' has a negative dimension");
}

// A corrupt file is DataLoss (an unsupported dtype InvalidArgument) with a
// message naming the file and what is wrong.
void ExpectError(const std::string& bytes, const std::string& needle,
                 absl::StatusCode code = absl::StatusCode::kDataLoss) {
  auto parsed = ParseSafetensors(bytes, "f.safetensors");
  ASSERT_FALSE(parsed.ok()) << "expected error containing: " << needle;
  EXPECT_EQ(parsed.status().code(), code) << parsed.status();
  EXPECT_NE(parsed.status().message().find(needle), std::string::npos)
      << parsed.status();
  EXPECT_NE(parsed.status().message().find("f.safetensors"), std::string::npos)
      << parsed.status();
}

TEST(SafetensorsTest, CorruptFilesGiveClearErrors) {
  const std::string ok_header =
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
  ASSERT_TRUE(ParseSafetensors(Raw(ok_header, Floats({1, 2}))).ok());

  ExpectError("abc", "shorter than the 8-byte");
  // Header length past the end of the file.
  std::string truncated = Raw(ok_header, Floats({1, 2}));
  ExpectError(truncated.substr(0, 20), "exceeds the file size");
  // Data truncated.
  ExpectError(truncated.substr(0, truncated.size() - 4), "past the data buffer");
  // Extra bytes after the last tensor.
  ExpectError(Raw(ok_header, Floats({1, 2, 3})), "tensors cover 8");
  ExpectError(Raw("{\"a\":", ""), "malformed JSON");
  ExpectError(Raw("[1,2]", ""), "not a JSON object");
  ExpectError(
      Raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}",
          Floats({1, 2})),
      "needs 12 bytes");
  ExpectError(
      Raw("{\"a\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}",
          "abcd"),
      "only F32", absl::StatusCode::kInvalidArgument);
  ExpectError(
      Raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}",
          Floats({1, 2})),
      "bad data_offsets");
  ExpectError(Raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", Floats({1, 2})),
              "lacks dtype");
  ExpectError(
      Raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
          "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
          Floats({1})),
      "overlapping");
  ExpectError(
      Raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
          Floats({1, 2})),
      "overlapping or gap");
  ExpectError(
      Raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}",
          Floats({1})),
      "only integers");
  ExpectError(
      Raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
          "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
          Floats({1, 2})),
      "appears twice");
  ExpectError(Raw("{\"__metadata__\":{\"x\":1}}", ""), "not a string");
}

TEST(SafetensorsTest, OtherDtypesAreListedWhenAsked) {
  // A BOOL mask between two F32 tensors, as in Hugging Face checkpoints.
  const std::string bytes = Raw(
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
      "\"mask\":{\"dtype\":\"BOOL\",\"shape\":[2,2],\"data_offsets\":[4,8]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
      Floats({1, 0, 2}));
  auto strict = ParseSafetensors(bytes, "f.safetensors");
  ASSERT_FALSE(strict.ok());
  EXPECT_NE(strict.status().message().find("'mask' has dtype BOOL"),
            std::string::npos)
      << strict.status();
  SafetensorsReadOptions options;
  options.list_other_dtypes = true;
  auto parsed = ParseSafetensors(bytes, "f.safetensors", options);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->tensors.size(), 2u);
  EXPECT_EQ(parsed->tensors[0].data, std::vector<float>{1});
  EXPECT_EQ(parsed->tensors[1].data, std::vector<float>{2});
  ASSERT_EQ(parsed->others.size(), 1u);
  EXPECT_EQ(parsed->others[0].name, "mask");
  EXPECT_EQ(parsed->others[0].dtype, "BOOL");
  EXPECT_EQ(parsed->others[0].shape, (std::vector<int64_t>{2, 2}));
  // Their sizes are checked like F32's: F16 [3] needs 6 bytes.
  auto bad = ParseSafetensors(
      Raw("{\"h\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,8]}}",
          Floats({1, 2})),
      "f.safetensors", options);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("of F16 needs 6 bytes"),
            std::string::npos)
      << bad.status();
  // Unknown dtypes stay errors.
  auto unknown = ParseSafetensors(
      Raw("{\"q\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,4]}}",
          Floats({1})),
      "f.safetensors", options);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
}

// Every one of the 65536 F16 bit patterns against the definition
// (-1)^s * 2^(e-15) * 1.m, subnormals 2^-14 * 0.m, e = 31 Inf/NaN.
TEST(SafetensorsTest, HalfBitsToFloatIsExactForEveryPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const int sign = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    const float got = HalfBitsToFloat(static_cast<uint16_t>(h));
    if (e == 31) {
      if (m == 0) {
        EXPECT_TRUE(std::isinf(got) && std::signbit(got) == sign) << h;
      } else {
        EXPECT_TRUE(std::isnan(got)) << h;
      }
      continue;
    }
    const double want = (sign ? -1.0 : 1.0) *
                        (e == 0 ? std::ldexp(m, -24)
                                : std::ldexp(1024 + m, e - 25));
    EXPECT_EQ(static_cast<double>(got), want) << h;
    EXPECT_EQ(std::signbit(got), sign == 1) << h;
  }
}

// F16 and BF16 tensors are decoded to fp32 when asked, their dtype kept;
// otherwise they are refused (or listed) as before.
TEST(SafetensorsTest, HalfPrecisionIsWidenedWhenAsked) {
  // F16 [2]: 1.5 (0x3e00), -2^-24 (0x8001); BF16 [2]: 1.0 (0x3f80), -3.0
  // (0xc040); then an F32 [1].
  std::string data;
  for (uint16_t v : {0x3e00, 0x8001, 0x3f80, 0xc040}) {
    data.append(reinterpret_cast<const char*>(&v), 2);
  }
  data += Floats({7});
  const std::string bytes = Raw(
      "{\"h\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]},"
      "\"b\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[4,8]},"
      "\"f\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
      data);
  EXPECT_FALSE(ParseSafetensors(bytes, "f.safetensors").ok());
  SafetensorsReadOptions options;
  options.widen_half = true;
  auto parsed = ParseSafetensors(bytes, "f.safetensors", options);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ASSERT_EQ(parsed->tensors.size(), 3u);
  EXPECT_EQ(parsed->tensors[0].dtype, "F16");
  EXPECT_EQ(parsed->tensors[0].data,
            (std::vector<float>{1.5f, -std::ldexp(1.0f, -24)}));
  EXPECT_EQ(parsed->tensors[1].dtype, "BF16");
  EXPECT_EQ(parsed->tensors[1].data, (std::vector<float>{1.0f, -3.0f}));
  EXPECT_EQ(parsed->tensors[2].dtype, "F32");
  EXPECT_EQ(parsed->tensors[2].data, std::vector<float>{7});
  EXPECT_TRUE(parsed->others.empty());
  // Sizes are still checked: F16 [3] needs 6 bytes.
  auto bad = ParseSafetensors(
      Raw("{\"h\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[0,4]}}",
          Floats({1})),
      "f.safetensors", options);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kDataLoss) << bad.status();
}

// The JSON header parser (nlohmann/json's SAX parser) on hostile input:
// deep nesting, escapes, numbers it must refuse, and random bytes, each an
// error (never a crash or a hang), valid escapes decoded.
TEST(SafetensorsTest, HeaderParserRefusesHostileJson) {
  ExpectError(Raw(std::string(100000, '['), ""), "nested too deeply");
  ExpectError(Raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],"
                  "\"data_offsets\":[0,4]}}", ""),
              "malformed JSON");
  ExpectError(Raw("{\"a\":{\"dtype\":\"F32\",\"shape\":[1e3],"
                  "\"data_offsets\":[0,4]}}", ""),
              "only integers");
  ExpectError(Raw("{\"a\\ud800\":1}", ""), "malformed JSON");  // lone surrogate
  ExpectError(Raw("{\"a\nb\":1}", ""), "malformed JSON");       // raw control char
  ExpectError(Raw("{\"a\":1} x", ""), "malformed JSON");         // trailing text
  // Escapes are decoded: a name with a surrogate pair and a quote.
  auto parsed = ParseSafetensors(
      Raw("{\"\\ud83d\\ude00\\\"\":{\"dtype\":\"F32\",\"shape\":[1],"
          "\"data_offsets\":[0,4]}}",
          Floats({5})));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->tensors[0].name, "\xf0\x9f\x98\x80\"");
  // Random headers: an error or a parse, never a crash.
  uint64_t x = 12345;
  for (int i = 0; i < 3000; ++i) {
    std::string header;
    const int n = 1 + static_cast<int>(x % 64);
    for (int k = 0; k < n; ++k) {
      x = x * 6364136223846793005ULL + 1442695040888963407ULL;
      header.push_back("{}[]\":,0123456789-.eE \\u\"adtypeF32shape"[(x >> 33) % 39]);
    }
    (void)ParseSafetensors(Raw(header, ""));
  }
}

TEST(SafetensorsTest, MissingFileIsNotFound) {
  auto parsed = ReadSafetensorsFile(TempPath("does-not-exist.safetensors"));
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(parsed.status().message().find("does-not-exist"),
            std::string::npos);
}

}  // namespace
}  // namespace lmps
