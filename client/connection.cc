#include "client/connection.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA bundle that signed the server's certificate: connect with TLS (env MOE_TLS_CA)");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM client certificate for mutual TLS, with --tls_key (env MOE_TLS_CERT)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert (env MOE_TLS_KEY)");
ABSL_FLAG(std::string, auth_token, "",
          "Bearer token sent as `authorization: Bearer TOKEN` (env MOE_AUTH_TOKEN)");

namespace moe::client {
namespace {

// The flag's value, else the environment variable's, else "".
std::string FlagOrEnv(const absl::Flag<std::string>& flag, const char* env) {
  std::string value = absl::GetFlag(flag);
  if (value.empty()) {
    const char* from_env = std::getenv(env);
    if (from_env != nullptr) value = from_env;
  }
  return value;
}

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream text;
  text << in.rdbuf();
  *out = text.str();
  return !in.bad();
}

}  // namespace

std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials(absl::string_view program) {
  const std::string ca = FlagOrEnv(FLAGS_tls_ca, "MOE_TLS_CA");
  const std::string cert = FlagOrEnv(FLAGS_tls_cert, "MOE_TLS_CERT");
  const std::string key = FlagOrEnv(FLAGS_tls_key, "MOE_TLS_KEY");
  if (ca.empty() && cert.empty() && key.empty()) return grpc::InsecureChannelCredentials();
  const std::string name(program);
  if (cert.empty() != key.empty()) {
    std::fprintf(stderr, "%s: --tls_cert and --tls_key go together\n", name.c_str());
    return nullptr;
  }
  grpc::SslCredentialsOptions ssl;
  const std::pair<const std::string*, std::string*> files[] = {
      {&ca, &ssl.pem_root_certs}, {&cert, &ssl.pem_cert_chain}, {&key, &ssl.pem_private_key}};
  for (const auto& [path, out] : files) {
    if (!path->empty() && !ReadFile(*path, out)) {
      std::fprintf(stderr, "%s: cannot read %s\n", name.c_str(), path->c_str());
      return nullptr;
    }
  }
  return grpc::SslCredentials(ssl);
}

void AddAuthToken(grpc::ClientContext& context) {
  static const std::string token = FlagOrEnv(FLAGS_auth_token, "MOE_AUTH_TOKEN");
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
}

}  // namespace moe::client
