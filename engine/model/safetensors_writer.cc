#include "engine/model/safetensors_writer.h"

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moe {

int64_t TensorSpec::num_bytes() const {
  int64_t elements = 1;
  for (int64_t dim : shape) elements *= dim;
  return elements * DTypeSize(dtype);
}

std::string SafetensorsHeader(const std::vector<TensorSpec>& specs) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  uint64_t offset = 0;
  for (const TensorSpec& spec : specs) {
    const uint64_t end = offset + spec.num_bytes();
    header[spec.name] = {{"dtype", std::string(DTypeName(spec.dtype))},
                         {"shape", spec.shape},
                         {"data_offsets", {offset, end}}};
    offset = end;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string block(8, '\0');
  for (int i = 0; i < 8; ++i) block[i] = static_cast<char>((json.size() >> (8 * i)) & 0xff);
  return block + json;
}

absl::StatusOr<SafetensorsStreamWriter> SafetensorsStreamWriter::Create(
    const std::string& path, std::vector<TensorSpec> specs) {
  SafetensorsStreamWriter writer;
  writer.path_ = path;
  writer.file_.open(path, std::ios::binary | std::ios::trunc);
  if (!writer.file_) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot create"));
  const std::string header = SafetensorsHeader(specs);
  writer.file_.write(header.data(), static_cast<std::streamsize>(header.size()));
  writer.specs_ = std::move(specs);
  return writer;
}

absl::Status SafetensorsStreamWriter::Append(std::span<const uint8_t> bytes) {
  if (next_ >= specs_.size()) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": more tensors than specified"));
  }
  const TensorSpec& spec = specs_[next_++];
  if (static_cast<int64_t>(bytes.size()) != spec.num_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", spec.name, "' has ",
                                                   bytes.size(), " bytes, its shape needs ",
                                                   spec.num_bytes()));
  }
  file_.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return file_ ? absl::OkStatus() : absl::DataLossError(absl::StrCat(path_, ": write failed"));
}

absl::Status SafetensorsStreamWriter::Finish() {
  if (next_ != specs_.size()) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": ", specs_.size() - next_,
                                                      " tensors were not written"));
  }
  file_.flush();
  return file_ ? absl::OkStatus() : absl::DataLossError(absl::StrCat(path_, ": write failed"));
}

namespace {
std::vector<TensorSpec> SpecsOf(const std::vector<TensorToWrite>& tensors) {
  std::vector<TensorSpec> specs;
  for (const TensorToWrite& tensor : tensors) specs.push_back({tensor.name, tensor.dtype, tensor.shape});
  return specs;
}
}  // namespace

std::string SerializeSafetensors(const std::vector<TensorToWrite>& tensors) {
  std::string out = SafetensorsHeader(SpecsOf(tensors));
  for (const TensorToWrite& tensor : tensors) {
    out.append(reinterpret_cast<const char*>(tensor.bytes.data()), tensor.bytes.size());
  }
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  auto writer = SafetensorsStreamWriter::Create(path, SpecsOf(tensors));
  if (!writer.ok()) return writer.status();
  for (const TensorToWrite& tensor : tensors) {
    if (absl::Status status = writer->Append(tensor.bytes); !status.ok()) return status;
  }
  return writer->Finish();
}

}  // namespace moe
