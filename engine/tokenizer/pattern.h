// A `pattern` of tokenizer.json ({"String": "..."} or {"Regex": "..."}): finds non-overlapping
// matches left to right. Regexes are Oniguruma syntax in the file; PCRE2 (UTF, UCP, JIT)
// runs them, with `^`/`$` matching at line boundaries as Oniguruma's default syntax does.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace moe::tokenizer_internal {

struct Match {
  size_t start;
  size_t end;
};

class Pattern {
 public:
  // `where` names the component in error messages, e.g. "pre_tokenizer Split".
  static absl::StatusOr<Pattern> FromJson(const nlohmann::json& pattern, std::string_view where);
  static absl::StatusOr<Pattern> Literal(std::string literal);
  static absl::StatusOr<Pattern> Regex(std::string_view regex, std::string_view where);

  Pattern(Pattern&&) noexcept;
  Pattern& operator=(Pattern&&) noexcept;
  ~Pattern();

  // Appends the matches in `text` (valid UTF-8) to `matches`. Empty matches are reported like
  // Rust's regex iterator does (never right after the previous match).
  absl::Status FindAll(std::string_view text, std::vector<Match>& matches) const;

  // Replaces every match by `content`.
  absl::Status ReplaceAll(std::string_view text, std::string_view content, std::string& out) const;

  bool is_literal() const { return compiled_ == nullptr; }
  const std::string& literal() const { return literal_; }

 private:
  Pattern() = default;
  std::string literal_;
  struct Compiled;
  std::unique_ptr<Compiled> compiled_;
};

}  // namespace moe::tokenizer_internal
