// Dense bf16 products through cuBLASLt, for the CUDA backend's projections with many rows
// (prefill): out[m, n] = x[m, k] W[n, k]^T (+ out) (+ bias), x and W bf16, out float32,
// float32 accumulation. One plan per shape and alignment (matmul descriptor, matrix layouts,
// the algorithm cuBLASLt's heuristic picked) is built on first use and reused, so a step pays
// no heuristic search; the bias is added by the GEMM's epilogue instead of a kernel of its own.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend/cuda/cuda_raii.h"

namespace moe::cuda {

struct LtGemmArgs {
  const uint16_t* x = nullptr;  // [m, k] bf16, dense
  const void* w = nullptr;      // [n, k] bf16, dense
  int64_t m = 0, n = 0, k = 0;
  float* out = nullptr;  // [m, n] with row stride out_stride
  int64_t out_stride = 0;
  const float* bias = nullptr;  // [n] or null
  bool accumulate = false;      // out += product (else out = product)
};

class LtGemm {
 public:
  // `workspace` (device memory) may be shared with cuBLAS work ordered on the same stream.
  absl::Status Init(void* workspace, size_t workspace_bytes);
  // Enqueues the product; false when cuBLASLt offers no algorithm for this shape and alignment
  // (asked once per shape), and the caller computes it another way.
  absl::StatusOr<bool> Run(const LtGemmArgs& args, cudaStream_t stream);

  // Shapes planned so far, and how many of them cuBLASLt had no algorithm for.
  int64_t num_plans() const { return static_cast<int64_t>(plans_.size()); }
  int64_t num_unsupported() const { return num_unsupported_; }

 private:
  using Layout = UniqueHandle<ReleasedBy<cublasLtMatrixLayout_t, &cublasLtMatrixLayoutDestroy>>;
  using MatmulDesc = UniqueHandle<ReleasedBy<cublasLtMatmulDesc_t, &cublasLtMatmulDescDestroy>>;

  // What a plan depends on: the shape, whether there is a bias, and the pointers' alignment
  // (the heuristic only offers algorithms the alignment allows).
  struct PlanKey {
    int64_t m, n, k, out_stride;
    bool bias;
    uint32_t align_x, align_w, align_out, align_bias;
    bool operator==(const PlanKey&) const = default;
    template <typename H>
    friend H AbslHashValue(H h, const PlanKey& key) {
      return H::combine(std::move(h), key.m, key.n, key.k, key.out_stride, key.bias, key.align_x,
                        key.align_w, key.align_out, key.align_bias);
    }
  };
  struct Plan {
    bool supported = false;  // false: no algorithm (the handles are empty)
    MatmulDesc desc;
    Layout w, x, out;  // A = W (transposed), B = x, C = D = out, column-major views
    cublasLtMatmulAlgo_t algo;
  };

  absl::StatusOr<Plan*> GetPlan(const LtGemmArgs& args);

  UniqueHandle<ReleasedBy<cublasLtHandle_t, &cublasLtDestroy>> handle_;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  absl::flat_hash_map<PlanKey, Plan> plans_;
  int64_t num_unsupported_ = 0;
};

}  // namespace moe::cuda
