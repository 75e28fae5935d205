// Memory-mapped safetensors checkpoints: one file or a sharded set with
// model.safetensors.index.json. Tensors are views into the mapping (no copy).
//
// Every header is validated before any tensor is handed out: header length within the file,
// a JSON object of {name: {dtype, shape, data_offsets}}, known dtypes, byte size equal to
// shape x dtype size, offsets inside the data section and not overlapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/dtype.h"

namespace moe {

// A read-only memory mapping of a whole file. Move-only; unmaps on destruction.
class MappedFile {
 public:
  static absl::StatusOr<MappedFile> Open(const std::string& path);
  MappedFile() = default;
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

// A tensor inside a mapped file.
struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  int64_t num_bytes = 0;
  const std::string* file = nullptr;  // path of the file holding it

  int64_t num_elements() const;
  std::string ShapeString() const;  // "[4, 64]"
};

// One .safetensors file.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::string& path() const { return mapping_.path(); }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }

 private:
  MappedFile mapping_;
  std::map<std::string, TensorView> tensors_;
};

// All tensors of a checkpoint directory: model.safetensors, or the shards listed by
// model.safetensors.index.json (every listed tensor must be in the shard the index names).
class TensorStore {
 public:
  static absl::StatusOr<TensorStore> OpenDirectory(const std::string& dir);
  static absl::StatusOr<TensorStore> OpenFile(const std::string& path);

  // nullptr when absent.
  const TensorView* Find(absl::string_view name) const;
  // The tensor, checked for shape and a floating dtype; errors name the file and tensor.
  absl::StatusOr<const TensorView*> GetWeight(absl::string_view name,
                                              const std::vector<int64_t>& expected_shape) const;
  // Any tensor with this name and dtype (fixtures store I32 and F32 tensors).
  absl::StatusOr<const TensorView*> Get(absl::string_view name, DType dtype) const;

  const std::map<std::string, const TensorView*, std::less<>>& tensors() const {
    return index_;
  }
  const std::string& description() const { return description_; }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*, std::less<>> index_;
  std::string description_;  // directory or file path, for messages
};

}  // namespace moe
