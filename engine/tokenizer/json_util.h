// Typed, non-throwing reads from tokenizer.json objects with errors that name the component.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/utf8.h"
#include "nlohmann/json.hpp"

namespace moe::tokenizer_internal {

inline absl::Status JsonError(std::string_view where, std::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", Sv(where), ": ", Sv(message)));
}

// A missing or null field gives `fallback`; a field of another type is an error.
inline absl::StatusOr<bool> GetBool(const nlohmann::json& object, std::string_view key,
                                    bool fallback, std::string_view where) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return JsonError(where, absl::StrCat("'", Sv(key), "' must be a boolean"));
  return it->get<bool>();
}

inline absl::StatusOr<std::optional<std::string>> GetOptionalString(const nlohmann::json& object,
                                                                    std::string_view key,
                                                                    std::string_view where) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return std::optional<std::string>();
  if (!it->is_string()) return JsonError(where, absl::StrCat("'", Sv(key), "' must be a string"));
  return std::optional<std::string>(it->get<std::string>());
}

inline absl::StatusOr<std::string> GetString(const nlohmann::json& object, std::string_view key,
                                             std::string_view where) {
  const auto it = object.find(key);
  if (it == object.end() || !it->is_string()) {
    return JsonError(where, absl::StrCat("'", Sv(key), "' must be a string"));
  }
  return it->get<std::string>();
}

inline absl::StatusOr<int64_t> GetInt(const nlohmann::json& object, std::string_view key,
                                      int64_t fallback, std::string_view where) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_number_integer()) {
    return JsonError(where, absl::StrCat("'", Sv(key), "' must be an integer"));
  }
  return it->get<int64_t>();
}

// The "type" of a component object.
inline absl::StatusOr<std::string> GetType(const nlohmann::json& object, std::string_view where) {
  if (!object.is_object()) return JsonError(where, "must be an object or null");
  return GetString(object, "type", where);
}

}  // namespace moe::tokenizer_internal
