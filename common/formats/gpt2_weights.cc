#include "common/formats/gpt2_weights.h"

#include <google/protobuf/text_format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "common/formats/hf_gpt2.h"

namespace lmps {
namespace {

namespace fs = std::filesystem;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// l of a name "h.{l}.…", or -1.
int64_t LayerOf(absl::string_view name) {
  if (!absl::ConsumePrefix(&name, "h.")) return -1;
  const size_t dot = name.find('.');
  int64_t l = -1;
  if (dot == absl::string_view::npos ||
      !absl::SimpleAtoi(name.substr(0, dot), &l)) {
    return -1;
  }
  return l;
}

// What differs between the file's model and the job's, e.g. "n_head 4 vs
// 2"; empty if nothing. A shorter context (block_size <= the file's: the
// first rows of wpe) and a larger vocabulary (vocab_size >= the file's: wte
// padded with zero rows) are not differences.
std::string ModelDifferences(const ModelConfig& file, const ModelConfig& job) {
  std::vector<std::string> diffs;
  auto cmp = [&](const char* name, int32_t x, int32_t y) {
    if (x != y) diffs.push_back(absl::StrCat(name, " ", x, " vs ", y));
  };
  cmp("n_layer", file.n_layer(), job.n_layer());
  cmp("n_head", file.n_head(), job.n_head());
  cmp("n_embd", file.n_embd(), job.n_embd());
  if (file.block_size() < job.block_size()) {
    diffs.push_back(absl::StrCat("block_size ", file.block_size(), " vs ",
                                 job.block_size(),
                                 ": the file has fewer positions"));
  }
  if (file.vocab_size() > job.vocab_size()) {
    diffs.push_back(absl::StrCat("vocab_size ", file.vocab_size(), " vs ",
                                 job.vocab_size(),
                                 ": the file has more tokens"));
  }
  return absl::StrJoin(diffs, ", ");
}

}  // namespace

absl::string_view Gpt2LayoutName(Gpt2Layout layout) {
  return layout == Gpt2Layout::kLmps ? "lmps" : "Hugging Face";
}

absl::StatusOr<Gpt2File> ReadGpt2File(const std::string& path) {
  std::error_code ec;
  std::string file = path;
  if (fs::is_directory(path, ec)) {
    file = (fs::path(path) / "model.safetensors").string();
    if (!fs::exists(file, ec)) {
      if (fs::exists(fs::path(path) / "model.safetensors.index.json", ec)) {
        return absl::InvalidArgumentError(absl::StrCat(
            path,
            " holds a sharded checkpoint (model.safetensors.index.json); "
            "lmps reads a single model.safetensors (save it with a larger "
            "max_shard_size)"));
      }
      return absl::NotFoundError(
          absl::StrCat(path, " is a directory without model.safetensors"));
    }
  }
  SafetensorsReadOptions options;
  options.list_other_dtypes = true;
  options.widen_half = true;
  absl::StatusOr<SafetensorsContents> contents =
      ReadSafetensorsFile(file, options);
  if (!contents.ok()) return contents.status();
  Gpt2File out;
  out.path = file;
  out.contents = std::move(*contents);
  auto meta = out.contents.metadata.find("lmps.model");
  if (meta != out.contents.metadata.end()) {
    ModelConfig config;
    if (!google::protobuf::TextFormat::ParseFromString(meta->second, &config)) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": its lmps.model metadata does not parse: '",
                       meta->second, "'"));
    }
    out.config = config;
    out.config_source = absl::StrCat("the lmps.model metadata of ", file);
    return out;
  }
  const fs::path json_path = fs::path(file).parent_path() / "config.json";
  if (fs::exists(json_path, ec)) {
    std::ifstream in(json_path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    if (!in) {
      return absl::NotFoundError(
          absl::StrCat("cannot read ", json_path.string()));
    }
    absl::StatusOr<ModelConfig> config =
        ParseHfGpt2ConfigJson(text.str(), json_path.string());
    if (!config.ok()) return config.status();
    out.config = *config;
    out.config_source = json_path.string();
  }
  return out;
}

absl::StatusOr<Gpt2Weights> Gpt2Weights::Create(Gpt2File file,
                                                const ModelConfig& model) {
  if (absl::Status s = ValidateModelConfig(model); !s.ok()) return s;
  const std::string path = file.path;
  auto invalid = [&path](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", parts...));
  };
  if (file.config.has_value()) {
    const std::string diff = ModelDifferences(*file.config, model);
    if (!diff.empty()) {
      return invalid(file.config_source, " describes the model ",
                     ModelConfigSummary(*file.config), "; the job's model is ",
                     ModelConfigSummary(model), " (", diff, ")");
    }
  }
  const SafetensorsContents& c = file.contents;
  std::map<std::string, size_t> f32;
  for (size_t i = 0; i < c.tensors.size(); ++i) f32[c.tensors[i].name] = i;
  std::map<std::string, std::string> other;  // name -> dtype
  for (const OtherTensor& t : c.others) other[t.name] = t.dtype;
  auto present = [&](const std::string& n) {
    return f32.count(n) > 0 || other.count(n) > 0;
  };

  // The layout: names first, then the shape of block 0's c_attn.
  Gpt2Weights w;
  bool hf = false;
  auto marker = [](absl::string_view n) {
    return absl::StartsWith(n, kHfGpt2Prefix) || n == "lm_head.weight" ||
           IsHfGpt2AttentionBuffer(n);
  };
  for (const auto& [n, i] : f32) hf = hf || marker(n);
  for (const auto& [n, d] : other) hf = hf || marker(n);
  if (!hf) {
    auto it = f32.find("h.0.attn.c_attn.weight");
    hf = it != f32.end() &&
         c.tensors[it->second].shape ==
             std::vector<int64_t>{model.n_embd(), 3 * model.n_embd()};
  }
  w.layout_ = hf ? Gpt2Layout::kHuggingFace : Gpt2Layout::kLmps;
  const std::string layout = absl::StrCat(Gpt2LayoutName(w.layout_));

  std::set<std::string> used;
  w.specs_ = GptTensorSpecs(model);
  for (const TensorSpec& spec : w.specs_) {
    std::vector<std::string> names;
    if (hf) names.push_back(absl::StrCat(kHfGpt2Prefix, spec.name));
    names.push_back(spec.name);
    const std::vector<int64_t> want = hf ? HfGpt2Shape(spec) : spec.shape;
    std::vector<std::string> found;
    for (const std::string& n : names) {
      if (present(n)) found.push_back(n);
    }
    if (found.empty()) {
      return absl::NotFoundError(absl::StrCat(
          path, ": has no tensor '", absl::StrJoin(names, "' or '"),
          "' (shape ", ShapeString(want), " in the ", layout,
          " layout of the model ", ModelConfigSummary(model), ")"));
    }
    if (found.size() > 1) {
      return invalid("holds both '", found[0], "' and '", found[1], "'");
    }
    const std::string& n = found[0];
    used.insert(n);
    if (other.count(n) > 0) {
      return invalid("tensor '", n, "' has dtype ", other[n],
                     "; lmps reads F32, F16 and BF16 parameters");
    }
    const SafeTensor& t = c.tensors[f32[n]];
    // wpe may have more rows (positions) than the job uses, wte fewer rows
    // (tokens) than its padded vocabulary: the same columns, rows read
    // from the front, the rest zero.
    const bool rows_may_differ =
        (spec.name == "wpe.weight" || spec.name == "wte.weight") &&
        t.shape.size() == 2 && want.size() == 2 && t.shape[1] == want[1] &&
        (spec.name == "wpe.weight" ? t.shape[0] > want[0]
                                   : t.shape[0] < want[0]);
    if (t.shape != want && !rows_may_differ) {
      const bool conv = hf && IsHfConv1DWeight(spec.name);
      return invalid("tensor '", n, "' has shape ", ShapeString(t.shape),
                     "; the job's model (", ModelConfigSummary(model),
                     ") needs ", ShapeString(want), " in the ", layout,
                     " layout", conv ? " (Conv1D weights are in x out)" : "",
                     IsHfConv1DWeight(spec.name) && !hf
                         ? " (lmps's matrices are out x in)"
                         : "");
    }
    const int64_t rows = std::min(t.shape.empty() ? 0 : t.shape[0],
                                  want.empty() ? 0 : want[0]);
    if (rows_may_differ && spec.name == "wpe.weight") {
      w.adaptations_.push_back(
          absl::StrCat(n, ": the first ", rows, " of its ", t.shape[0],
                       " positions (block_size ", model.block_size(), ")"));
    } else if (rows_may_differ) {
      w.adaptations_.push_back(absl::StrCat(
          n, ": its ", t.shape[0], " tokens, then ", want[0] - t.shape[0],
          " zero rows (vocab_size ", model.vocab_size(), ")"));
    }
    if (t.dtype != "F32") {
      w.adaptations_.push_back(absl::StrCat(n, ": ", t.dtype, " widened to F32"));
    }
    w.sources_.push_back({f32[n], hf && IsHfConv1DWeight(spec.name),
                          rows_may_differ ? rows * want[1]
                                          : spec.num_elements()});
  }

  // Everything else: attention buffers and a tied lm_head are fine.
  const SafeTensor& wte = c.tensors[w.sources_[0].tensor];  // wte.weight
  std::vector<std::string> unknown;
  int64_t max_layer = -1;
  auto leftover = [&](const std::string& n) -> absl::Status {
    if (used.count(n) > 0) return absl::OkStatus();
    absl::string_view base = n;
    if (hf) absl::ConsumePrefix(&base, kHfGpt2Prefix);
    if (hf && IsHfGpt2AttentionBuffer(base)) return absl::OkStatus();
    if (hf && n == "lm_head.weight") {
      if (other.count(n) > 0) {
        return invalid("tensor 'lm_head.weight' has dtype ", other[n],
                       "; lmps reads F32, F16 and BF16 parameters");
      }
      const SafeTensor& head = c.tensors[f32[n]];
      if (head.shape != wte.shape || head.data != wte.data) {
        return invalid(
            "lm_head.weight (shape ", ShapeString(head.shape),
            ") is not equal to the token embedding ", wte.name, " (shape ",
            ShapeString(wte.shape),
            "): lmps ties the LM head to the token embedding, so an untied "
            "head cannot be loaded");
      }
      return absl::OkStatus();
    }
    unknown.push_back(n);
    max_layer = std::max(max_layer, LayerOf(base));
    return absl::OkStatus();
  };
  for (const auto& [n, i] : f32) {
    if (absl::Status s = leftover(n); !s.ok()) return s;
  }
  for (const auto& [n, d] : other) {
    if (absl::Status s = leftover(n); !s.ok()) return s;
  }
  if (!unknown.empty()) {
    std::string msg = absl::StrCat(
        "holds ", unknown.size(), " tensor(s) the job's model (",
        ModelConfigSummary(model), ", ", layout, " layout) does not have: '",
        absl::StrJoin(unknown.begin(),
                      unknown.begin() + std::min<size_t>(unknown.size(), 5),
                      "', '"),
        unknown.size() > 5 ? "', ..." : "'");
    if (max_layer >= model.n_layer()) {
      absl::StrAppend(&msg, "; the file has blocks up to h.", max_layer,
                      ", the model n_layer=", model.n_layer());
    }
    return invalid(msg);
  }
  w.file_ = std::move(file);
  w.model_ = model;
  return w;
}

absl::StatusOr<Gpt2Weights> Gpt2Weights::Load(const std::string& path,
                                              const ModelConfig* model) {
  absl::StatusOr<Gpt2File> file = ReadGpt2File(path);
  if (!file.ok()) return file.status();
  if (model == nullptr && !file->config.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat(
        file->path,
        ": no model config: neither lmps.model metadata (lmps_export) nor a "
        "config.json beside it (Hugging Face)"));
  }
  const ModelConfig config = model != nullptr ? *model : *file->config;
  return Create(std::move(*file), config);
}

void Gpt2Weights::CopyRange(size_t i, int64_t begin, int64_t end,
                            float* out) const {
  const Source& s = sources_[i];
  const std::vector<float>& data = file_.contents.tensors[s.tensor].data;
  if (!s.transposed) {
    // Elements past the file's (wte padding rows) are zero.
    const int64_t split = std::clamp(s.file_elements, begin, end);
    std::copy(data.begin() + begin, data.begin() + split, out);
    std::fill(out + (split - begin), out + (end - begin), 0.0f);
    return;
  }
  // lmps's (r, c) of an out x in matrix is the file's (c, r) of in x out.
  const int64_t rows = specs_[i].shape[0], cols = specs_[i].shape[1];
  for (int64_t e = begin; e < end; ++e) {
    *out++ = data[(e % cols) * rows + e / cols];
  }
}

std::vector<float> Gpt2Weights::Flat() const {
  int64_t n = 0;
  for (const TensorSpec& s : specs_) n += s.num_elements();
  std::vector<float> flat(n);
  int64_t at = 0;
  for (size_t i = 0; i < specs_.size(); ++i) {
    CopyRange(i, 0, specs_[i].num_elements(), flat.data() + at);
    at += specs_[i].num_elements();
  }
  return flat;
}

}  // namespace lmps
