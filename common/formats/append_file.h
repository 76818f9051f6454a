// AppendFile: a log of lines (JSON Lines) that writers only append to, as
// the step log and the event log are (worker/step_log.h,
// launcher/step_log_merge.h, launcher/event_log.h).
//
// Open creates the file if needed and opens it O_APPEND; AppendLine writes
// the line and its newline in one write(), so each line lands whole at the
// end of the file even with other appenders, and a crash leaves at most the
// last line torn. A failed or short write (a full disk) is
// ResourceExhausted naming the file; an unopenable path FailedPrecondition.
// `what` ("step log") starts every error message.
//
// ReadLinesIfRegular reads an existing log (a resumed run): the lines of
// `path` when it is a regular file, none otherwise (a device or a FIFO is
// never read).
//
// Thread-safety: an AppendFile is not thread-safe; one owner appends.
#ifndef LMPS_COMMON_FORMATS_APPEND_FILE_H_
#define LMPS_COMMON_FORMATS_APPEND_FILE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace lmps {

class AppendFile {
 public:
  static absl::StatusOr<std::unique_ptr<AppendFile>> Open(std::string path,
                                                          std::string what);
  ~AppendFile();

  absl::Status AppendLine(absl::string_view line);
  const std::string& path() const { return path_; }

 private:
  AppendFile(int fd, std::string path, std::string what)
      : fd_(fd), path_(std::move(path)), what_(std::move(what)) {}

  const int fd_;
  const std::string path_;
  const std::string what_;
};

std::vector<std::string> ReadLinesIfRegular(const std::string& path);

}  // namespace lmps

#endif  // LMPS_COMMON_FORMATS_APPEND_FILE_H_
