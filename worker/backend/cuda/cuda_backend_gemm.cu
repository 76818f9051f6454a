// CudaBackend (cuda_backend.h): the matrix products and their bf16
// operands. Gemm runs a gemm_plan.h plan through cuBLASLt (cached LtPlans,
// fused bias epilogue) or, failing that, cublasGemmEx plus a bias kernel;
// batched plans through cublasGemmStridedBatchedEx. In kBf16 the operands
// are converted with ToBf16, the weights once per parameter version through
// the bf16 weight cache (Bf16WeightOf, invalidated by Wrote, freed by
// DropBf16Weights).
#include "worker/backend/cuda/cuda_backend.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <memory>

#include "absl/strings/str_cat.h"
#include "worker/backend/cuda/cuda_backend_internal.h"
#include "worker/backend/cuda/gemm_plan.h"
#include "worker/backend/cuda/kernels.h"

namespace lmps {
namespace {

using cuda_backend_internal::CublasError;
using cuda_gemm::GemmPlan;

// The largest power of two (up to 256) dividing the address.
int64_t Alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a == 0) return 256;
  return std::min<int64_t>(256, static_cast<int64_t>(a & (~a + 1)));
}

cublasOperation_t Op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

}  // namespace

// ---------------------------------------------------------------------------
// bf16 operands.
// ---------------------------------------------------------------------------

void CudaBackend::ToBf16(uint16_t* dst, const float* src, size_t n) {
  cuda_kernels::FloatToBf16(stream_, dst, src, n);
  CheckLaunch("FloatToBf16");
}

const uint16_t* CudaBackend::Bf16WeightOf(const float* weight, size_t n) {
  const uintptr_t key = reinterpret_cast<uintptr_t>(weight);
  Bf16Weight& w = bf16_weights_[key];
  if (w.valid && w.n == n) return w.data;
  if (w.data == nullptr || w.n != n) {
    if (w.data != nullptr) cudaFree(w.data);  // waits for queued readers
    w.data = nullptr;
    w.valid = false;
    w.n = n;
    const cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&w.data),
                                     std::max<size_t>(n, 1) * sizeof(uint16_t));
    if (e != cudaSuccess) {
      cudaGetLastError();
      w.data = nullptr;
      bf16_weights_.erase(key);
      Defer(absl::ResourceExhaustedError(absl::StrCat(
          "cuda: cannot allocate ", n * sizeof(uint16_t),
          " bytes for the bf16 copy of a weight: ", cudaGetErrorString(e))));
      return nullptr;
    }
    bf16_weights_max_bytes_ =
        std::max(bf16_weights_max_bytes_, n * sizeof(float));
  }
  // Stream order: earlier products reading the old copy run first.
  ToBf16(w.data, weight, n);
  w.valid = true;
  ++bf16_weight_conversions_;
  return w.data;
}

template <typename F>
void CudaBackend::ForEachBf16WeightIn(const void* p, size_t bytes, F f) {
  if (bf16_weights_.empty() || bytes == 0) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t end =
      bytes > UINTPTR_MAX - begin ? UINTPTR_MAX : begin + bytes;
  // An entry overlaps [begin, end) iff key < end and key + its bytes >
  // begin; every entry is at most bf16_weights_max_bytes_ long.
  const uintptr_t lo =
      begin > bf16_weights_max_bytes_ ? begin - bf16_weights_max_bytes_ : 0;
  for (auto it = bf16_weights_.upper_bound(lo);
       it != bf16_weights_.end() && it->first < end;) {
    auto next = std::next(it);
    if (it->first + it->second.n * sizeof(float) > begin) f(it);
    it = next;
  }
}

void CudaBackend::Wrote(const void* p, size_t bytes) {
  ForEachBf16WeightIn(p, bytes, [](auto it) { it->second.valid = false; });
}

void CudaBackend::DropBf16Weights(const void* p, size_t bytes) {
  ForEachBf16WeightIn(p, bytes, [this](auto it) {
    // cudaFree waits for queued products that read the copy.
    if (it->second.data != nullptr) cudaFree(it->second.data);
    bf16_weights_.erase(it);
  });
  if (bf16_weights_.empty()) bf16_weights_max_bytes_ = 0;
}

// ---------------------------------------------------------------------------
// GEMM.
// ---------------------------------------------------------------------------

bool CudaBackend::LtGemm(const GemmPlan& p, const float* bias, const void* a,
                         const void* b, bool bf16_inputs) {
  const LtKey key = {p.trans_a,    p.trans_b,    p.m,
                     p.n,          p.k,          p.lda,
                     p.ldb,        p.ldc,        bias != nullptr,
                     Alignment(a), Alignment(b), Alignment(p.c),
                     bf16_inputs};
  std::unique_ptr<LtPlan>& slot = lt_plans_[key];
  if (slot == nullptr) {
    slot = std::make_unique<LtPlan>();
    LtPlan& plan = *slot;
    auto ok = [](cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS; };
    const cublasOperation_t ta = Op(p.trans_a), tb = Op(p.trans_b);
    const cublasLtEpilogue_t epilogue =
        bias != nullptr ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    cublasLtMatmulPreference_t pref = nullptr;
    // fp32 alpha/beta, C, D and bias either way.
    const cublasComputeType_t compute =
        bf16_inputs ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
    const cudaDataType_t in_type = bf16_inputs ? CUDA_R_16BF : CUDA_R_32F;
    bool good = ok(cublasLtMatmulDescCreate(&plan.desc, compute, CUDA_R_32F)) &&
                ok(cublasLtMatmulDescSetAttribute(
                    plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta))) &&
                ok(cublasLtMatmulDescSetAttribute(
                    plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb))) &&
                ok(cublasLtMatmulDescSetAttribute(plan.desc,
                                                  CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                  &epilogue, sizeof(epilogue)));
    if (good && bias != nullptr) {
      good = ok(cublasLtMatmulDescSetAttribute(
          plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    // Stored (pre-op) shapes, column-major.
    good =
        good &&
        ok(cublasLtMatrixLayoutCreate(&plan.a, in_type, p.trans_a ? p.k : p.m,
                                      p.trans_a ? p.m : p.k, p.lda)) &&
        ok(cublasLtMatrixLayoutCreate(&plan.b, in_type, p.trans_b ? p.n : p.k,
                                      p.trans_b ? p.k : p.n, p.ldb)) &&
        ok(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_32F, p.m, p.n, p.ldc)) &&
        ok(cublasLtMatmulPreferenceCreate(&pref));
    if (good) {
      const uint64_t ws = workspace_bytes_;
      const uint32_t align_a = static_cast<uint32_t>(key[9]);
      const uint32_t align_b = static_cast<uint32_t>(key[10]);
      const uint32_t align_c = static_cast<uint32_t>(key[11]);
      good = ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                 sizeof(ws))) &&
             ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                 sizeof(align_a))) &&
             ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                 sizeof(align_b))) &&
             ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                 sizeof(align_c))) &&
             ok(cublasLtMatmulPreferenceSetAttribute(
                 pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                 sizeof(align_c)));
    }
    if (good) {
      cublasLtMatmulHeuristicResult_t result{};
      int returned = 0;
      good = ok(cublasLtMatmulAlgoGetHeuristic(cublaslt_, plan.desc, plan.a,
                                               plan.b, plan.c, plan.c, pref, 1,
                                               &result, &returned)) &&
             returned > 0 && result.state == CUBLAS_STATUS_SUCCESS;
      if (good) plan.algo = result.algo;
    }
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
    plan.usable = good;
  }
  LtPlan& plan = *slot;
  if (!plan.usable) return false;
  if (bias != nullptr && cublasLtMatmulDescSetAttribute(
                             plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                             &bias, sizeof(bias)) != CUBLAS_STATUS_SUCCESS) {
    return false;
  }
  return cublasLtMatmul(cublaslt_, plan.desc, &p.alpha, a, plan.a, b, plan.b,
                        &p.beta, p.c, plan.c, p.c, plan.c, &plan.algo,
                        workspace_, workspace_bytes_,
                        stream_) == CUBLAS_STATUS_SUCCESS;
}

void CudaBackend::Gemm(const GemmPlan& p, const float* bias,
                       const uint16_t* a16, const uint16_t* b16) {
  const bool bf16_inputs = a16 != nullptr;
  const void* a = bf16_inputs ? static_cast<const void*>(a16) : p.a;
  const void* b = bf16_inputs ? static_cast<const void*>(b16) : p.b;
  const cudaDataType_t in_type = bf16_inputs ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute =
      bf16_inputs ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
  if (p.batch == 1) {
    // The bias epilogue reads the bias with vector loads.
    const bool fuse_bias = bias == nullptr || Alignment(bias) >= 16;
    if (LtGemm(p, fuse_bias ? bias : nullptr, a, b, bf16_inputs)) {
      if (!fuse_bias) {
        cuda_kernels::AddBias(stream_, p.c, bias, p.n, p.m);
        CheckLaunch("AddBias");
      }
      return;
    }
    ++gemm_fallbacks_;
    const cublasStatus_t s =
        cublasGemmEx(cublas_, Op(p.trans_a), Op(p.trans_b), p.m, p.n, p.k,
                     &p.alpha, a, in_type, static_cast<int>(p.lda), b, in_type,
                     static_cast<int>(p.ldb), &p.beta, p.c, CUDA_R_32F,
                     static_cast<int>(p.ldc), compute, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
      Defer(CublasError(s, "cublasGemmEx"));
      return;
    }
    if (bias != nullptr) {
      // C is m x n column-major with ldc == m for the linear layers.
      cuda_kernels::AddBias(stream_, p.c, bias, p.n, p.m);
      CheckLaunch("AddBias");
    }
    return;
  }
  const cublasStatus_t s = cublasGemmStridedBatchedEx(
      cublas_, Op(p.trans_a), Op(p.trans_b), p.m, p.n, p.k, &p.alpha, a,
      in_type, static_cast<int>(p.lda), p.stride_a, b, in_type,
      static_cast<int>(p.ldb), p.stride_b, &p.beta, p.c, CUDA_R_32F,
      static_cast<int>(p.ldc), p.stride_c, p.batch, compute,
      CUBLAS_GEMM_DEFAULT);
  if (s != CUBLAS_STATUS_SUCCESS) {
    Defer(CublasError(s, "cublasGemmStridedBatchedEx"));
  }
}

}  // namespace lmps
