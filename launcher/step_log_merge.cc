#include "launcher/step_log_merge.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/rpc/status_util.h"

namespace lmps {
namespace {

namespace fs = std::filesystem;

// The record's "step", or -1 when it is not a JSON object with an integer
// step >= 0.
int64_t StepOf(const nlohmann::json& j) {
  if (!j.is_object()) return -1;
  auto it = j.find("step");
  if (it == j.end() || !it->is_number_integer()) return -1;
  return std::max<int64_t>(-1, it->get<int64_t>());
}

bool Number(const nlohmann::json& j, const char* key, double* v) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number()) return false;
  *v = it->get<double>();
  return true;
}

}  // namespace

nlohmann::ordered_json MergeStep(
    int64_t step, const std::map<std::string, nlohmann::json>& records) {
  double time = 0, loss_sum = 0, tokens = 0, bubble_sum = 0;
  double pulled = 0, pushed = 0;
  int losses = 0, bubbles = 0;
  std::optional<double> eval, lr, grad_norm;
  nlohmann::ordered_json workers = nlohmann::ordered_json::object();
  for (const auto& [node, r] : records) {
    double v;
    if (Number(r, "time", &v)) time = std::max(time, v);
    if (Number(r, "loss", &v)) {
      loss_sum += v;
      ++losses;
      // One per data-parallel replica: tensor-parallel ranks of a stage
      // process the same tokens.
      double tp = 0;
      if (!Number(r, "tp", &tp) || tp == 0) {
        if (Number(r, "tokens_per_second", &v)) tokens += v;
      }
    }
    if (!eval && Number(r, "eval_loss", &v)) eval = v;
    if (!lr && Number(r, "lr", &v)) lr = v;
    if (!grad_norm && Number(r, "grad_norm", &v)) grad_norm = v;
    if (Number(r, "bytes_pulled", &v)) pulled += v;
    if (Number(r, "bytes_pushed", &v)) pushed += v;
    if (Number(r, "bubble", &v)) {
      bubble_sum += v;
      ++bubbles;
    }
    nlohmann::ordered_json phases = nlohmann::ordered_json::object();
    for (const char* key :
         {"compute_s", "pull_s", "push_s", "wait_s", "comm_hidden"}) {
      if (Number(r, key, &v)) phases[key] = v;
    }
    workers[node] = phases;
  }
  nlohmann::ordered_json m;
  m["step"] = step;
  m["time"] = time;
  if (losses > 0) m["loss"] = loss_sum / losses;
  if (eval) m["eval_loss"] = *eval;
  if (lr) m["lr"] = *lr;
  if (grad_norm) m["grad_norm"] = *grad_norm;
  if (losses > 0) m["tokens_per_second"] = tokens;
  m["bytes_pulled"] = static_cast<int64_t>(pulled);
  m["bytes_pushed"] = static_cast<int64_t>(pushed);
  if (bubbles > 0) m["bubble"] = bubble_sum / bubbles;
  m["workers"] = workers;
  return m;
}

absl::StatusOr<std::unique_ptr<StepLogMerger>> StepLogMerger::Create(
    std::string in_dir, std::string out_path,
    std::function<void(const std::string&)> warn) {
  // A resumed run: the file's last step.
  int64_t last = -1, number = 0;
  for (const std::string& line : ReadLinesIfRegular(out_path)) {
    ++number;
    const int64_t step = StepOf(nlohmann::json::parse(line, nullptr, false));
    if (step < 0) {
      if (warn) {
        warn(absl::StrCat(out_path, ":", number, ": not a step record; skipped"));
      }
      continue;
    }
    last = std::max(last, step);
  }
  LMPS_ASSIGN_OR_RETURN(std::unique_ptr<AppendFile> out,
                        AppendFile::Open(std::move(out_path), "step log"));
  std::unique_ptr<StepLogMerger> m(
      new StepLogMerger(std::move(in_dir), std::move(out), std::move(warn)));
  m->last_written_ = last;
  return m;
}

void StepLogMerger::ReadLine(const std::string& file, int64_t number,
                             const std::string& line) {
  const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  const int64_t step = StepOf(j);
  auto node = j.is_object() ? j.find("node") : j.end();
  if (step < 0 || node == j.end() || !node->is_string()) {
    if (warn_) {
      warn_(absl::StrCat(file, ":", number,
                         ": not a step record (a JSON object with an integer "
                         "\"step\" and a \"node\"); skipped"));
    }
    return;
  }
  if (step <= last_written_) return;  // written already (a resumed run)
  nlohmann::json& record = pending_[step][node->get<std::string>()];
  if (record.is_null()) {
    record = j;
  } else {
    record.update(j);  // the later line wins, key by key
  }
}

void StepLogMerger::ReadNew() {
  std::error_code ec;
  std::vector<std::string> files;
  // increment(ec), not ++: a directory changing under the launcher must not
  // throw.
  for (fs::directory_iterator it(in_dir_, ec), end; !ec && it != end;
       it.increment(ec)) {
    if (it->path().extension() == ".jsonl" && it->is_regular_file(ec)) {
      files.push_back(it->path().string());
    }
  }
  std::sort(files.begin(), files.end());
  for (const std::string& file : files) {
    Input& in = inputs_[file];
    std::ifstream f(file, std::ios::binary);
    if (!f) continue;
    f.seekg(static_cast<std::streamoff>(in.offset));
    std::string line;
    while (std::getline(f, line)) {
      if (f.eof()) break;  // no newline yet: a line still being written
      in.offset += line.size() + 1;
      ++in.lines;
      ReadLine(file, in.lines, line);
    }
  }
}

absl::Status StepLogMerger::Poll(int64_t complete_before) {
  ReadNew();
  while (!pending_.empty() && pending_.begin()->first < complete_before) {
    auto first = pending_.begin();
    if (first->first > last_written_) {
      LMPS_RETURN_IF_ERROR(
          out_->AppendLine(MergeStep(first->first, first->second).dump()));
      last_written_ = first->first;
    }
    pending_.erase(first);
  }
  return absl::OkStatus();
}

}  // namespace lmps
