#include "engine/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace moe {
namespace {

using Json = nlohmann::json;

// The header is JSON of at most this many bytes (the reference implementation's limit).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

absl::Status FileError(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

absl::Status TensorError(const std::string& path, absl::string_view tensor, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", tensor, "': ", what));
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  std::ostringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

}  // namespace

// ---- MappedFile -------------------------------------------------------------------------------

absl::StatusOr<MappedFile> MappedFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  struct stat info;
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  MappedFile file;
  file.path_ = path;
  file.size_ = static_cast<size_t>(info.st_size);
  if (file.size_ > 0) {
    // MAP_POPULATE maps every page now, at load, instead of faulting them in one by one
    // during the first requests.
    void* address = ::mmap(nullptr, file.size_, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (address == MAP_FAILED) {
      const int error = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(error)));
    }
    file.data_ = static_cast<const std::byte*>(address);
  }
  ::close(fd);
  return file;
}

MappedFile::MappedFile(MappedFile&& other) noexcept { *this = std::move(other); }

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
}

// ---- TensorView -------------------------------------------------------------------------------

int64_t TensorView::num_elements() const {
  int64_t count = 1;
  for (int64_t dim : shape) count *= dim;
  return count;
}

std::string TensorView::ShapeString() const { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

// ---- SafetensorsFile --------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  ASSIGN_OR_RETURN(file->mapping_, MappedFile::Open(path));
  const std::byte* bytes = file->mapping_.data();
  const uint64_t file_size = file->mapping_.size();

  // Layout: u64 little-endian header length N, N bytes of JSON, then the data section.
  if (file_size < 8) {
    return FileError(path, absl::StrCat("truncated: ", file_size,
                                        " bytes, too short for the 8-byte header length"));
  }
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | static_cast<uint8_t>(bytes[i]);
  if (header_size > kMaxHeaderBytes || header_size > file_size - 8) {
    return FileError(path, absl::StrCat("header length ", header_size, " runs past the end of the ",
                                        file_size, "-byte file (truncated or not safetensors)"));
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
  const Json header = Json::parse(header_begin, header_begin + header_size, nullptr,
                                  /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return FileError(path, "header is not a JSON object");
  }
  const std::byte* data_section = bytes + 8 + header_size;
  const uint64_t data_size = file_size - 8 - header_size;

  struct Extent {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Extent> extents;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    if (!entry.is_object()) return TensorError(path, name, "entry is not an object");
    const auto dtype_it = entry.find("dtype");
    const auto shape_it = entry.find("shape");
    const auto offsets_it = entry.find("data_offsets");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return TensorError(path, name, "missing string field 'dtype'");
    }
    const std::optional<DType> dtype = ParseSafetensorsDType(dtype_it->get<std::string>());
    if (!dtype) {
      return TensorError(path, name,
                         absl::StrCat("dtype '", dtype_it->get<std::string>(),
                                      "' is not supported; supported: BF16, F16, F32, I32, I64"));
    }
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return TensorError(path, name, "missing array field 'shape'");
    }
    TensorView view;
    view.name = name;
    view.dtype = *dtype;
    uint64_t elements = 1;
    for (const Json& dim : *shape_it) {
      if (!dim.is_number_unsigned()) return TensorError(path, name, "shape has a non-integer entry");
      const uint64_t extent = dim.get<uint64_t>();
      if (extent > (1ull << 40) || __builtin_mul_overflow(elements, extent, &elements) ||
          elements > (1ull << 50)) {
        return TensorError(path, name, "shape is too large");
      }
      view.shape.push_back(static_cast<int64_t>(extent));
    }
    if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
      return TensorError(path, name, "'data_offsets' must be two non-negative integers");
    }
    const uint64_t begin = (*offsets_it)[0].get<uint64_t>();
    const uint64_t end = (*offsets_it)[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return TensorError(path, name,
                         absl::StrCat("data_offsets [", begin, ", ", end,
                                      ") run past the end of the data section (", data_size,
                                      " bytes; file truncated?)"));
    }
    const uint64_t expected_bytes = elements * DTypeSize(*dtype);
    if (end - begin != expected_bytes) {
      return TensorError(path, name,
                         absl::StrCat("holds ", end - begin, " bytes but shape ",
                                      view.ShapeString(), " of ", DTypeName(*dtype), " needs ",
                                      expected_bytes));
    }
    view.data = data_section + begin;
    view.num_bytes = static_cast<int64_t>(expected_bytes);
    view.file = &file->mapping_.path();
    extents.push_back({begin, end, name});
    file->tensors_.emplace(name, std::move(view));
  }
  std::sort(extents.begin(), extents.end(),
            [](const Extent& a, const Extent& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < extents.size(); ++i) {
    if (extents[i].begin < extents[i - 1].end) {
      return TensorError(path, extents[i].name,
                         absl::StrCat("data overlaps tensor '", extents[i - 1].name, "'"));
    }
  }
  return file;
}

// ---- TensorStore ------------------------------------------------------------------------------

absl::StatusOr<TensorStore> TensorStore::OpenFile(const std::string& path) {
  TensorStore store;
  store.description_ = path;
  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
  for (const auto& [name, view] : file->tensors()) store.index_.emplace(name, &view);
  store.files_.push_back(std::move(file));
  return store;
}

absl::StatusOr<TensorStore> TensorStore::OpenDirectory(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string single = (fs::path(dir) / "model.safetensors").string();
  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  std::error_code error;
  if (fs::exists(single, error)) return OpenFile(single);
  if (!fs::exists(index_path, error)) {
    return absl::NotFoundError(absl::StrCat(
        dir, ": no model.safetensors or model.safetensors.index.json in the model directory"));
  }
  ASSIGN_OR_RETURN(const std::string index_text, ReadTextFile(index_path));
  const Json index = Json::parse(index_text, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
      !index["weight_map"].is_object()) {
    return FileError(index_path, "not a JSON object with a 'weight_map' object");
  }
  TensorStore store;
  store.description_ = dir;
  std::map<std::string, SafetensorsFile*> shards;
  for (const auto& [tensor_name, shard_name] : index["weight_map"].items()) {
    if (!shard_name.is_string()) {
      return TensorError(index_path, tensor_name, "weight_map value is not a file name");
    }
    const std::string shard = shard_name.get<std::string>();
    if (shard.find('/') != std::string::npos || shard == ".." || shard.empty()) {
      return TensorError(index_path, tensor_name,
                         absl::StrCat("shard '", shard, "' must be a file name in the directory"));
    }
    auto it = shards.find(shard);
    if (it == shards.end()) {
      ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((fs::path(dir) / shard).string()));
      it = shards.emplace(shard, file.get()).first;
      store.files_.push_back(std::move(file));
    }
    const auto& shard_tensors = it->second->tensors();
    const auto tensor_it = shard_tensors.find(tensor_name);
    if (tensor_it == shard_tensors.end()) {
      return TensorError(it->second->path(), tensor_name,
                         "listed in model.safetensors.index.json but missing from this shard");
    }
    store.index_.emplace(tensor_name, &tensor_it->second);
  }
  return store;
}

const TensorView* TensorStore::Find(absl::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

absl::StatusOr<const TensorView*> TensorStore::Get(absl::string_view name, DType dtype) const {
  const TensorView* view = Find(name);
  if (view == nullptr) {
    return absl::NotFoundError(absl::StrCat(description_, ": tensor '", name, "' is missing"));
  }
  if (view->dtype != dtype) {
    return TensorError(*view->file, name,
                       absl::StrCat("dtype ", DTypeName(view->dtype), ", expected ",
                                    DTypeName(dtype)));
  }
  return view;
}

absl::StatusOr<const TensorView*> TensorStore::GetWeight(
    absl::string_view name, const std::vector<int64_t>& expected_shape) const {
  const TensorView* view = Find(name);
  if (view == nullptr) {
    return absl::NotFoundError(absl::StrCat(description_, ": tensor '", name, "' is missing"));
  }
  if (!IsFloatingWeightType(view->dtype)) {
    return TensorError(*view->file, name,
                       absl::StrCat("dtype ", DTypeName(view->dtype),
                                    " is not a weight type; supported: BF16, F16, F32"));
  }
  if (view->shape != expected_shape) {
    return TensorError(*view->file, name,
                       absl::StrCat("shape ", view->ShapeString(), " does not match the config's [",
                                    absl::StrJoin(expected_shape, ", "), "]"));
  }
  return view;
}

}  // namespace moe
