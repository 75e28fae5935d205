// A minimal HTTP/1.1 endpoint for Prometheus scrapes: GET /metrics (and /healthz).
//
// Why not prometheus-cpp's civetweb Exposer: Debian builds civetweb with fixed 100 KiB thread
// stacks, which cuBLAS's thread-local storage exhausts once the CUDA backend is loaded (the
// Exposer then throws), and it cannot bind port 0. This endpoint serialises with
// prometheus-cpp's TextSerializer on one small thread and has neither problem.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace moe::server {

class MetricsHttpServer {
 public:
  // Renders the body of GET /metrics (Prometheus text format 0.0.4).
  using Renderer = std::function<std::string()>;

  // Listens on address:port (port 0 picks a free port; see port()).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(const std::string& address,
                                                                  int port, Renderer renderer);
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;
  ~MetricsHttpServer();  // stops accepting and joins the thread

  int port() const { return port_; }
  int64_t scrapes() const { return scrapes_.load(); }

 private:
  MetricsHttpServer(int listen_fd, int port, Renderer renderer);
  void Serve();
  void HandleConnection(int fd);

  const int listen_fd_;
  const int port_;
  const Renderer renderer_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> scrapes_{0};
  std::thread thread_;
};

}  // namespace moe::server
