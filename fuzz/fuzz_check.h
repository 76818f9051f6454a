// Property checks for the lmps fuzz targets: a violated contract prints what
// was expected and aborts, which libFuzzer reports as a crash with the input
// that caused it.
#ifndef LMPS_FUZZ_FUZZ_CHECK_H_
#define LMPS_FUZZ_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>
#include <string>

#define LMPS_FUZZ_CHECK(cond, what)                                       \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "%s:%d: property violated: %s\n  %s\n",       \
                   __FILE__, __LINE__, #cond, std::string(what).c_str()); \
      std::abort();                                                       \
    }                                                                     \
  } while (0)

#endif  // LMPS_FUZZ_FUZZ_CHECK_H_
