#include <chrono>
#include <cstdio>
#include <vector>
#include <atomic>
#include <thread>
#include "worker/backend/cpu_backend.h"
#include "worker/backend/thread_pool.h"
using namespace lmps;
int main(int argc, char** argv) {
  int threads = atoi(argv[1]);
  auto be = *CpuBackend::Create({.num_threads = threads});
  int N = 1024, C = 256, OC = 768;
  std::vector<float> inp(N * C, 0.1f), w(OC * C, 0.2f), b(OC, 0.f), out(N * OC);
  for (int r = 0; r < 3; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 50; ++i) be->MatmulForward(out.data(), inp.data(), w.data(), b.data(), N, C, OC);
    auto t1 = std::chrono::steady_clock::now();
    double s = std::chrono::duration<double>(t1 - t0).count() / 50;
    printf("threads %d matmul %.3f ms %.1f GF\n", threads, s * 1e3, 2.0 * N * C * OC / s / 1e9);
  }
  ThreadPool pool(threads);
  auto t0 = std::chrono::steady_clock::now();
  int x[64] = {0};
  for (int i = 0; i < 100000; ++i) pool.ParallelFor(8, [&](int t) { x[t * 8]++; });
  auto t1 = std::chrono::steady_clock::now();
  {
    std::atomic<int> by_caller{0}, total{0};
    auto me = std::this_thread::get_id();
    std::vector<float> buf(1 << 20);
    for (int i = 0; i < 2000; ++i) pool.ParallelFor(8, [&](int t) {
      for (int k = t * (1 << 17); k < (t + 1) * (1 << 17); ++k) buf[k] += 1.0f;
      if (std::this_thread::get_id() == me) by_caller++;
      total++;
    });
    printf("caller ran %d of %d tasks\n", by_caller.load(), total.load());
  }
  printf("empty ParallelFor(8): %.2f us\n", std::chrono::duration<double>(t1 - t0).count() / 100000 * 1e6);
}
// second main-like test
