#include "server/auth.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace moe::server {
namespace {

absl::Status AddTokens(absl::string_view text, absl::string_view source,
                       std::vector<std::string>& tokens) {
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, absl::ByAnyChar(",\n"))) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || absl::StartsWith(line, "#")) continue;
    for (char c : line) {
      const unsigned char u = static_cast<unsigned char>(c);
      if (u < 0x21 || u > 0x7E) {
        return absl::InvalidArgumentError(absl::StrCat(
            source, ": entry ", line_number, ": tokens must be printable ASCII without spaces"));
      }
    }
    tokens.emplace_back(line);
  }
  return absl::OkStatus();
}

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Walk the longer length; indexing modulo keeps every access in bounds.
  const size_t n = a.size() > b.size() ? a.size() : b.size();
  volatile unsigned char diff = a.size() == b.size() ? 0 : 1;
  if (a.empty() || b.empty()) return a.size() == b.size();
  for (size_t i = 0; i < n; ++i) {
    diff = diff | static_cast<unsigned char>(a[i % a.size()] ^ b[i % b.size()]);
  }
  return diff == 0;
}

absl::StatusOr<BearerAuth> BearerAuth::Create(std::vector<std::string> tokens) {
  if (tokens.empty()) return absl::InvalidArgumentError("no authentication tokens given");
  for (const std::string& token : tokens) {
    if (token.empty()) return absl::InvalidArgumentError("an authentication token is empty");
  }
  return BearerAuth(std::move(tokens));
}

absl::StatusOr<std::vector<std::string>> BearerAuth::LoadTokens(const std::string& file,
                                                                absl::string_view list) {
  std::vector<std::string> tokens;
  if (!file.empty()) {
    std::ifstream in(file, std::ios::binary);
    if (!in) {
      return absl::NotFoundError(
          absl::StrCat("--auth_tokens_file=", file, ": cannot be opened for reading"));
    }
    std::stringstream text;
    text << in.rdbuf();
    if (in.bad()) {
      return absl::DataLossError(absl::StrCat("--auth_tokens_file=", file, ": read error"));
    }
    if (absl::Status status =
            AddTokens(text.str(), absl::StrCat("--auth_tokens_file=", file), tokens);
        !status.ok()) {
      return status;
    }
    if (tokens.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--auth_tokens_file=", file, ": holds no token (one per line)"));
    }
  }
  if (!list.empty()) {
    const size_t before = tokens.size();
    if (absl::Status status = AddTokens(list, "MOE_AUTH_TOKENS", tokens); !status.ok()) {
      return status;
    }
    if (tokens.size() == before) {
      return absl::InvalidArgumentError("MOE_AUTH_TOKENS is set but holds no token");
    }
  }
  return tokens;
}

bool BearerAuth::Check(absl::string_view authorization) const {
  constexpr absl::string_view kScheme = "Bearer ";
  if (authorization.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(authorization.substr(0, kScheme.size()), kScheme)) {
    return false;
  }
  const absl::string_view presented = authorization.substr(kScheme.size());
  bool match = false;
  for (const std::string& token : tokens_) {
    match = ConstantTimeEquals(presented, token) | match;  // no short circuit
  }
  return match;
}

}  // namespace moe::server
