#include "common/process/binaries.h"

#include <unistd.h>

#include <filesystem>

#include "absl/strings/str_cat.h"

namespace lmps {

namespace fs = std::filesystem;

std::string BinDir(const std::string& bin_dir) {
  if (!bin_dir.empty()) return bin_dir;
  std::error_code ec;
  const fs::path exe = fs::canonical("/proc/self/exe", ec);
  if (ec) return ".";
  return exe.parent_path().parent_path().string();
}

std::string BinaryIn(const std::string& bin_dir, const std::string& rel) {
  const std::string nested = absl::StrCat(bin_dir, "/", rel);
  if (access(nested.c_str(), X_OK) == 0) return nested;
  return absl::StrCat(bin_dir, "/", fs::path(rel).filename().string());
}

}  // namespace lmps
