// A fixed-size pool of threads running closures in FIFO order. Used by the
// gRPC adapter to run blocking shard calls off gRPC's callback threads.
//
// Thread-safety: Schedule may be called from any thread. The destructor runs
// every task already scheduled, then joins the threads; scheduling after
// destruction has begun is not allowed.
#ifndef LMPS_SERVER_RPC_WORK_POOL_H_
#define LMPS_SERVER_RPC_WORK_POOL_H_

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace lmps {

class RpcWorkPool {
 public:
  explicit RpcWorkPool(int num_threads);
  ~RpcWorkPool();
  RpcWorkPool(const RpcWorkPool&) = delete;
  RpcWorkPool& operator=(const RpcWorkPool&) = delete;

  void Schedule(std::function<void()> task);

 private:
  void Run();

  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace lmps

#endif  // LMPS_SERVER_RPC_WORK_POOL_H_
