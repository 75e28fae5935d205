// absl::Status <-> grpc::Status. The engine speaks absl; only server/ knows gRPC.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace moe::server {

// Same code (the numeric values of absl::StatusCode and grpc::StatusCode agree), same message.
inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

}  // namespace moe::server
