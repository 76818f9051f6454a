// ParameterShard with compressed push slices (train.compression; the
// encodings of server/tensor_codec.h): sparse and int8 slices decode to the
// same gradient as the dense push of their values, and every malformed one
// is refused with InvalidArgument, changing nothing.
#include <cstring>

#include "server/shard_test_util.h"

namespace lmps {
namespace shard_test {
namespace {

using Code = absl::StatusCode;

std::vector<float> DenseValues(const ChunkSlice& s) {
  std::vector<float> v(s.data().size() / 4);
  DecodePayload(F32, s.data(), v.data());
  return v;
}

// The dense F32 slice as a sparse one holding its nonzero values.
void MakeSparse(ChunkSlice* s) {
  const std::vector<float> v = DenseValues(*s);
  std::string indices, data;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v[i] == 0) continue;
    const uint32_t index = static_cast<uint32_t>(i);
    indices.append(reinterpret_cast<const char*>(&index), 4);
    data.append(reinterpret_cast<const char*>(&v[i]), 4);
  }
  s->set_sparse(true);
  s->set_num_elements(static_cast<int64_t>(v.size()));
  s->set_indices(indices);
  s->set_data(data);
}

// The dense F32 slice as INT8 with scale 2^-7: values rounded to it (exact
// in fp32), and `rounded` the dense slice of the same values.
void MakeInt8(ChunkSlice* s, ChunkSlice* rounded) {
  const float scale = 1.0f / 128;
  const std::vector<float> v = DenseValues(*s);
  std::string q(v.size(), '\0');
  std::vector<float> back(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const int x = static_cast<int>(std::lrint(v[i] / scale));
    q[i] = static_cast<char>(static_cast<int8_t>(x));
    back[i] = static_cast<float>(x) * scale;
  }
  *rounded = *s;
  rounded->clear_data();
  EncodePayload(F32, back.data(), static_cast<int64_t>(back.size()),
                rounded->mutable_data());
  s->set_dtype(INT8);
  s->set_scale(scale);
  s->set_data(q);
}

// The spec with train.compression of `kind` (ratio 0.1 for the sparse
// kinds).
JobSpec Compressed(JobSpec spec, CompressionKind kind) {
  CompressionConfig* c = spec.mutable_train()->mutable_compression();
  c->set_kind(kind);
  if (kind == TOPK || kind == RANDOMK) c->set_ratio(0.1f);
  return spec;
}

TEST(ShardCompressedTest, SparseAndInt8DecodeLikeTheDensePush) {
  const JobSpec spec = Spec(1, 2, ADAMW);
  // Sparse: exactly the dense gradient (its zeros left out).
  {
    auto dense = MakeShard(Options(spec, 0));
    auto sparse = MakeShard(Options(Compressed(spec, TOPK), 0));
    std::vector<PushRequest> s = Stream(*sparse, 0, 0);
    for (PushRequest& m : s) {
      for (ChunkSlice& slice : *m.mutable_slices()) MakeSparse(&slice);
    }
    ASSERT_TRUE(dense->Push(Stream(*dense, 0, 0)).ok());
    auto r = sparse->Push(s);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(*dense->GradNorm(0, Soon()), *sparse->GradNorm(0, Soon()));
    dense->Apply(0, 1.0).IgnoreError();
    sparse->Apply(0, 1.0).IgnoreError();
    EXPECT_EQ(Bytes(dense->Snapshot()), Bytes(sparse->Snapshot()));
  }
  // INT8: exactly the dense push of q * scale.
  {
    auto dense = MakeShard(Options(spec, 0));
    auto quantised = MakeShard(Options(Compressed(spec, QUANT_INT8), 0));
    std::vector<PushRequest> q = Stream(*quantised, 0, 0);
    std::vector<PushRequest> d = q;
    for (size_t m = 0; m < q.size(); ++m) {
      for (int i = 0; i < q[m].slices_size(); ++i) {
        MakeInt8(q[m].mutable_slices(i), d[m].mutable_slices(i));
      }
    }
    ASSERT_TRUE(dense->Push(d).ok());
    auto r = quantised->Push(q);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(*dense->GradNorm(0, Soon()), *quantised->GradNorm(0, Soon()));
  }
}

TEST(ShardCompressedTest, MalformedCompressedSlicesAreRefused) {
  const JobSpec spec = Compressed(Spec(1, 2, ADAMW), TOPK);
  auto shard = MakeShard(Options(spec, 0));
  std::vector<PushRequest> good = Stream(*shard, 0, 0);
  for (PushRequest& m : good) {
    for (ChunkSlice& slice : *m.mutable_slices()) MakeSparse(&slice);
  }
  ChunkSlice& first = *good[0].mutable_slices(0);
  ASSERT_GE(first.indices().size(), 8u);
  auto index = [](std::vector<PushRequest>* s, int i, uint32_t v) {
    std::memcpy(s->at(0).mutable_slices(0)->mutable_indices()->data() + 4 * i,
                &v, 4);
  };
  auto s = good;
  index(&s, 0, static_cast<uint32_t>(first.num_elements()));
  ExpectRejected(shard.get(), s, Code::kInvalidArgument,
                 "is not below num_elements");
  s = good;
  index(&s, 1, 0);  // == the first index (0 or more): not increasing
  index(&s, 0, 0);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument,
                 "not strictly increasing");
  s = good;
  s[0].mutable_slices(0)->mutable_indices()->push_back('x');
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "multiple of 4");
  s = good;
  s[0].mutable_slices(0)->mutable_data()->resize(first.data().size() - 4);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "indices but");
  s = good;
  s[0].mutable_slices(0)->set_num_elements(first.num_elements() - 1);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "");  // tiling
  s = good;
  s[0].mutable_slices(0)->set_num_elements(-1);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "num_elements -1");
  s = good;
  s[0].mutable_slices(0)->set_num_elements(int64_t{1} << 40);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "outside [0, 2^32]");
  s = good;
  s[0].mutable_slices(0)->set_scale(0.5f);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "for INT8 only");
  s = good;
  s[0].mutable_slices(0)->set_sparse(false);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument, "is not sparse");
  // A NaN value in a sparse slice is named by its element.
  s = good;
  const float nan = NAN;
  std::memcpy(s[0].mutable_slices(0)->mutable_data()->data() + 4, &nan, 4);
  uint32_t at;
  std::memcpy(&at, first.indices().data() + 4, 4);
  ExpectRejected(shard.get(), s, Code::kInvalidArgument,
                 absl::StrCat("element ", first.offset() + at));
  // INT8 scales.
  for (const float scale : {NAN, INFINITY, -1.0f, 3e38f}) {
    s = good;
    ChunkSlice* q = s[0].mutable_slices(0);
    q->set_dtype(INT8);
    q->set_data(std::string(q->indices().size() / 4, '\x7f'));
    q->set_scale(scale);
    ExpectRejected(shard.get(), s, Code::kInvalidArgument, "INT8 scale");
  }
  // The good stream is still accepted after all that.
  auto r = shard->Push(good);
  ASSERT_TRUE(r.ok()) << r.status();
  // Pulls are unchanged: INT8 is not a pull dtype.
  PullRequest pull = PullFor(0);
  pull.set_dtype(INT8);
  auto pulled = shard->Pull(pull, Soon());
  EXPECT_EQ(pulled.status().code(), Code::kInvalidArgument)
      << pulled.status();
}

// A slice in another form than the job's kind sends is refused, naming
// both, and changes nothing; the right form is then accepted.
TEST(ShardCompressedTest, SlicesOfAnotherCompressionKindAreRefused) {
  const JobSpec base = Spec(1, 2, ADAMW);
  struct Case {
    CompressionKind job;
    const char* sent;  // "dense", "bf16", "sparse", "int8"
    const char* message;
  };
  const Case cases[] = {
      {COMPRESSION_NONE, "sparse", "sparse F32 slice but the job's "
                                   "train.compression is COMPRESSION_NONE"},
      {COMPRESSION_NONE, "int8", "dense INT8 slice"},
      {TOPK, "dense", "dense F32 slice but the job's train.compression is "
                      "TOPK, which sends sparse F32"},
      {RANDOMK, "bf16", "dense BF16 slice"},
      {RANDOMK, "int8", "dense INT8 slice"},
      {QUANT_INT8, "sparse", "which sends dense INT8"},
      {QUANT_INT8, "dense", "dense F32 slice"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrCat(CompressionKind_Name(c.job), " <- ", c.sent));
    auto shard = MakeShard(Options(Compressed(base, c.job), 0));
    std::vector<PushRequest> bad = Stream(*shard, 0, 0);
    std::vector<PushRequest> good = bad;
    for (size_t m = 0; m < bad.size(); ++m) {
      for (int i = 0; i < bad[m].slices_size(); ++i) {
        ChunkSlice* b = bad[m].mutable_slices(i);
        ChunkSlice* g = good[m].mutable_slices(i);
        ChunkSlice rounded;
        const std::string sent = c.sent;
        if (sent == "sparse") MakeSparse(b);
        if (sent == "int8") MakeInt8(b, &rounded);
        if (sent == "bf16") {
          const std::vector<float> v = DenseValues(*b);
          b->clear_data();
          b->set_dtype(BF16);
          EncodePayload(BF16, v.data(), static_cast<int64_t>(v.size()),
                        b->mutable_data());
        }
        if (c.job == TOPK || c.job == RANDOMK) MakeSparse(g);
        if (c.job == QUANT_INT8) MakeInt8(g, &rounded);
      }
    }
    ExpectRejected(shard.get(), bad, Code::kInvalidArgument, c.message);
    auto r = shard->Push(good);
    EXPECT_TRUE(r.ok()) << r.status();
  }
}

}  // namespace
}  // namespace shard_test
}  // namespace lmps
