#include "server/export.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/formats/hf_gpt2.h"
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

absl::StatusOr<AssembledModel> ExportCheckpoint(absl::string_view dir,
                                                int64_t step,
                                                const std::string& out_path,
                                                ExportFormat format) {
  if (step < 0) {
    absl::StatusOr<int64_t> latest = LatestCompleteStep(dir);
    if (!latest.ok()) return latest.status();
    step = *latest;
  }
  absl::StatusOr<AssembledModel> model = AssembleCheckpoint(dir, step);
  if (!model.ok()) return model.status();
  std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"lmps.step", absl::StrCat(step)},
      {"lmps.job", model->spec.name()},
      {"lmps.model", model->spec.model().ShortDebugString()},
  };
  if (format == ExportFormat::kLmps) {
    if (absl::Status s =
            WriteSafetensorsFile(out_path, model->tensors, metadata);
        !s.ok()) {
      return s;
    }
    return model;
  }
  absl::StatusOr<std::vector<SafeTensor>> hf =
      LmpsToHfGpt2(model->spec.model(), model->tensors);
  if (!hf.ok()) return hf.status();
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
  if (absl::Status s =
          WriteFileAtomically(absl::StrCat(out_path, "/config.json"),
                              HfGpt2ConfigJson(model->spec.model()));
      !s.ok()) {
    return s;
  }
  return model;
}

}  // namespace lmps
