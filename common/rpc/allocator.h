// Process-wide glibc malloc settings for daemons that move large tensor
// buffers (pull and push messages of megabytes each).
//
// By default glibc serves large blocks with fresh mmap()s and returns freed
// memory to the kernel, so every pull or push faults its pages in again;
// measured on this project's benchmark machine that was ~75% of the CPU of
// the parameter-server path (bench/ps_vs_iperf3.sh: pull/iperf3 0.13 -> 0.61
// with these settings). Keeping large blocks in the heap and one arena avoids
// it at the cost of holding on to freed memory.
//
// Thread-safety: call once at the start of main(), before other threads.
#ifndef LMPS_COMMON_RPC_ALLOCATOR_H_
#define LMPS_COMMON_RPC_ALLOCATOR_H_

#include <malloc.h>

namespace lmps {

inline void TuneAllocatorForLargeBuffers() {
  mallopt(M_MMAP_THRESHOLD, 32 << 20);  // blocks up to 32 MiB from the heap
  // ... and larger ones too (32 MiB is the most M_MMAP_THRESHOLD accepts):
  // a 64 MiB all-reduce's ring segments were mmapped and faulted in again on
  // every call (bench/allreduce_vs_iperf3.sh: busbw/iperf3 0.05 -> 0.37).
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);   // keep up to 1 GiB of freed memory
  mallopt(M_ARENA_MAX, 1);              // one arena: buffers are reused
}

}  // namespace lmps

#endif  // LMPS_COMMON_RPC_ALLOCATOR_H_
