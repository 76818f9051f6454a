#include "server/export.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/formats/hf_gpt2.h"
#include "common/text/gpt2_bpe.h"
#include "common/model/model_spec.h"
#include "common/model/partition.h"
#include "server/checkpoint.h"

namespace lmps {
namespace {

// Writes `text` to `path` through a temporary file, fsync and rename(2).
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::string& text) {
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  auto fail = [&](absl::string_view what) {
    absl::Status s = absl::InternalError(
        absl::StrCat("cannot ", what, " ", tmp, ": ", std::strerror(errno)));
    ::unlink(tmp.c_str());
    return s;
  };
  const int fd =
      ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return fail("create");
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      return fail("write");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    ::close(fd);
    return fail("fsync");
  }
  if (::close(fd) != 0) return fail("close");
  if (::rename(tmp.c_str(), path.c_str()) != 0) return fail("rename to");
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot read ", path));
  }
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// GPT-2's tokenizer as transformers reads it from a model's folder:
// file name -> contents.
struct HfTokenizer {
  std::map<std::string, std::string> files;
  std::string said;  // ExportResult::tokenizer
};

// The tokenizer files of `spec`'s job (export.h), checked before anything
// is written; none, with the reason in `said`, where the job has no GPT-2
// tokens or (the default folder) the vocabulary is not installed.
absl::StatusOr<HfTokenizer> MakeHfTokenizer(const JobSpec& spec,
                                            const ExportOptions& options) {
  HfTokenizer t;
  const DataFormat format = spec.data().format();
  if (format != TOKEN_SHARDS && format != RAW_TOKENS) {
    t.said = "no tokenizer files: the job's tokens are bytes (BYTE_TEXT)";
    return t;
  }
  const bool named = !options.tokenizer_dir.empty();
  const std::string dir = named ? options.tokenizer_dir
                          : !spec.data().tokenizer_dir().empty()
                              ? spec.data().tokenizer_dir()
                              : DefaultGpt2VocabDir();
  const std::string encoder_path = absl::StrCat(dir, "/encoder.json");
  const std::string merges_path = absl::StrCat(dir, "/vocab.bpe");
  absl::StatusOr<std::string> encoder = ReadWholeFile(encoder_path);
  absl::StatusOr<std::string> merges =
      encoder.ok() ? ReadWholeFile(merges_path) : encoder.status();
  if (!merges.ok()) {
    if (named) {
      return absl::NotFoundError(absl::StrCat(
          "--tokenizer_dir: ", merges.status().message(),
          " (GPT-2's encoder.json and vocab.bpe)"));
    }
    t.said = absl::StrCat(
        "no tokenizer files: GPT-2's vocabulary is not in ", dir,
        " (scripts/install_deps.sh installs it; or --tokenizer_dir)");
    return t;
  }
  absl::StatusOr<std::unique_ptr<Gpt2Bpe>> bpe =
      Gpt2Bpe::FromStrings(*encoder, *merges, encoder_path, merges_path);
  if (!bpe.ok()) return bpe.status();
  const int tokens = (*bpe)->vocab_size();
  if (tokens > spec.model().vocab_size()) {
    const std::string why = absl::StrCat(
        "the tokenizer in ", dir, " has ", tokens,
        " tokens, more than the model's vocab_size ",
        spec.model().vocab_size());
    if (named) return absl::InvalidArgumentError(why);
    t.said = absl::StrCat("no tokenizer files: ", why,
                          " (the job's tokens are not GPT-2's)");
    return t;
  }
  std::string config = absl::StrCat(
      "{\n  \"tokenizer_class\": \"GPT2Tokenizer\",\n"
      "  \"model_max_length\": ", spec.model().block_size(), ",\n"
      "  \"add_prefix_space\": false");
  if ((*bpe)->eot_token() >= 0) {
    absl::StrAppend(&config,
                    ",\n  \"bos_token\": \"<|endoftext|>\",\n"
                    "  \"eos_token\": \"<|endoftext|>\",\n"
                    "  \"unk_token\": \"<|endoftext|>\"");
  }
  config += "\n}\n";
  t.files = {{"vocab.json", *std::move(encoder)},
             {"merges.txt", *std::move(merges)},
             {"tokenizer_config.json", std::move(config)}};
  t.said = absl::StrCat("GPT-2's tokenizer from ", dir, " (", tokens,
                        " tokens): vocab.json, merges.txt, "
                        "tokenizer_config.json");
  return t;
}


}  // namespace

absl::StatusOr<int64_t> LatestCompleteStep(absl::string_view dir) {
  absl::StatusOr<std::vector<int64_t>> steps = ListCheckpointStepDirs(dir);
  if (!steps.ok()) return steps.status();
  for (auto it = steps->rbegin(); it != steps->rend(); ++it) {
    const int64_t step = *it;
    absl::StatusOr<CheckpointHeader> first =
        VerifyShardCheckpoint(CheckpointPath(dir, step, 0));
    if (!first.ok() || first->step != step || first->shard != 0) continue;
    bool complete = true;
    for (int s = 1; s < first->num_shards && complete; ++s) {
      absl::StatusOr<CheckpointHeader> h =
          VerifyShardCheckpoint(CheckpointPath(dir, step, s));
      complete = h.ok() && h->step == step && h->shard == s &&
                 h->partition_version == first->partition_version;
    }
    if (complete) return step;
  }
  return absl::NotFoundError(
      absl::StrCat("no complete checkpoint (every shard's file of one step) "
                   "under ",
                   dir));
}

absl::StatusOr<AssembledModel> AssembleCheckpoint(absl::string_view dir,
                                                  int64_t step) {
  AssembledModel model;
  model.step = step;
  std::map<std::string, size_t> index;
  // Element ranges filled, per tensor, to check the chunks tile it.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> filled;
  CheckpointHeader first;
  int num_shards = 1;
  for (int s = 0; s < num_shards; ++s) {
    const std::string path = CheckpointPath(dir, step, s);
    absl::StatusOr<ShardCheckpoint> ckpt = ReadShardCheckpoint(path);
    if (!ckpt.ok()) return ckpt.status();
    const CheckpointHeader& h = ckpt->header;
    if (h.step != step || h.shard != s) {
      return absl::DataLossError(
          absl::StrCat(path, " holds step ", h.step, " of shard ", h.shard));
    }
    if (s == 0) {
      first = h;
      num_shards = h.num_shards;
      model.spec = h.spec;
      if (num_shards < 1) {
        return absl::DataLossError(
            absl::StrCat(path, ": bad shard count ", num_shards));
      }
      for (TensorSpec& t : GptTensorSpecs(h.spec.model())) {
        index[t.name] = model.tensors.size();
        model.tensors.push_back(
            {t.name, t.shape, std::vector<float>(t.num_elements(), 0.0f)});
      }
      filled.resize(model.tensors.size());
    } else if (h.num_shards != first.num_shards ||
               h.partition_version != first.partition_version) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, " belongs to another job or partition (", h.num_shards,
          " shards, partition version ", h.partition_version, ") than ",
          CheckpointPath(dir, step, 0), " (", first.num_shards,
          " shards, partition version ", first.partition_version, ")"));
    }
    for (const ChunkData& c : ckpt->chunks) {
      auto it = index.find(c.desc.tensor());
      if (it == index.end()) {
        return absl::DataLossError(absl::StrCat(
            path, ": chunk of unknown tensor '", c.desc.tensor(), "'"));
      }
      SafeTensor& t = model.tensors[it->second];
      if (c.desc.begin() < 0 ||
          c.desc.end() > static_cast<int64_t>(t.data.size()) ||
          c.desc.end() - c.desc.begin() !=
              static_cast<int64_t>(c.params.size())) {
        return absl::DataLossError(
            absl::StrCat(path, ": chunk ", c.desc.ShortDebugString(),
                         " does not fit tensor '", t.name, "' of ",
                         t.data.size(), " elements"));
      }
      std::copy(c.params.begin(), c.params.end(),
                t.data.begin() + c.desc.begin());
      filled[it->second].push_back({c.desc.begin(), c.desc.end()});
    }
  }
  for (size_t i = 0; i < model.tensors.size(); ++i) {
    auto& ranges = filled[i];
    std::sort(ranges.begin(), ranges.end());
    int64_t next = 0;
    for (auto [b, e] : ranges) {
      if (b != next) break;
      next = e;
    }
    if (next != static_cast<int64_t>(model.tensors[i].data.size())) {
      return absl::DataLossError(
          absl::StrCat("checkpoint step ", step, " under ", dir,
                       ": the shards' chunks of '", model.tensors[i].name,
                       "' do not cover it exactly (covered up to "
                       "element ",
                       next, " of ", model.tensors[i].data.size(), ")"));
    }
  }
  return model;
}

absl::StatusOr<ExportFormat> ParseExportFormat(absl::string_view name) {
  if (name == "lmps") return ExportFormat::kLmps;
  if (name == "hf") return ExportFormat::kHuggingFace;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown export format '", name,
      "': lmps (one safetensors file, lmps's names) or hf (a Hugging Face "
      "GPT-2 directory: model.safetensors and config.json)"));
}

absl::StatusOr<ExportResult> ExportCheckpoint(absl::string_view dir,
                                              int64_t step,
                                              const std::string& out_path,
                                              const ExportOptions& options) {
  if (step < 0) {
    absl::StatusOr<int64_t> latest = LatestCompleteStep(dir);
    if (!latest.ok()) return latest.status();
    step = *latest;
  }
  absl::StatusOr<AssembledModel> model = AssembleCheckpoint(dir, step);
  if (!model.ok()) return model.status();
  ExportResult result;
  std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"lmps.step", absl::StrCat(step)},
      {"lmps.job", model->spec.name()},
      {"lmps.model", model->spec.model().ShortDebugString()},
  };
  if (options.format == ExportFormat::kLmps) {
    if (absl::Status s =
            WriteSafetensorsFile(out_path, model->tensors, metadata);
        !s.ok()) {
      return s;
    }
    result.model = *std::move(model);
    return result;
  }
  absl::StatusOr<std::vector<SafeTensor>> hf =
      LmpsToHfGpt2(model->spec.model(), model->tensors);
  if (!hf.ok()) return hf.status();
  absl::StatusOr<HfTokenizer> tokenizer =
      MakeHfTokenizer(model->spec, options);
  if (!tokenizer.ok()) return tokenizer.status();
  std::error_code ec;
  std::filesystem::create_directories(out_path, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create directory ", out_path, ": ", ec.message()));
  }
  if (absl::Status s = WriteSafetensorsFile(
          absl::StrCat(out_path, "/model.safetensors"), *hf, metadata);
      !s.ok()) {
    return s;
  }
  tokenizer->files["config.json"] = HfGpt2ConfigJson(model->spec.model());
  for (const auto& [name, text] : tokenizer->files) {
    if (absl::Status s =
            WriteFileAtomically(absl::StrCat(out_path, "/", name), text);
        !s.ok()) {
      return s;
    }
  }
  result.model = *std::move(model);
  result.tokenizer = std::move(tokenizer->said);
  return result;
}

}  // namespace lmps
