#include "common/formats/append_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<AppendFile>> AppendFile::Open(std::string path,
                                                             std::string what) {
  const int fd =
      ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, " ", path, ": cannot open for appending: ", std::strerror(errno)));
  }
  return std::unique_ptr<AppendFile>(
      new AppendFile(fd, std::move(path), std::move(what)));
}

AppendFile::~AppendFile() { ::close(fd_); }

absl::Status AppendFile::AppendLine(absl::string_view line) {
  const std::string whole = absl::StrCat(line, "\n");
  const ssize_t n = ::write(fd_, whole.data(), whole.size());
  if (n != static_cast<ssize_t>(whole.size())) {
    return absl::ResourceExhaustedError(absl::StrCat(
        what_, " ", path_, ": ",
        n < 0 ? std::strerror(errno)
              : absl::StrCat("short write (", n, " of ", whole.size(),
                             " bytes): the disk is full?")));
  }
  return absl::OkStatus();
}

std::vector<std::string> ReadLinesIfRegular(const std::string& path) {
  std::vector<std::string> lines;
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return lines;
  std::ifstream f(path);
  for (std::string line; std::getline(f, line);) lines.push_back(line);
  return lines;
}

}  // namespace lmps
