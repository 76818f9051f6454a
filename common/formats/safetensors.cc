#include "common/formats/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <memory>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/model/bf16.h"
#include "nlohmann/json.hpp"

namespace lmps {
namespace {

static_assert(sizeof(float) == 4, "fp32 expected");
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors I/O assumes a little-endian host"
#endif

constexpr char kMetadataKey[] = "__metadata__";
// Headers larger than this are rejected as corrupt (the reference
// implementation uses the same bound).
constexpr uint64_t kMaxHeaderBytes = 100 << 20;

// ---------------------------------------------------------------------------
// The JSON header, parsed by nlohmann/json's SAX parser (Debian's
// nlohmann-json3-dev) into a small document tree that keeps the entries in
// file order (and repeated keys, which the caller rejects).
// ---------------------------------------------------------------------------

struct Json {
  enum class Type { kNull, kBool, kInt, kString, kArray, kObject };
  Type type = Type::kNull;
  bool boolean = false;
  int64_t integer = 0;
  std::string str;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;  // in document order
};

// nlohmann::json's SAX interface. Stops at the first error: a syntax error
// (with its byte position), a non-integer number, an integer beyond int64,
// or nesting deeper than kMaxDepth (safetensors headers are 3 deep).
class JsonBuilder {
 public:
  using json = nlohmann::json;
  static constexpr size_t kMaxDepth = 16;

  bool null() { return Add(Json()); }
  bool boolean(bool b) {
    Json v;
    v.type = Json::Type::kBool;
    v.boolean = b;
    return Add(std::move(v));
  }
  bool number_integer(json::number_integer_t i) {
    Json v;
    v.type = Json::Type::kInt;
    v.integer = i;
    return Add(std::move(v));
  }
  bool number_unsigned(json::number_unsigned_t u) {
    if (u > static_cast<json::number_unsigned_t>(
                std::numeric_limits<int64_t>::max())) {
      return Fail("integer out of range");
    }
    return number_integer(static_cast<int64_t>(u));
  }
  bool number_float(json::number_float_t, const std::string& text) {
    return Fail(absl::StrCat("only integers are supported in this header, got ",
                             text));
  }
  bool string(std::string& s) {
    Json v;
    v.type = Json::Type::kString;
    v.str = std::move(s);
    return Add(std::move(v));
  }
  bool binary(json::binary_t&) { return Fail("binary value"); }
  bool start_object(std::size_t) { return Open(Json::Type::kObject); }
  bool key(std::string& k) {
    key_ = std::move(k);
    return true;
  }
  bool end_object() { return Close(); }
  bool start_array(std::size_t) { return Open(Json::Type::kArray); }
  bool end_array() { return Close(); }
  bool parse_error(std::size_t position, const std::string&,
                   const nlohmann::detail::exception& e) {
    error_ = absl::StrCat("malformed JSON header at byte ", position, ": ",
                          e.what());
    return false;
  }

  // The document, or the first error.
  absl::StatusOr<Json> Parse(absl::string_view text) {
    bool ok = false;
    try {
      ok = json::sax_parse(text.begin(), text.end(), this,
                           json::input_format_t::json, /*strict=*/true);
    } catch (const std::exception& e) {  // not expected from the SAX parser
      error_ = absl::StrCat("malformed JSON header: ", e.what());
    }
    if (!ok || !error_.empty()) {
      return absl::InvalidArgumentError(
          error_.empty() ? "malformed JSON header" : error_);
    }
    return std::move(root_);
  }

 private:
  // Puts v into the innermost open container (under the last key in an
  // object), or makes it the document; returns where it now lives. The
  // pointers on stack_ stay valid: only the innermost container grows.
  Json* Place(Json v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    Json* top = stack_.back();
    if (top->type == Json::Type::kObject) {
      top->object.emplace_back(std::move(key_), std::move(v));
      return &top->object.back().second;
    }
    top->array.push_back(std::move(v));
    return &top->array.back();
  }
  bool Add(Json v) {
    Place(std::move(v));
    return true;
  }
  bool Open(Json::Type type) {
    if (stack_.size() >= kMaxDepth) return Fail("nested too deeply");
    Json v;
    v.type = type;
    stack_.push_back(Place(std::move(v)));
    return true;
  }
  bool Close() {
    stack_.pop_back();
    return true;
  }
  bool Fail(absl::string_view what) {
    error_ = absl::StrCat("malformed JSON header: ", what);
    return false;
  }

  Json root_;
  std::vector<Json*> stack_;  // the open containers, outermost first
  std::string key_;
  std::string error_;
};

void AppendJsonString(absl::string_view s, std::string* out) {
  out->push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\n': out->append("\\n"); break;
      case '\r': out->append("\\r"); break;
      case '\t': out->append("\\t"); break;
      default:
        if (c < 0x20) {
          char buf[8];
          snprintf(buf, sizeof(buf), "\\u%04x", c);
          out->append(buf);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

absl::StatusOr<int64_t> NumElements(const std::vector<int64_t>& shape,
                                    absl::string_view name) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' has a negative dimension"));
    }
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / 8 / d) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' is too large"));
    }
    n *= d;
  }
  return n;
}

// Bytes per element of the safetensors specification's dtypes; 0 if unknown.
int DtypeBytes(absl::string_view dtype) {
  static const std::map<absl::string_view, int>* const kSizes =
      new std::map<absl::string_view, int>{
          {"BOOL", 1},    {"U8", 1},  {"I8", 1},       {"F8_E4M3", 1},
          {"F8_E5M2", 1}, {"I16", 2}, {"U16", 2},      {"F16", 2},
          {"BF16", 2},    {"I32", 4}, {"U32", 4},      {"F32", 4},
          {"I64", 8},     {"U64", 8}, {"F64", 8}};
  auto it = kSizes->find(dtype);
  return it == kSizes->end() ? 0 : it->second;
}

// The JSON header (unpadded) and the total data size.
absl::StatusOr<std::string> BuildHeader(
    const std::vector<SafeTensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  std::set<absl::string_view> names;
  std::string json = "{";
  bool first = true;
  if (!metadata.empty()) {
    AppendJsonString(kMetadataKey, &json);
    json.append(":{");
    bool first_meta = true;
    for (const auto& [k, v] : metadata) {
      if (!first_meta) json.push_back(',');
      first_meta = false;
      AppendJsonString(k, &json);
      json.push_back(':');
      AppendJsonString(v, &json);
    }
    json.push_back('}');
    first = false;
  }
  int64_t offset = 0;
  for (const SafeTensor& t : tensors) {
    if (t.name.empty() || t.name == kMetadataKey) {
      return absl::InvalidArgumentError(
          absl::StrCat("invalid tensor name '", t.name, "'"));
    }
    if (!names.insert(t.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "' appears twice"));
    }
    absl::StatusOr<int64_t> n = NumElements(t.shape, t.name);
    if (!n.ok()) return n.status();
    if (*n != static_cast<int64_t>(t.data.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", t.name, "' has shape [", absl::StrJoin(t.shape, ","),
          "] (", *n, " elements) but ", t.data.size(), " values"));
    }
    if (!first) json.push_back(',');
    first = false;
    AppendJsonString(t.name, &json);
    absl::StrAppend(&json, ":{\"dtype\":\"F32\",\"shape\":[",
                    absl::StrJoin(t.shape, ","), "],\"data_offsets\":[",
                    offset, ",", offset + 4 * *n, "]}");
    offset += 4 * *n;
  }
  json.push_back('}');
  // Pad so the data buffer starts 8-byte aligned, as the reference writer.
  while (json.size() % 8 != 0) json.push_back(' ');
  return json;
}

std::string LengthPrefix(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out;
}

absl::Status ErrnoError(absl::string_view what, const std::string& path) {
  const int e = errno;
  std::string msg = absl::StrCat(what, " ", path, ": ", strerror(e));
  if (e == ENOSPC || e == EDQUOT || e == EFBIG) {
    return absl::ResourceExhaustedError(msg);
  }
  if (e == ENOENT) return absl::NotFoundError(msg);
  if (e == EACCES || e == EPERM) return absl::PermissionDeniedError(msg);
  return absl::InternalError(msg);
}

absl::Status WriteAll(int fd, const char* data, size_t n,
                      const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoError("cannot write", path);
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

absl::Status Corrupt(absl::string_view source, absl::string_view what) {
  return absl::DataLossError(
      absl::StrCat("invalid safetensors file ", source, ": ", what));
}

}  // namespace

const SafeTensor* SafetensorsContents::Find(absl::string_view name) const {
  for (const SafeTensor& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

absl::StatusOr<std::string> SerializeSafetensors(
    const std::vector<SafeTensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  absl::StatusOr<std::string> header = BuildHeader(tensors, metadata);
  if (!header.ok()) return header.status();
  std::string out = LengthPrefix(header->size());
  out += *header;
  for (const SafeTensor& t : tensors) {
    out.append(reinterpret_cast<const char*>(t.data.data()),
               t.data.size() * sizeof(float));
  }
  return out;
}

absl::StatusOr<SafetensorsContents> ParseSafetensors(
    absl::string_view bytes, absl::string_view source,
    const SafetensorsReadOptions& options) {
  if (bytes.size() < 8) {
    return Corrupt(source, absl::StrCat("only ", bytes.size(),
                                        " bytes, shorter than the 8-byte "
                                        "header length"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) {
    header_len = (header_len << 8) | static_cast<unsigned char>(bytes[i]);
  }
  if (header_len > kMaxHeaderBytes || header_len > bytes.size() - 8) {
    return Corrupt(source,
                   absl::StrCat("header length ", header_len,
                                " exceeds the file size ", bytes.size(),
                                " (truncated or not a safetensors file)"));
  }
  absl::string_view header = bytes.substr(8, header_len);
  absl::string_view data = bytes.substr(8 + header_len);
  absl::StatusOr<Json> doc = JsonBuilder().Parse(header);
  if (!doc.ok()) return Corrupt(source, doc.status().message());
  if (doc->type != Json::Type::kObject) {
    return Corrupt(source, "header is not a JSON object");
  }

  SafetensorsContents out;
  struct Entry {
    int64_t begin, end;
    size_t index;
    std::string other_dtype;  // empty: F32 or a widened half
    std::string dtype;        // as in the file
  };
  std::vector<Entry> entries;
  std::set<std::string> names;
  for (auto& [name, value] : doc->object) {
    if (name == kMetadataKey) {
      if (value.type != Json::Type::kObject) {
        return Corrupt(source, "__metadata__ is not an object");
      }
      for (auto& [k, v] : value.object) {
        if (v.type != Json::Type::kString) {
          return Corrupt(source, absl::StrCat("__metadata__ value of '", k,
                                              "' is not a string"));
        }
        out.metadata[k] = v.str;
      }
      continue;
    }
    if (!names.insert(name).second) {
      return Corrupt(source, absl::StrCat("tensor '", name, "' appears twice"));
    }
    if (value.type != Json::Type::kObject) {
      return Corrupt(source,
                     absl::StrCat("entry of tensor '", name,
                                  "' is not an object"));
    }
    const Json* dtype = nullptr;
    const Json* shape = nullptr;
    const Json* offsets = nullptr;
    for (auto& [k, v] : value.object) {
      if (k == "dtype") {
        dtype = &v;
      } else if (k == "shape") {
        shape = &v;
      } else if (k == "data_offsets") {
        offsets = &v;
      } else {
        return Corrupt(source, absl::StrCat("tensor '", name,
                                            "' has unexpected key '", k, "'"));
      }
    }
    if (dtype == nullptr || shape == nullptr || offsets == nullptr) {
      return Corrupt(source,
                     absl::StrCat("tensor '", name,
                                  "' lacks dtype, shape or data_offsets"));
    }
    if (dtype->type != Json::Type::kString) {
      return Corrupt(source,
                     absl::StrCat("tensor '", name, "': dtype is not a string"));
    }
    const int element_bytes = DtypeBytes(dtype->str);
    const bool widen =
        options.widen_half && (dtype->str == "F16" || dtype->str == "BF16");
    if (dtype->str != "F32" && !widen &&
        (!options.list_other_dtypes || element_bytes == 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "safetensors file ", source, ": tensor '", name, "' has dtype ",
          dtype->str, "; only F32 is supported"));
    }
    SafeTensor t;
    t.name = name;
    if (shape->type != Json::Type::kArray) {
      return Corrupt(source,
                     absl::StrCat("tensor '", name, "': shape is not a list"));
    }
    for (const Json& d : shape->array) {
      if (d.type != Json::Type::kInt || d.integer < 0) {
        return Corrupt(source, absl::StrCat("tensor '", name,
                                            "': shape entries must be "
                                            "non-negative integers"));
      }
      t.shape.push_back(d.integer);
    }
    absl::StatusOr<int64_t> n = NumElements(t.shape, name);
    if (!n.ok()) return Corrupt(source, n.status().message());
    if (offsets->type != Json::Type::kArray || offsets->array.size() != 2 ||
        offsets->array[0].type != Json::Type::kInt ||
        offsets->array[1].type != Json::Type::kInt) {
      return Corrupt(source, absl::StrCat("tensor '", name,
                                          "': data_offsets must be "
                                          "[begin, end]"));
    }
    const int64_t begin = offsets->array[0].integer;
    const int64_t end = offsets->array[1].integer;
    if (begin < 0 || end < begin) {
      return Corrupt(source, absl::StrCat("tensor '", name,
                                          "': bad data_offsets [", begin, ", ",
                                          end, "]"));
    }
    if (end - begin != element_bytes * *n) {
      return Corrupt(source,
                     absl::StrCat("tensor '", name, "': shape [",
                                  absl::StrJoin(t.shape, ","), "] of ",
                                  dtype->str, " needs ", element_bytes * *n,
                                  " bytes but data_offsets [", begin, ", ",
                                  end, "] hold ", end - begin));
    }
    if (static_cast<uint64_t>(end) > data.size()) {
      return Corrupt(source, absl::StrCat("tensor '", name,
                                          "': data_offsets end ", end,
                                          " is past the data buffer of ",
                                          data.size(),
                                          " bytes (truncated file?)"));
    }
    entries.push_back({begin, end, out.tensors.size(),
                       dtype->str == "F32" || widen ? "" : dtype->str,
                       dtype->str});
    out.tensors.push_back(std::move(t));
  }
  // The tensors must tile the data buffer exactly.
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) {
              return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
            });
  int64_t expect = 0;
  std::vector<SafeTensor> ordered;
  ordered.reserve(entries.size());
  for (const Entry& e : entries) {
    SafeTensor& t = out.tensors[e.index];
    if (e.begin != expect) {
      return Corrupt(source,
                     absl::StrCat("tensor '", t.name, "' starts at byte ",
                                  e.begin, " but the previous tensor ends at ",
                                  expect, " (overlapping or gap)"));
    }
    expect = e.end;
    if (!e.other_dtype.empty()) {
      out.others.push_back({std::move(t.name), e.other_dtype,
                            std::move(t.shape)});
      continue;
    }
    t.dtype = e.dtype;
    if (e.dtype == "F32") {
      t.data.resize((e.end - e.begin) / 4);
      if (!t.data.empty()) {
        std::memcpy(t.data.data(), data.data() + e.begin, e.end - e.begin);
      }
    } else {  // F16 or BF16, widened
      t.data.resize((e.end - e.begin) / 2);
      const char* src = data.data() + e.begin;
      for (size_t i = 0; i < t.data.size(); ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        t.data[i] = e.dtype == "BF16" ? Bf16BitsToFloat(h) : HalfBitsToFloat(h);
      }
    }
    ordered.push_back(std::move(t));
  }
  if (static_cast<uint64_t>(expect) != data.size()) {
    return Corrupt(source, absl::StrCat("data buffer has ", data.size(),
                                        " bytes but the tensors cover ",
                                        expect));
  }
  out.tensors = std::move(ordered);
  return out;
}

float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {  // Inf or NaN (the payload kept, NaN stays NaN)
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal: rebias 15 -> 127
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // +-0
    bits = sign;
  } else {  // subnormal: m * 2^-24, normalised
    int e = -1;
    do {
      ++e;
      mantissa <<= 1;
    } while ((mantissa & 0x400u) == 0);
    bits = sign | static_cast<uint32_t>(112 - e) << 23 |
           ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

absl::Status WriteSafetensorsFile(
    const std::string& path, const std::vector<SafeTensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  absl::StatusOr<std::string> header = BuildHeader(tensors, metadata);
  if (!header.ok()) return header.status();
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                        0644);
  if (fd < 0) return ErrnoError("cannot create", tmp);
  auto fail = [&](absl::Status s) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  };
  const std::string prefix = LengthPrefix(header->size());
  if (absl::Status s = WriteAll(fd, prefix.data(), prefix.size(), tmp);
      !s.ok()) {
    return fail(s);
  }
  if (absl::Status s = WriteAll(fd, header->data(), header->size(), tmp);
      !s.ok()) {
    return fail(s);
  }
  for (const SafeTensor& t : tensors) {
    if (absl::Status s =
            WriteAll(fd, reinterpret_cast<const char*>(t.data.data()),
                     t.data.size() * sizeof(float), tmp);
        !s.ok()) {
      return fail(s);
    }
  }
  if (::fsync(fd) != 0) return fail(ErrnoError("cannot fsync", tmp));
  if (::close(fd) != 0) {
    absl::Status s = ErrnoError("cannot close", tmp);
    ::unlink(tmp.c_str());
    return s;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status s = ErrnoError("cannot rename to", path);
    ::unlink(tmp.c_str());
    return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<SafetensorsContents> ReadSafetensorsFile(
    const std::string& path, const SafetensorsReadOptions& options) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open safetensors file", path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    absl::Status s = ErrnoError("cannot stat", path);
    ::close(fd);
    return s;
  }
  std::string bytes(static_cast<size_t>(st.st_size), '\0');
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t r = ::read(fd, bytes.data() + got, bytes.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      absl::Status s = ErrnoError("cannot read", path);
      ::close(fd);
      return s;
    }
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  ::close(fd);
  bytes.resize(got);
  return ParseSafetensors(bytes, path, options);
}

}  // namespace lmps
