#include "worker/backend/sim_backend.h"

#include <sys/mman.h>

#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace lmps {

absl::StatusOr<std::unique_ptr<SimBackend>> SimBackend::Create(
    SimBackendOptions options) {
  if (!(options.flops_per_second > 0) ||
      !std::isfinite(options.flops_per_second)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sim backend: the declared throughput ",
                     options.flops_per_second,
                     " FLOP/s is not a positive number"));
  }
  if (!options.sleep) {
    options.sleep = [](absl::Duration d) {
      const absl::Time start = absl::Now();
      absl::SleepFor(d);
      return absl::Now() - start;
    };
  }
  return std::unique_ptr<SimBackend>(new SimBackend(std::move(options)));
}

SimBackend::SimBackend(SimBackendOptions options)
    : options_(std::move(options)) {}

SimBackend::~SimBackend() {
  for (const auto& [p, bytes] : mapped_) munmap(p, bytes);
}

absl::StatusOr<void*> SimBackend::Map(size_t bytes) {
  if (bytes == 0) bytes = 1;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "sim backend: cannot map ", bytes, " bytes: ", std::strerror(errno)));
  }
  mapped_[p] = bytes;
  return p;
}

void SimBackend::Unmap(void* p) {
  auto it = mapped_.find(p);
  if (it == mapped_.end()) return;
  munmap(it->first, it->second);
  mapped_.erase(it);
}

absl::StatusOr<float*> SimBackend::Alloc(size_t floats) {
  if (floats > SIZE_MAX / sizeof(float)) {
    return absl::ResourceExhaustedError("sim backend: allocation too large");
  }
  absl::StatusOr<void*> p = Map(floats * sizeof(float));
  if (!p.ok()) return p.status();
  return static_cast<float*>(*p);
}

absl::StatusOr<int32_t*> SimBackend::AllocInt32(size_t n) {
  if (n > SIZE_MAX / sizeof(int32_t)) {
    return absl::ResourceExhaustedError("sim backend: allocation too large");
  }
  absl::StatusOr<void*> p = Map(n * sizeof(int32_t));
  if (!p.ok()) return p.status();
  return static_cast<int32_t*>(*p);
}

void SimBackend::Free(float* p) { Unmap(p); }
void SimBackend::Free(int32_t* p) { Unmap(p); }

void SimBackend::Charge(double flops) {
  const absl::Duration d = absl::Seconds(flops / options_.flops_per_second);
  charged_ += d;
  owed_ += d;
  if (owed_ >= options_.min_sleep) owed_ -= options_.sleep(owed_);
}

void SimBackend::MatmulForward(float*, const float*, const float*,
                               const float*, int N, int C, int OC) {
  Charge(2.0 * N * C * OC);
}

void SimBackend::MatmulBackward(float*, float*, float*, const float*,
                                const float*, const float*, int N, int C,
                                int OC) {
  Charge(4.0 * N * C * OC);
}

void SimBackend::AttentionForward(float*, float*, const float*, int B, int T,
                                  int C, int) {
  Charge(2.0 * B * T * T * C);
}

void SimBackend::AttentionBackward(float*, float*, const float*, const float*,
                                   const float*, int B, int T, int C, int) {
  Charge(4.0 * B * T * T * C);
}

}  // namespace lmps
