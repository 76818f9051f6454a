// Where the lmps binaries are, for the programs that start them (the
// launcher, bench/ps_bench): a Bazel output tree (bin/server/lmps_server,
// bin/worker/lmps_worker, ...) or a flat directory of binaries (a container
// image's /usr/local/bin).
//
// Thread-safe: plain functions of their arguments and the file system.
#ifndef LMPS_COMMON_PROCESS_BINARIES_H_
#define LMPS_COMMON_PROCESS_BINARIES_H_

#include <string>

namespace lmps {

// `bin_dir`, or when it is empty the directory two levels above this
// executable: the Bazel output root of bin/launcher/lmps_local or
// bin/bench/ps_bench.
std::string BinDir(const std::string& bin_dir);

// Binary `rel` (e.g. "server/lmps_server") in `bin_dir`: at that path if it
// is executable there (the Bazel layout), else by its file name alone (a
// flat directory). The result need not exist: ProcessGroup::Spawn names a
// missing binary.
std::string BinaryIn(const std::string& bin_dir, const std::string& rel);

}  // namespace lmps

#endif  // LMPS_COMMON_PROCESS_BINARIES_H_
