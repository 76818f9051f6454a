#include "common/wire/chunk_wire.h"

#include <grpc/slice.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace lmps {
namespace {

// Protobuf wire types.
constexpr int kVarint = 0;
constexpr int kFixed64 = 1;
constexpr int kLengthDelimited = 2;
constexpr int kFixed32 = 5;

void PutVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

void PutTag(int field, int wire_type, std::string* out) {
  PutVarint(static_cast<uint64_t>(field) << 3 | wire_type, out);
}

// proto3 scalars: omitted when 0; negative int32/int64 are 10-byte varints
// (sign-extended), as protobuf writes them.
void PutInt(int field, int64_t v, std::string* out) {
  if (v == 0) return;
  PutTag(field, kVarint, out);
  PutVarint(static_cast<uint64_t>(v), out);
}

void PutString(int field, absl::string_view s, std::string* out) {
  if (s.empty()) return;
  PutTag(field, kLengthDelimited, out);
  PutVarint(s.size(), out);
  out->append(s.data(), s.size());
}

// A message under construction: header bytes and payload slices in order.
class Parts {
 public:
  std::string* header() { return &pending_; }
  void AddSlice(const grpc::Slice& s) {
    Flush();
    slices_.push_back(s);
    size_ += s.size();
  }
  size_t size() const { return size_ + pending_.size(); }
  void AppendTo(Parts* out) {
    Flush();
    for (grpc::Slice& s : slices_) out->AddSlice(s);
  }
  grpc::ByteBuffer Take() {
    Flush();
    return grpc::ByteBuffer(slices_.data(), slices_.size());
  }

 private:
  void Flush() {
    if (pending_.empty()) return;
    size_ += pending_.size();
    slices_.emplace_back(pending_);
    pending_.clear();
  }
  std::vector<grpc::Slice> slices_;
  std::string pending_;
  size_t size_ = 0;
};

// A payload field (protobuf writes a bytes field only when non-empty;
// repeated ones always).
void PutPayload(int field, const grpc::Slice& s, bool always, Parts* out) {
  if (s.size() == 0 && !always) return;
  PutTag(field, kLengthDelimited, out->header());
  PutVarint(s.size(), out->header());
  if (s.size() > 0) out->AddSlice(s);
}

void PutChunkSlice(int field, const ChunkSliceOut& c, Parts* out) {
  Parts body;
  std::string* h = body.header();
  PutString(1, c.tensor, h);
  PutInt(2, c.chunk, h);
  PutInt(3, c.offset, h);
  PutInt(4, c.dtype, h);
  PutPayload(5, c.data, false, &body);
  PutInt(6, c.sparse ? 1 : 0, body.header());
  PutInt(7, c.num_elements, body.header());
  PutPayload(8, c.indices, false, &body);
  uint32_t scale_bits;
  std::memcpy(&scale_bits, &c.scale, 4);
  if (scale_bits != 0) {
    PutTag(9, kFixed32, body.header());
    for (int b = 0; b < 4; ++b) {
      body.header()->push_back(static_cast<char>(scale_bits >> (8 * b)));
    }
  }
  for (const grpc::Slice& s : c.state) PutPayload(10, s, true, &body);
  PutInt(11, c.shm_offset, body.header());
  PutInt(12, c.shm_bytes, body.header());
  PutTag(field, kLengthDelimited, out->header());
  PutVarint(body.size(), out->header());
  body.AppendTo(out);
}

// Reads protobuf fields from consecutive slices.
class Reader {
 public:
  Reader(const std::vector<grpc::Slice>& slices, size_t begin_slice,
         size_t begin_offset, size_t limit)
      : slices_(slices),
        slice_(begin_slice),
        offset_(begin_offset),
        left_(limit) {}

  bool done() const { return left_ == 0; }
  size_t slice() const { return slice_; }
  size_t offset() const { return offset_; }

  bool Byte(uint8_t* b) {
    if (left_ == 0) return false;
    SkipEmpty();
    *b = slices_[slice_].begin()[offset_];
    ++offset_;
    --left_;
    return true;
  }
  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      uint8_t b;
      if (!Byte(&b)) return false;
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;
  }
  // The next n bytes as spans (no copy).
  bool Spans(size_t n, ByteSpans* out) {
    if (n > left_) return false;
    left_ -= n;
    while (n > 0) {
      SkipEmpty();
      const grpc::Slice& s = slices_[slice_];
      const size_t take = std::min(n, s.size() - offset_);
      out->Append(absl::string_view(
          reinterpret_cast<const char*>(s.begin()) + offset_, take));
      offset_ += take;
      n -= take;
    }
    return true;
  }
  bool Skip(size_t n) {
    ByteSpans ignored;
    return Spans(n, &ignored);
  }
  // Skips a field's value of `wire_type`.
  bool SkipValue(int wire_type) {
    uint64_t v;
    switch (wire_type) {
      case kVarint:
        return Varint(&v);
      case kFixed64:
        return Skip(8);
      case kLengthDelimited:
        return Varint(&v) && Skip(v);
      case kFixed32:
        return Skip(4);
      default:
        return false;
    }
  }

 private:
  void SkipEmpty() {
    while (offset_ == slices_[slice_].size()) {
      ++slice_;
      offset_ = 0;
    }
  }
  const std::vector<grpc::Slice>& slices_;
  size_t slice_;
  size_t offset_;
  size_t left_;
};

absl::Status Malformed(absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("malformed ", what, " (protobuf wire format)"));
}

// Field values: read `key` into (field, wire_type).
bool Key(Reader* r, int* field, int* wire_type) {
  uint64_t key;
  if (!r->Varint(&key) || (key >> 3) == 0 || (key >> 3) > (1u << 29)) {
    return false;
  }
  *field = static_cast<int>(key >> 3);
  *wire_type = static_cast<int>(key & 7);
  return true;
}

bool VarintField(Reader* r, int wire_type, uint64_t* v) {
  return wire_type == kVarint && r->Varint(v);
}

bool BytesField(Reader* r, int wire_type, ByteSpans* out) {
  uint64_t n;
  out->Clear();
  return wire_type == kLengthDelimited && r->Varint(&n) && r->Spans(n, out);
}

bool StringField(Reader* r, int wire_type, std::string* out) {
  ByteSpans s;
  if (!BytesField(r, wire_type, &s)) return false;
  *out = s.ToString();
  return true;
}

absl::Status ParseChunkSlice(Reader* r, ChunkSliceView* c) {
  while (!r->done()) {
    int field, wt;
    uint64_t v = 0;
    if (!Key(r, &field, &wt)) return Malformed("ChunkSlice");
    bool ok = true;
    switch (field) {
      case 1:
        ok = StringField(r, wt, &c->tensor);
        break;
      case 2:
        ok = VarintField(r, wt, &v);
        c->chunk = static_cast<int32_t>(v);
        break;
      case 3:
        ok = VarintField(r, wt, &v);
        c->offset = static_cast<int64_t>(v);
        break;
      case 4:
        ok = VarintField(r, wt, &v);
        c->dtype = static_cast<DType>(static_cast<int32_t>(v));
        break;
      case 5:
        ok = BytesField(r, wt, &c->data);
        break;
      case 6:
        ok = VarintField(r, wt, &v);
        c->sparse = v != 0;
        break;
      case 7:
        ok = VarintField(r, wt, &v);
        c->num_elements = static_cast<int64_t>(v);
        break;
      case 8:
        ok = BytesField(r, wt, &c->indices);
        break;
      case 9: {
        ByteSpans bits;
        ok = wt == kFixed32 && r->Spans(4, &bits);
        if (ok) {
          const std::string b = bits.ToString();
          uint32_t u = 0;
          for (int k = 0; k < 4; ++k) {
            u |= static_cast<uint32_t>(static_cast<uint8_t>(b[k])) << (8 * k);
          }
          std::memcpy(&c->scale, &u, 4);
        }
        break;
      }
      case 10:
        c->state.emplace_back();
        ok = BytesField(r, wt, &c->state.back());
        break;
      case 11:
        ok = VarintField(r, wt, &v);
        c->shm_offset = static_cast<int64_t>(v);
        break;
      case 12:
        ok = VarintField(r, wt, &v);
        c->shm_bytes = static_cast<int64_t>(v);
        break;
      default:
        ok = r->SkipValue(wt);
    }
    if (!ok) return Malformed("ChunkSlice");
  }
  return absl::OkStatus();
}

// The nested ChunkSlice message at the reader's position.
absl::Status NestedChunkSlice(const std::vector<grpc::Slice>& slices,
                              Reader* r, int wire_type,
                              std::vector<ChunkSliceView>* out) {
  uint64_t n;
  if (wire_type != kLengthDelimited || !r->Varint(&n)) {
    return Malformed("ChunkSlice");
  }
  Reader nested(slices, r->slice(), r->offset(), n);
  if (!r->Skip(n)) return Malformed("ChunkSlice");
  out->emplace_back();
  return ParseChunkSlice(&nested, &out->back());
}

// Dumps the buffer's slices (references, no copy).
absl::Status Slices(const grpc::ByteBuffer& buffer,
                    std::vector<grpc::Slice>* out) {
  out->clear();
  if (buffer.Length() == 0) return absl::OkStatus();
  if (!buffer.Dump(out).ok()) {
    return absl::InvalidArgumentError("unreadable message buffer");
  }
  return absl::OkStatus();
}

size_t TotalSize(const std::vector<grpc::Slice>& slices) {
  size_t n = 0;
  for (const grpc::Slice& s : slices) n += s.size();
  return n;
}

}  // namespace

grpc::Slice NewPayloadSlice(size_t size) {
  return grpc::Slice(grpc_slice_malloc(size), grpc::Slice::STEAL_REF);
}

char* MutableBytes(grpc::Slice* slice) {
  return reinterpret_cast<char*>(const_cast<uint8_t*>(slice->begin()));
}

grpc::ByteBuffer SerializePullResponse(
    int64_t version, const std::vector<ChunkSliceOut>& slices,
    int32_t next_message) {
  Parts out;
  PutInt(1, version, out.header());
  for (const ChunkSliceOut& c : slices) PutChunkSlice(2, c, &out);
  PutInt(3, next_message, out.header());
  return out.Take();
}

grpc::ByteBuffer SerializePushRequest(
    const PushHeader& h, const std::vector<ChunkSliceOut>& slices) {
  Parts out;
  PutString(1, h.worker_id, out.header());
  PutInt(2, h.dp_rank, out.header());
  PutInt(3, h.step, out.header());
  if (h.partition_version != 0) {
    PutTag(4, kVarint, out.header());
    PutVarint(h.partition_version, out.header());
  }
  for (const ChunkSliceOut& c : slices) PutChunkSlice(5, c, &out);
  PutInt(6, h.pp_rank, out.header());
  PutInt(7, h.tp_rank, out.header());
  if (!h.shm.empty()) PutString(8, h.shm, out.header());
  if (h.then != PUSH_THEN_NOTHING) PutInt(9, h.then, out.header());
  if (!h.then_pull.empty()) PutString(10, h.then_pull, out.header());
  return out.Take();
}

void ByteSpans::Append(absl::string_view part) {
  if (part.empty()) return;
  parts_.push_back(part);
  size_ += part.size();
}

void ByteSpans::ForEachElements(
    int width,
    const std::function<void(const char*, int64_t, int64_t)>& fn) const {
  char split[16];
  int have = 0;  // bytes of a split element gathered in `split`
  int64_t next = 0;  // index of the next element
  for (absl::string_view part : parts_) {
    const char* p = part.data();
    size_t left = part.size();
    if (have > 0) {
      const size_t take = std::min<size_t>(width - have, left);
      std::memcpy(split + have, p, take);
      have += static_cast<int>(take);
      p += take;
      left -= take;
      if (have < width) continue;
      fn(split, next++, 1);
      have = 0;
    }
    const int64_t whole = static_cast<int64_t>(left / width);
    if (whole > 0) {
      fn(p, next, whole);
      next += whole;
    }
    have = static_cast<int>(left - whole * width);
    std::memcpy(split, p + whole * width, have);
  }
}

std::string ByteSpans::ToString() const {
  std::string out;
  out.reserve(size_);
  for (absl::string_view p : parts_) out.append(p.data(), p.size());
  return out;
}

absl::Status ParsePullResponse(const grpc::ByteBuffer& buffer,
                               PullResponseView* out) {
  *out = PullResponseView();
  if (absl::Status s = Slices(buffer, &out->held); !s.ok()) return s;
  Reader r(out->held, 0, 0, TotalSize(out->held));
  while (!r.done()) {
    int field, wt;
    uint64_t v;
    if (!Key(&r, &field, &wt)) return Malformed("PullResponse");
    if (field == 1) {
      if (!VarintField(&r, wt, &v)) return Malformed("PullResponse");
      out->version = static_cast<int64_t>(v);
    } else if (field == 2) {
      if (absl::Status s = NestedChunkSlice(out->held, &r, wt, &out->slices);
          !s.ok()) {
        return s;
      }
    } else if (field == 3) {
      if (!VarintField(&r, wt, &v)) return Malformed("PullResponse");
      out->next_message = static_cast<int32_t>(v);
    } else if (!r.SkipValue(wt)) {
      return Malformed("PullResponse");
    }
  }
  return absl::OkStatus();
}

absl::Status ParsePushRequest(const grpc::ByteBuffer& buffer,
                              PushRequestView* out) {
  *out = PushRequestView();
  if (absl::Status s = Slices(buffer, &out->held); !s.ok()) return s;
  Reader r(out->held, 0, 0, TotalSize(out->held));
  PushHeader& h = out->header;
  while (!r.done()) {
    int field, wt;
    uint64_t v = 0;
    if (!Key(&r, &field, &wt)) return Malformed("PushRequest");
    bool ok = true;
    switch (field) {
      case 1:
        ok = StringField(&r, wt, &h.worker_id);
        break;
      case 2:
        ok = VarintField(&r, wt, &v);
        h.dp_rank = static_cast<int32_t>(v);
        break;
      case 3:
        ok = VarintField(&r, wt, &v);
        h.step = static_cast<int64_t>(v);
        break;
      case 4:
        ok = VarintField(&r, wt, &v);
        h.partition_version = v;
        break;
      case 5:
        if (absl::Status s = NestedChunkSlice(out->held, &r, wt, &out->slices);
            !s.ok()) {
          return s;
        }
        break;
      case 6:
        ok = VarintField(&r, wt, &v);
        h.pp_rank = static_cast<int32_t>(v);
        break;
      case 7:
        ok = VarintField(&r, wt, &v);
        h.tp_rank = static_cast<int32_t>(v);
        break;
      case 8:
        ok = StringField(&r, wt, &h.shm);
        break;
      case 9:
        ok = VarintField(&r, wt, &v);
        // Unknown values stay unknown: the service rejects them.
        h.then = static_cast<PushThen>(static_cast<int32_t>(v));
        break;
      case 10:
        ok = StringField(&r, wt, &h.then_pull);
        break;
      default:
        ok = r.SkipValue(wt);
    }
    if (!ok) return Malformed("PushRequest");
  }
  return absl::OkStatus();
}

grpc::ByteBuffer SerializePeerMessage(const PeerHeader& h,
                                      const grpc::Slice& data) {
  Parts out;
  std::string* o = out.header();
  PutInt(1, h.kind, o);
  PutInt(2, h.eval ? 1 : 0, o);
  PutInt(3, h.step, o);
  PutInt(4, h.micro_batch, o);
  PutInt(5, h.seq, o);
  PutInt(6, h.round, o);
  PutString(7, h.sender, o);
  PutInt(8, h.total_elements, o);
  PutInt(9, h.offset, o);
  PutPayload(10, data, false, &out);
  if (!h.shm.empty()) PutString(11, h.shm, out.header());
  PutInt(12, h.shm_offset, out.header());
  PutInt(13, h.shm_bytes, out.header());
  return out.Take();
}

absl::Status ParsePeerMessage(const grpc::ByteBuffer& buffer,
                              PeerMessageView* out) {
  *out = PeerMessageView();
  if (absl::Status s = Slices(buffer, &out->held); !s.ok()) return s;
  Reader r(out->held, 0, 0, TotalSize(out->held));
  PeerHeader& h = out->header;
  while (!r.done()) {
    int field, wt;
    uint64_t v = 0;
    if (!Key(&r, &field, &wt)) return Malformed("PeerMessage");
    bool ok = true;
    if (field == 7) {
      ok = StringField(&r, wt, &h.sender);
    } else if (field == 10) {
      ok = BytesField(&r, wt, &out->data);
    } else if (field == 11) {
      ok = StringField(&r, wt, &h.shm);
    } else if ((field >= 1 && field <= 9) || field == 12 || field == 13) {
      ok = VarintField(&r, wt, &v);
      switch (field) {
        case 1:
          h.kind = static_cast<PeerKind>(static_cast<int32_t>(v));
          break;
        case 2:
          h.eval = v != 0;
          break;
        case 3:
          h.step = static_cast<int64_t>(v);
          break;
        case 4:
          h.micro_batch = static_cast<int32_t>(v);
          break;
        case 5:
          h.seq = static_cast<int32_t>(v);
          break;
        case 6:
          h.round = static_cast<int32_t>(v);
          break;
        case 8:
          h.total_elements = static_cast<int64_t>(v);
          break;
        case 9:
          h.offset = static_cast<int64_t>(v);
          break;
        case 12:
          h.shm_offset = static_cast<int64_t>(v);
          break;
        case 13:
          h.shm_bytes = static_cast<int64_t>(v);
          break;
      }
    } else {
      ok = r.SkipValue(wt);
    }
    if (!ok) return Malformed("PeerMessage");
  }
  return absl::OkStatus();
}

PeerMessageView ViewOf(const PeerMessage& m) {
  PeerMessageView v;
  v.header.kind = m.kind();
  v.header.eval = m.eval();
  v.header.step = m.step();
  v.header.micro_batch = m.micro_batch();
  v.header.seq = m.seq();
  v.header.round = m.round();
  v.header.sender = m.sender();
  v.header.total_elements = m.total_elements();
  v.header.offset = m.offset();
  v.data.Append(m.data());
  if (m.has_shm()) v.header.shm = m.shm().SerializeAsString();
  v.header.shm_offset = m.shm_offset();
  v.header.shm_bytes = m.shm_bytes();
  return v;
}

ChunkSliceView ViewOf(const ChunkSlice& s) {
  ChunkSliceView v;
  v.tensor = s.tensor();
  v.chunk = s.chunk();
  v.offset = s.offset();
  v.dtype = s.dtype();
  v.data.Append(s.data());
  v.sparse = s.sparse();
  v.num_elements = s.num_elements();
  v.indices.Append(s.indices());
  v.scale = s.scale();
  for (const std::string& b : s.state()) v.state.emplace_back().Append(b);
  v.shm_offset = s.shm_offset();
  v.shm_bytes = s.shm_bytes();
  return v;
}

PushRequestView ViewOf(const PushRequest& r) {
  PushRequestView v;
  v.header.worker_id = r.worker_id();
  v.header.dp_rank = r.dp_rank();
  v.header.step = r.step();
  v.header.partition_version = r.partition_version();
  v.header.pp_rank = r.pp_rank();
  v.header.tp_rank = r.tp_rank();
  if (r.has_shm()) v.header.shm = r.shm().SerializeAsString();
  v.header.then = r.then();
  if (r.has_then_pull()) v.header.then_pull = r.then_pull().SerializeAsString();
  for (const ChunkSlice& s : r.slices()) v.slices.push_back(ViewOf(s));
  return v;
}

grpc::ByteBuffer BufferOf(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

grpc::ByteBuffer SerializeProto(const google::protobuf::MessageLite& message) {
  return BufferOf(message.SerializeAsString());
}

absl::StatusOr<std::string> BufferBytes(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  if (absl::Status s = Slices(buffer, &slices); !s.ok()) return s;
  std::string bytes;
  bytes.reserve(TotalSize(slices));
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return bytes;
}

absl::Status ParseProto(const grpc::ByteBuffer& buffer,
                        google::protobuf::MessageLite* message) {
  absl::StatusOr<std::string> bytes = BufferBytes(buffer);
  if (!bytes.ok()) return bytes.status();
  if (!message->ParseFromString(*bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", message->GetTypeName()));
  }
  return absl::OkStatus();
}

}  // namespace lmps
