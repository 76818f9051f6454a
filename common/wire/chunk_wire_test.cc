#include "common/wire/chunk_wire.h"

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "proto/lmps.pb.h"

namespace lmps {
namespace {

std::string RandomBytes(std::mt19937* rng, size_t n) {
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>((*rng)() & 0xff);
  return s;
}

// A ChunkSlice with random fields, some left at their defaults (which
// protobuf omits), negative values included.
ChunkSlice RandomSlice(std::mt19937* rng) {
  ChunkSlice s;
  auto maybe = [&] { return (*rng)() % 3 != 0; };
  if (maybe()) s.set_tensor("h." + std::to_string((*rng)() % 100) + ".w");
  if (maybe()) s.set_chunk(static_cast<int32_t>((*rng)() % 2000) - 3);
  if (maybe()) s.set_offset(static_cast<int64_t>((*rng)()) * 977 - 5);
  if (maybe()) s.set_dtype(static_cast<DType>((*rng)() % 4));
  if (maybe()) s.set_data(RandomBytes(rng, (*rng)() % 3000));
  if (maybe()) s.set_sparse(true);
  if (maybe()) s.set_num_elements((*rng)() % 100000);
  if (maybe()) s.set_indices(RandomBytes(rng, 4 * ((*rng)() % 40)));
  if (maybe()) s.set_scale(((*rng)() % 2 ? -0.0f : 0.37f * ((*rng)() % 9)));
  const int states = (*rng)() % 3;
  for (int k = 0; k < states; ++k) {
    *s.add_state() = RandomBytes(rng, (*rng)() % 50);
  }
  if (maybe()) {
    s.set_shm_offset(4096 + (*rng)() % 100000);
    s.set_shm_bytes((*rng)() % 100000);
  }
  return s;
}

ChunkSliceOut ToOut(const ChunkSlice& s) {
  ChunkSliceOut o;
  o.tensor = s.tensor();
  o.chunk = s.chunk();
  o.offset = s.offset();
  o.dtype = s.dtype();
  o.data = grpc::Slice(s.data());
  o.sparse = s.sparse();
  o.num_elements = s.num_elements();
  o.indices = grpc::Slice(s.indices());
  o.scale = s.scale();
  for (const std::string& b : s.state()) o.state.emplace_back(b);
  o.shm_offset = s.shm_offset();
  o.shm_bytes = s.shm_bytes();
  return o;
}

std::string Flatten(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(b.Dump(&slices).ok());
  std::string out;
  for (const grpc::Slice& s : slices) {
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return out;
}

// `bytes` cut into slices at random points (empty slices too), as a
// received buffer may be.
grpc::ByteBuffer Cut(const std::string& bytes, std::mt19937* rng) {
  std::vector<grpc::Slice> slices;
  size_t at = 0;
  while (at < bytes.size()) {
    const size_t n = std::min<size_t>(bytes.size() - at, (*rng)() % 40);
    slices.emplace_back(bytes.data() + at, n);
    at += n;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

ChunkSlice FromView(const ChunkSliceView& v) {
  ChunkSlice s;
  s.set_tensor(v.tensor);
  s.set_chunk(v.chunk);
  s.set_offset(v.offset);
  s.set_dtype(v.dtype);
  s.set_data(v.data.ToString());
  s.set_sparse(v.sparse);
  s.set_num_elements(v.num_elements);
  s.set_indices(v.indices.ToString());
  s.set_scale(v.scale);
  for (const ByteSpans& b : v.state) *s.add_state() = b.ToString();
  s.set_shm_offset(v.shm_offset);
  s.set_shm_bytes(v.shm_bytes);
  return s;
}

TEST(ChunkWireTest, SerializesExactlyWhatProtobufDoes) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    PullResponse pull;
    if (trial % 4) pull.set_version(static_cast<int64_t>(rng()) - 9);
    PushRequest push;
    push.set_worker_id(trial % 5 ? "worker-" + std::to_string(trial) : "");
    push.set_dp_rank(trial % 7);
    push.set_step(static_cast<int64_t>(rng() % 100000));
    push.set_partition_version(trial % 3 ? 0xfedcba9876543210ull >> (trial % 60)
                                         : 0);
    push.set_pp_rank(trial % 2);
    push.set_tp_rank(trial % 3 == 1 ? -1 : trial % 3);
    if (trial % 2) {
      push.mutable_shm()->set_path("/proc/12/fd/" + std::to_string(trial));
      push.mutable_shm()->set_token(RandomBytes(&rng, 16));
      push.mutable_shm()->set_size(1 << 20);
    }
    if (trial % 3 == 0) pull.set_next_message(trial % 17);
    push.set_then(static_cast<PushThen>(trial % 3));
    if (trial % 4 == 2) {
      push.mutable_then_pull()->set_step(trial + 1);
      push.mutable_then_pull()->set_shm_offset(4096 * trial);
      push.mutable_then_pull()->set_shm_bytes(1 << 20);
    }
    std::vector<ChunkSliceOut> outs;
    const int n = static_cast<int>(rng() % 5);
    for (int k = 0; k < n; ++k) {
      const ChunkSlice s = RandomSlice(&rng);
      *pull.add_slices() = s;
      *push.add_slices() = s;
      outs.push_back(ToOut(s));
    }
    EXPECT_EQ(Flatten(SerializePullResponse(pull.version(), outs,
                                            pull.next_message())),
              pull.SerializeAsString())
        << "trial " << trial;
    EXPECT_EQ(Flatten(SerializePushRequest(ViewOf(push).header, outs)),
              push.SerializeAsString())
        << "trial " << trial;
  }
}

TEST(ChunkWireTest, ParsesProtobufBytesCutAnywhere) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    PullResponse pull;
    pull.set_version(trial * 1000003ll - 7);
    PushRequest push;
    push.set_worker_id("w" + std::to_string(trial));
    push.set_dp_rank(trial % 4);
    push.set_step(trial);
    push.set_partition_version(~0ull - trial);
    push.set_pp_rank(trial % 3);
    push.set_tp_rank(-(trial % 2));
    if (trial % 2) {
      push.mutable_shm()->set_path("/proc/3/fd/7");
      push.mutable_shm()->set_token(RandomBytes(&rng, 16));
      push.mutable_shm()->set_size(trial);
    }
    pull.set_next_message(trial % 5);
    push.set_then(static_cast<PushThen>(trial % 3));
    if (trial % 3 == 2) {
      push.mutable_then_pull()->set_step(trial + 1);
      push.mutable_then_pull()->set_first_message(0);
      push.mutable_then_pull()->mutable_shm()->set_path("/proc/3/fd/8");
    }
    const int n = static_cast<int>(rng() % 5);
    for (int k = 0; k < n; ++k) {
      const ChunkSlice s = RandomSlice(&rng);
      *pull.add_slices() = s;
      *push.add_slices() = s;
    }
    PullResponseView pv;
    ASSERT_TRUE(ParsePullResponse(Cut(pull.SerializeAsString(), &rng), &pv).ok());
    PullResponse back;
    back.set_version(pv.version);
    back.set_next_message(pv.next_message);
    for (const ChunkSliceView& v : pv.slices) *back.add_slices() = FromView(v);
    EXPECT_EQ(back.SerializeAsString(), pull.SerializeAsString());

    PushRequestView qv;
    ASSERT_TRUE(ParsePushRequest(Cut(push.SerializeAsString(), &rng), &qv).ok());
    PushRequest again;
    again.set_worker_id(qv.header.worker_id);
    again.set_dp_rank(qv.header.dp_rank);
    again.set_step(qv.header.step);
    again.set_partition_version(qv.header.partition_version);
    again.set_pp_rank(qv.header.pp_rank);
    again.set_tp_rank(qv.header.tp_rank);
    if (!qv.header.shm.empty()) {
      ASSERT_TRUE(again.mutable_shm()->ParseFromString(qv.header.shm));
    }
    again.set_then(qv.header.then);
    if (!qv.header.then_pull.empty()) {
      ASSERT_TRUE(
          again.mutable_then_pull()->ParseFromString(qv.header.then_pull));
    }
    for (const ChunkSliceView& v : qv.slices) *again.add_slices() = FromView(v);
    EXPECT_EQ(again.SerializeAsString(), push.SerializeAsString());
  }
}

TEST(ChunkWireTest, PeerMessagesMatchProtobufBothWays) {
  std::mt19937 rng(17);
  for (int trial = 0; trial < 300; ++trial) {
    PeerMessage m;
    auto maybe = [&] { return rng() % 3 != 0; };
    if (maybe()) m.set_kind(static_cast<PeerKind>(rng() % 4));
    if (maybe()) m.set_eval(true);
    if (maybe()) m.set_step(static_cast<int64_t>(rng()) - 100);
    if (maybe()) m.set_micro_batch(static_cast<int32_t>(rng() % 9) - 1);
    if (maybe()) m.set_seq(static_cast<int32_t>(rng() % 50));
    if (maybe()) m.set_round(static_cast<int32_t>(rng() % 7));
    if (maybe()) m.set_sender("worker-" + std::to_string(rng() % 10));
    if (maybe()) m.set_total_elements(rng() % 100000);
    if (maybe()) m.set_offset(rng() % 100000);
    if (maybe()) m.set_data(RandomBytes(&rng, rng() % 3000));
    if (maybe()) {
      m.mutable_shm()->set_path("/proc/9/fd/" + std::to_string(rng() % 99));
      m.mutable_shm()->set_token(RandomBytes(&rng, 16));
      m.mutable_shm()->set_size(rng() % 100000);
      m.set_shm_offset(4096 + rng() % 1000);
      m.set_shm_bytes(rng() % 1000);
    }
    const PeerMessageView in = ViewOf(m);
    EXPECT_EQ(Flatten(SerializePeerMessage(in.header, grpc::Slice(m.data()))),
              m.SerializeAsString())
        << "trial " << trial;
    PeerMessageView v;
    ASSERT_TRUE(ParsePeerMessage(Cut(m.SerializeAsString(), &rng), &v).ok());
    PeerMessage back;
    back.set_kind(v.header.kind);
    back.set_eval(v.header.eval);
    back.set_step(v.header.step);
    back.set_micro_batch(v.header.micro_batch);
    back.set_seq(v.header.seq);
    back.set_round(v.header.round);
    back.set_sender(v.header.sender);
    back.set_total_elements(v.header.total_elements);
    back.set_offset(v.header.offset);
    back.set_data(v.data.ToString());
    if (!v.header.shm.empty()) {
      ASSERT_TRUE(back.mutable_shm()->ParseFromString(v.header.shm));
    }
    back.set_shm_offset(v.header.shm_offset);
    back.set_shm_bytes(v.header.shm_bytes);
    EXPECT_EQ(back.SerializeAsString(), m.SerializeAsString());
  }
}

TEST(ChunkWireTest, SkipsUnknownFieldsAndAcceptsAnyFieldOrder) {
  // version written after a slice, and unknown fields of every wire type.
  std::string bytes;
  ChunkSlice s;
  s.set_tensor("wte");
  s.set_data("abcd");
  std::string slice = s.SerializeAsString();
  slice += std::string("\xa8\x01\x05", 3);  // field 21 varint
  slice += std::string("\xb1\x01", 2) + std::string(8, 'x');  // 22 fixed64
  slice += std::string("\xbd\x01", 2) + std::string(4, 'y');  // 23 fixed32
  bytes += '\x12';
  bytes += static_cast<char>(slice.size());
  bytes += slice;
  bytes += std::string("\x22\x03xyz", 5);  // field 4 bytes, unknown
  bytes += std::string("\x08\x2a", 2);     // version 42
  std::mt19937 rng(3);
  PullResponseView v;
  ASSERT_TRUE(ParsePullResponse(Cut(bytes, &rng), &v).ok());
  EXPECT_EQ(v.version, 42);
  ASSERT_EQ(v.slices.size(), 1u);
  EXPECT_EQ(v.slices[0].tensor, "wte");
  EXPECT_EQ(v.slices[0].data.ToString(), "abcd");
}

TEST(ChunkWireTest, RefusesTruncatedAndMalformedMessagesAsProtobufDoes) {
  std::mt19937 rng(5);
  PushRequest push;
  push.set_worker_id("worker-1");
  push.set_step(12);
  for (int k = 0; k < 3; ++k) *push.add_slices() = RandomSlice(&rng);
  const std::string bytes = push.SerializeAsString();
  int refused = 0;
  for (size_t len = 0; len < bytes.size(); ++len) {
    const std::string prefix = bytes.substr(0, len);
    PushRequest reference;
    const bool valid = reference.ParseFromString(prefix);
    PushRequestView v;
    const absl::Status s = ParsePushRequest(Cut(prefix, &rng), &v);
    EXPECT_EQ(s.ok(), valid) << "prefix of " << len << " bytes: " << s;
    if (!s.ok()) {
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
      ++refused;
    }
  }
  EXPECT_GT(refused, 0);
  for (const std::string& bad :
       {std::string("\x00", 1), std::string("\x0f\x01", 2),
        std::string("\x2a\xff\xff\xff\xff\x0f", 6),
        std::string("\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 12)}) {
    PushRequestView v;
    EXPECT_EQ(ParsePushRequest(Cut(bad, &rng), &v).code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST(ChunkWireTest, ForEachElementsJoinsElementsSplitBetweenParts) {
  std::vector<float> values(1000);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.5f * i - 3;
  std::string bytes(reinterpret_cast<const char*>(values.data()),
                    values.size() * 4);
  std::mt19937 rng(9);
  for (int trial = 0; trial < 50; ++trial) {
    ByteSpans spans;
    size_t at = 0;
    while (at < bytes.size()) {
      const size_t n = std::min<size_t>(bytes.size() - at, rng() % 23);
      spans.Append(absl::string_view(bytes.data() + at, n));
      at += n;
    }
    std::vector<float> out(values.size(), -1);
    int64_t expect_first = 0;
    spans.ForEachElements(4, [&](const char* p, int64_t first, int64_t n) {
      EXPECT_EQ(first, expect_first);
      std::memcpy(out.data() + first, p, n * 4);
      expect_first = first + n;
    });
    EXPECT_EQ(expect_first, static_cast<int64_t>(values.size()));
    EXPECT_EQ(out, values);
  }
}

TEST(ChunkWireTest, PayloadSlicesAreReferencedNotCopied) {
  grpc::Slice data = NewPayloadSlice(1 << 20);
  std::memset(MutableBytes(&data), 7, data.size());
  ChunkSliceOut c;
  c.tensor = "wte";
  c.dtype = F32;
  c.data = data;
  const grpc::ByteBuffer b = SerializePullResponse(3, {c});
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(b.Dump(&slices).ok());
  bool found = false;
  for (const grpc::Slice& s : slices) found |= s.begin() == data.begin();
  EXPECT_TRUE(found) << "the payload slice was copied";
  PullResponseView v;
  ASSERT_TRUE(ParsePullResponse(b, &v).ok());
  ASSERT_EQ(v.slices.size(), 1u);
  ASSERT_EQ(v.slices[0].data.parts().size(), 1u);
  EXPECT_EQ(v.slices[0].data.parts()[0].data(),
            reinterpret_cast<const char*>(data.begin()));
}

}  // namespace
}  // namespace lmps
