#include "common/safetensors.h"

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
// Minimal JSON.
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

class JsonParser {
 public:
  explicit JsonParser(absl::string_view text) : text_(text) {}

  absl::StatusOr<Json> ParseDocument() {
    Json value;
    if (absl::Status s = ParseValue(&value, 0); !s.ok()) return s;
    SkipSpace();
    if (pos_ != text_.size()) return Error("trailing characters after JSON");
    return value;
  }

 private:
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed JSON header at byte ", pos_, ": ", what));
  }

  void SkipSpace() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' ||
            text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  bool Consume(char c) {
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  bool ConsumeWord(absl::string_view word) {
    if (text_.substr(pos_, word.size()) == word) {
      pos_ += word.size();
      return true;
    }
    return false;
  }

  absl::Status ParseValue(Json* out, int depth) {
    if (depth > 16) return Error("nested too deeply");
    SkipSpace();
    if (pos_ >= text_.size()) return Error("unexpected end");
    const char c = text_[pos_];
    if (c == '{') return ParseObject(out, depth);
    if (c == '[') return ParseArray(out, depth);
    if (c == '"') {
      out->type = Json::Type::kString;
      return ParseString(&out->str);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ParseInt(out);
    if (ConsumeWord("true")) {
      out->type = Json::Type::kBool;
      out->boolean = true;
      return absl::OkStatus();
    }
    if (ConsumeWord("false")) {
      out->type = Json::Type::kBool;
      return absl::OkStatus();
    }
    if (ConsumeWord("null")) {
      out->type = Json::Type::kNull;
      return absl::OkStatus();
    }
    return Error(absl::StrCat("unexpected character '", std::string(1, c),
                              "'"));
  }

  absl::Status ParseObject(Json* out, int depth) {
    out->type = Json::Type::kObject;
    ++pos_;  // '{'
    if (Consume('}')) return absl::OkStatus();
    while (true) {
      SkipSpace();
      if (pos_ >= text_.size() || text_[pos_] != '"') {
        return Error("expected a string key");
      }
      std::string key;
      if (absl::Status s = ParseString(&key); !s.ok()) return s;
      if (!Consume(':')) return Error("expected ':'");
      Json value;
      if (absl::Status s = ParseValue(&value, depth + 1); !s.ok()) return s;
      out->object.emplace_back(std::move(key), std::move(value));
      if (Consume(',')) continue;
      if (Consume('}')) return absl::OkStatus();
      return Error("expected ',' or '}'");
    }
  }

  absl::Status ParseArray(Json* out, int depth) {
    out->type = Json::Type::kArray;
    ++pos_;  // '['
    if (Consume(']')) return absl::OkStatus();
    while (true) {
      Json value;
      if (absl::Status s = ParseValue(&value, depth + 1); !s.ok()) return s;
      out->array.push_back(std::move(value));
      if (Consume(',')) continue;
      if (Consume(']')) return absl::OkStatus();
      return Error("expected ',' or ']'");
    }
  }

  absl::Status ParseHex4(uint32_t* out) {
    if (pos_ + 4 > text_.size()) return Error("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = text_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9') {
        v |= h - '0';
      } else if (h >= 'a' && h <= 'f') {
        v |= h - 'a' + 10;
      } else if (h >= 'A' && h <= 'F') {
        v |= h - 'A' + 10;
      } else {
        return Error("bad \\u escape");
      }
    }
    *out = v;
    return absl::OkStatus();
  }

  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  absl::Status ParseString(std::string* out) {
    ++pos_;  // '"'
    while (true) {
      if (pos_ >= text_.size()) return Error("unterminated string");
      const char c = text_[pos_++];
      if (c == '"') return absl::OkStatus();
      if (static_cast<unsigned char>(c) < 0x20) {
        return Error("control character in string");
      }
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (pos_ >= text_.size()) return Error("unterminated escape");
      const char e = text_[pos_++];
      switch (e) {
        case '"': out->push_back('"'); break;
        case '\\': out->push_back('\\'); break;
        case '/': out->push_back('/'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t cp = 0;
          if (absl::Status s = ParseHex4(&cp); !s.ok()) return s;
          if (cp >= 0xD800 && cp < 0xDC00) {  // surrogate pair
            uint32_t lo = 0;
            if (!ConsumeWord("\\u")) return Error("lone surrogate");
            if (absl::Status s = ParseHex4(&lo); !s.ok()) return s;
            if (lo < 0xDC00 || lo >= 0xE000) return Error("bad surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            return Error("lone surrogate");
          }
          AppendUtf8(cp, out);
          break;
        }
        default:
          return Error("bad escape");
      }
    }
  }

  absl::Status ParseInt(Json* out) {
    out->type = Json::Type::kInt;
    bool negative = false;
    if (text_[pos_] == '-') {
      negative = true;
      ++pos_;
    }
    const size_t start = pos_;
    uint64_t v = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const uint64_t digit = text_[pos_] - '0';
      if (v > (static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) -
               digit) / 10) {
        return Error("integer out of range");
      }
      v = v * 10 + digit;
      ++pos_;
    }
    if (pos_ == start) return Error("expected digits");
    if (pos_ < text_.size() &&
        (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E')) {
      return Error("only integers are supported in this header");
    }
    out->integer = negative ? -static_cast<int64_t>(v) : static_cast<int64_t>(v);
    return absl::OkStatus();
  }

  absl::string_view text_;
  size_t pos_ = 0;
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
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / 4 / d) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", name, "' is too large"));
    }
    n *= d;
  }
  return n;
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

absl::StatusOr<SafetensorsContents> ParseSafetensors(absl::string_view bytes,
                                                     absl::string_view source) {
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
  absl::StatusOr<Json> doc = JsonParser(header).ParseDocument();
  if (!doc.ok()) return Corrupt(source, doc.status().message());
  if (doc->type != Json::Type::kObject) {
    return Corrupt(source, "header is not a JSON object");
  }

  SafetensorsContents out;
  struct Entry {
    int64_t begin, end;
    size_t index;
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
    if (dtype->str != "F32") {
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
    if (end - begin != 4 * *n) {
      return Corrupt(source,
                     absl::StrCat("tensor '", name, "': shape [",
                                  absl::StrJoin(t.shape, ","), "] needs ",
                                  4 * *n, " bytes but data_offsets [", begin,
                                  ", ", end, "] hold ", end - begin));
    }
    if (static_cast<uint64_t>(end) > data.size()) {
      return Corrupt(source, absl::StrCat("tensor '", name,
                                          "': data_offsets end ", end,
                                          " is past the data buffer of ",
                                          data.size(),
                                          " bytes (truncated file?)"));
    }
    entries.push_back({begin, end, out.tensors.size()});
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
    t.data.resize((e.end - e.begin) / 4);
    if (!t.data.empty()) {
      std::memcpy(t.data.data(), data.data() + e.begin, e.end - e.begin);
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
    const std::string& path) {
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
  return ParseSafetensors(bytes, path);
}

}  // namespace lmps
