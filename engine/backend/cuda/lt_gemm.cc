#include "engine/backend/cuda/lt_gemm.h"

#include <bit>

#include "engine/backend/cuda/cuda_status.h"
#include "engine/common/status_macros.h"

namespace moe::cuda {
namespace {

// Plans kept; prefill chunks come in many sizes, so the table is emptied when it fills.
constexpr size_t kMaxPlans = 4096;

// The alignment cuBLASLt may assume for a buffer whose rows are `row_bytes` apart: the largest
// power of two (at most 256) dividing both its address and row_bytes.
uint32_t Alignment(const void* pointer, int64_t row_bytes) {
  const uint64_t bits =
      reinterpret_cast<uintptr_t>(pointer) | static_cast<uint64_t>(row_bytes) | uint64_t{256};
  return static_cast<uint32_t>(uint64_t{1} << std::countr_zero(bits));
}

cublasStatus_t SetDesc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute,
                       const auto& value) {
  return cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value));
}
cublasStatus_t SetPreference(cublasLtMatmulPreference_t preference,
                             cublasLtMatmulPreferenceAttributes_t attribute, const auto& value) {
  return cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof(value));
}

}  // namespace

absl::Status LtGemm::Init(void* workspace, size_t workspace_bytes) {
  cublasLtHandle_t handle = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&handle));
  handle_ = decltype(handle_)(handle);
  workspace_ = workspace;
  workspace_bytes_ = workspace_bytes;
  plans_.clear();
  num_unsupported_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<LtGemm::Plan*> LtGemm::GetPlan(const LtGemmArgs& args) {
  const PlanKey key{args.m,
                    args.n,
                    args.k,
                    args.out_stride,
                    args.bias != nullptr,
                    Alignment(args.x, args.k * 2),
                    Alignment(args.w, args.k * 2),
                    Alignment(args.out, args.out_stride * 4),
                    args.bias != nullptr ? Alignment(args.bias, 0) : 0};
  if (auto found = plans_.find(key); found != plans_.end()) return &found->second;
  if (plans_.size() >= kMaxPlans) {
    plans_.clear();
    num_unsupported_ = 0;
  }

  // Row-major out[m, n] = x[m, k] W[n, k]^T is column-major out^T[n, m] = W^T x^T: A = W stored
  // k x n (column-major, leading dimension k) and transposed, B = x stored k x m, C = D = out
  // stored n x m with leading dimension out_stride.
  Plan plan;
  cublasLtMatmulDesc_t desc = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  plan.desc = MatmulDesc(desc);
  CUBLAS_RETURN_IF_ERROR(SetDesc(desc, CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T));
  CUBLAS_RETURN_IF_ERROR(SetDesc(desc, CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N));
  if (args.bias != nullptr) {
    CUBLAS_RETURN_IF_ERROR(SetDesc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS));
    CUBLAS_RETURN_IF_ERROR(
        SetDesc(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, static_cast<const void*>(args.bias)));
  }
  auto layout = [](cudaDataType type, int64_t rows, int64_t cols,
                   int64_t leading) -> absl::StatusOr<Layout> {
    cublasLtMatrixLayout_t created = nullptr;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&created, type, static_cast<uint64_t>(rows),
                                                      static_cast<uint64_t>(cols), leading));
    return Layout(created);
  };
  ASSIGN_OR_RETURN(plan.w, layout(CUDA_R_16BF, args.k, args.n, args.k));
  ASSIGN_OR_RETURN(plan.x, layout(CUDA_R_16BF, args.k, args.m, args.k));
  ASSIGN_OR_RETURN(plan.out, layout(CUDA_R_32F, args.n, args.m, args.out_stride));

  cublasLtMatmulPreference_t raw_preference = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&raw_preference));
  const UniqueHandle<ReleasedBy<cublasLtMatmulPreference_t, &cublasLtMatmulPreferenceDestroy>>
      preference(raw_preference);
  CUBLAS_RETURN_IF_ERROR(SetPreference(raw_preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                       static_cast<uint64_t>(workspace_bytes_)));
  CUBLAS_RETURN_IF_ERROR(
      SetPreference(raw_preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_w));
  CUBLAS_RETURN_IF_ERROR(
      SetPreference(raw_preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_x));
  CUBLAS_RETURN_IF_ERROR(
      SetPreference(raw_preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_out));
  CUBLAS_RETURN_IF_ERROR(
      SetPreference(raw_preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_out));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  // No algorithm comes back as NOT_SUPPORTED or as zero results, depending on the case.
  const cublasStatus_t searched = cublasLtMatmulAlgoGetHeuristic(
      handle_.get(), desc, plan.w.get(), plan.x.get(), plan.out.get(), plan.out.get(),
      raw_preference, 1, &result, &found);
  if (searched != CUBLAS_STATUS_SUCCESS && searched != CUBLAS_STATUS_NOT_SUPPORTED) {
    CUBLAS_RETURN_IF_ERROR(searched);
  }
  if (searched == CUBLAS_STATUS_SUCCESS && found > 0) {
    plan.supported = true;
    plan.algo = result.algo;
  } else {
    plan = Plan();
    ++num_unsupported_;
  }
  auto [inserted, unused] = plans_.emplace(key, std::move(plan));
  return &inserted->second;
}

absl::StatusOr<bool> LtGemm::Run(const LtGemmArgs& args, cudaStream_t stream) {
  ASSIGN_OR_RETURN(Plan * plan, GetPlan(args));
  if (!plan->supported) return false;
  if (args.bias != nullptr) {
    CUBLAS_RETURN_IF_ERROR(SetDesc(plan->desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                   static_cast<const void*>(args.bias)));
  }
  const float alpha = 1.0f, beta = args.accumulate ? 1.0f : 0.0f;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(handle_.get(), plan->desc.get(), &alpha, args.w,
                                        plan->w.get(), args.x, plan->x.get(), &beta, args.out,
                                        plan->out.get(), args.out, plan->out.get(), &plan->algo,
                                        workspace_, workspace_bytes_, stream));
  return true;
}

}  // namespace moe::cuda
