#include <sys/mman.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/backend/cpu/kernels.h"

namespace moe::cpu {
namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}  // namespace

absl::StatusOr<PackedMatrix> PackedMatrix::Pack(const void* weights, DType type, int64_t rows,
                                                int64_t in) {
  if (type != DType::kBF16 && type != DType::kF16 && type != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("cpu: cannot use ", DTypeName(type), " weights in a matmul"));
  }
  PackedMatrix packed;
  packed.type_ = type == DType::kBF16 ? DType::kBF16 : DType::kF32;
  packed.rows_ = rows;
  packed.in_ = in;
  // Big matrices on transparent huge pages where the kernel allows them (madvise mode): the
  // kernels stream whole matrices, and 4 KiB pages cost a TLB miss every 64 cache lines.
  const size_t alignment = packed.bytes() >= kHugePage ? kHugePage : 64;
  const size_t bytes =
      std::max(alignment, (packed.bytes() + alignment - 1) / alignment * alignment);
  packed.data_.reset(std::aligned_alloc(alignment, bytes));
#ifdef MADV_HUGEPAGE
  if (packed.data_ != nullptr && alignment == kHugePage) {
    madvise(packed.data_.get(), bytes, MADV_HUGEPAGE);  // advice only: failure is harmless
  }
#endif
  if (packed.data_ == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cpu: cannot allocate ", bytes, " bytes for a [", rows, ", ", in, "] weight matrix"));
  }
  // Every 32-wide slot of every block is written once: weights, then zeros past `in` and for
  // the rows that pad the last block (the allocation's round-up is never read).
  const int64_t chunks = packed.chunks();
  const int64_t element_size = DTypeSize(packed.type_);
  char* base = static_cast<char*>(packed.data_.get());
  for (int64_t r = 0; r < packed.blocks() * kBlockRows; ++r) {
    const int64_t block = r / kBlockRows, row_in_block = r % kBlockRows;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = c * kChunk, n = r < rows ? std::min(kChunk, in - k) : 0;
      char* dst =
          base + (((block * chunks + c) * kBlockRows + row_in_block) * kChunk) * element_size;
      if (n > 0 && type == DType::kF16) {
        const uint16_t* src = static_cast<const uint16_t*>(weights) + r * in + k;
        float* out = reinterpret_cast<float*>(dst);
        for (int64_t i = 0; i < n; ++i) out[i] = F16ToFloat(src[i]);
      } else if (n > 0) {
        std::memcpy(dst, static_cast<const char*>(weights) + (r * in + k) * element_size,
                    n * element_size);
      }
      std::memset(dst + n * element_size, 0, (kChunk - n) * element_size);
    }
  }
  return packed;
}

}  // namespace moe::cpu
