// How moe-client and moe-bench reach a secured moe-serve: TLS (--tls_ca), mutual TLS
// (--tls_cert/--tls_key) and a bearer token (--auth_token), each with an MOE_* environment
// variable as fallback. The flags are defined in connection.cc.
#pragma once

#include <memory>

#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"

namespace moe::client {

// Plaintext, TLS (--tls_ca) or mutual TLS (--tls_ca with --tls_cert and --tls_key); null with a
// message on stderr, prefixed with `program`, when a file cannot be read or --tls_cert and
// --tls_key are not given together.
std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(absl::string_view program);

// Adds `authorization: Bearer TOKEN` metadata when --auth_token (or MOE_AUTH_TOKEN) is set.
void AddAuthToken(grpc::ClientContext& context);

}  // namespace moe::client
