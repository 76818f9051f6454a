#include "common/shm/payloads.h"

#include <cstring>

#include "gtest/gtest.h"

namespace lmps {
namespace {

TEST(SharedPayloadsTest, AttachPointsIntoTheRegionAndChecksRanges) {
  auto region = SharedRegion::Create(1 << 16);
  ASSERT_TRUE(region.ok());
  const int64_t at = SharedRegion::kHeaderBytes + 128;
  std::memcpy((*region)->data() + at, "0123456789abcdef", 16);
  std::vector<ChunkSliceView> slices(2);
  slices[0].tensor = "wte";
  slices[0].data.Append("inline");  // untouched
  slices[1].tensor = "wpe";
  slices[1].shm_offset = at;
  slices[1].shm_bytes = 16;
  EXPECT_TRUE(HasSharedPayloads(slices));
  ASSERT_TRUE(AttachSharedPayloads(**region, &slices).ok());
  EXPECT_EQ(slices[0].data.ToString(), "inline");
  EXPECT_EQ(slices[1].data.ToString(), "0123456789abcdef");
  EXPECT_EQ(slices[1].data.parts()[0].data(), (*region)->data() + at);

  std::vector<ChunkSliceView> both(1);
  both[0].data.Append("x");
  both[0].shm_offset = at;
  both[0].shm_bytes = 4;
  EXPECT_EQ(AttachSharedPayloads(**region, &both).code(),
            absl::StatusCode::kInvalidArgument);
  for (int64_t offset : {int64_t{0}, (*region)->size() - 8, int64_t{-5}}) {
    std::vector<ChunkSliceView> out(1);
    out[0].shm_offset = offset;
    out[0].shm_bytes = 16;
    EXPECT_EQ(AttachSharedPayloads(**region, &out).code(),
              absl::StatusCode::kInvalidArgument)
        << offset;
  }
  EXPECT_FALSE(HasSharedPayloads(std::vector<ChunkSliceView>(3)));
}

TEST(SharedPayloadsTest, InlineCopiesAndClears) {
  auto region = SharedRegion::Create(4096);
  ASSERT_TRUE(region.ok());
  const int64_t at = SharedRegion::kHeaderBytes;
  std::memcpy((*region)->data() + at, "abcd", 4);
  ChunkSlice s;
  s.set_shm_offset(at);
  s.set_shm_bytes(4);
  ASSERT_TRUE(InlineSharedPayloads(**region, &s).ok());
  EXPECT_EQ(s.data(), "abcd");
  EXPECT_EQ(s.shm_bytes(), 0);
  EXPECT_EQ(s.shm_offset(), 0);
  ChunkSlice bad;
  bad.set_shm_offset(at + 4090);
  bad.set_shm_bytes(8);
  EXPECT_EQ(InlineSharedPayloads(**region, &bad).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SharedPayloadSpan(1), 16);
  EXPECT_EQ(SharedPayloadSpan(16), 16);
  EXPECT_EQ(SharedPayloadSpan(17), 32);
  EXPECT_EQ(SharedPayloadSpan(0), 0);
}

}  // namespace
}  // namespace lmps
