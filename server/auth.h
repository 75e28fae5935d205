// Optional bearer-token authentication of the Inference service.
//
// Clients send `authorization: Bearer <token>` metadata; a call whose token is missing or not
// one of the configured tokens ends with UNAUTHENTICATED before its request is looked at.
// Tokens are compared in constant time: every configured token is compared with every byte of
// the presented one, without early exit, so the time depends only on the lengths.
// grpc.health.v1 (probes) and server reflection (the public API schema, no data) stay
// reachable without a token.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moe::server {

class BearerAuth {
 public:
  // `tokens` must be non-empty, each non-empty printable ASCII without spaces.
  static absl::StatusOr<BearerAuth> Create(std::vector<std::string> tokens);
  // Tokens from a file (one per line; blank lines and lines starting with '#' ignored) and/or
  // a comma- or newline-separated list (the MOE_AUTH_TOKENS environment variable). Either may
  // be empty; an empty result is an error when a source was given.
  static absl::StatusOr<std::vector<std::string>> LoadTokens(const std::string& file,
                                                             absl::string_view list);

  // Whether `authorization` (the metadata value) is "Bearer <token>" with a known token.
  bool Check(absl::string_view authorization) const;

  size_t num_tokens() const { return tokens_.size(); }

 private:
  explicit BearerAuth(std::vector<std::string> tokens) : tokens_(std::move(tokens)) {}
  std::vector<std::string> tokens_;
};

// Equality of `a` and `b` in time that depends on their lengths only.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace moe::server
