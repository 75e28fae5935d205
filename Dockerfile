# syntax=docker/dockerfile:1
# moe-serve container image: build with the CUDA 13 toolkit, run on the matching CUDA runtime.
#   docker build -t moe-serve:0.1.0 .
#   docker run --rm --gpus all -p 50051:50051 -p 9400:9400 moe-serve:0.1.0   # the demo model
# The image holds moe-serve (+ moe-client when built), the shared libraries they need that the
# runtime image lacks, and the built-in demo model; no compiler, no headers, no apt lists.
# See deploy/README.md.
ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04

# ---- build ------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# sm_80 (A100) and sm_90 (H100/H200) code; newer GPUs JIT the sm_90 PTX.
ARG CUDA_ARCHITECTURES="80;90"
ENV DEBIAN_FRONTEND=noninteractive

WORKDIR /src
# Dependencies first, through the project's own script, so that this layer is cached across
# source changes.
COPY scripts/setup_deps.sh scripts/
RUN bash scripts/setup_deps.sh

COPY . .
# The project's build script (CUDA backend on: nvcc is on PATH), without the test suite.
RUN bash scripts/build.sh -DMOE_BUILD_TESTS=OFF \
      "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}"

# Stage what the runtime image gets under /opt/moe-serve:
#   bin/      moe-serve (required), moe-client (if built)
#   lib/      shared libraries of those binaries that the CUDA runtime image does not have
#             (gRPC, protobuf, Abseil, Highway, ...): glibc, libstdc++ and the CUDA libraries
#             come from the runtime image, libcuda from the node's driver.
#   demo_model/  the built-in demo model: moe-serve's default --model (<bin>/../demo_model)
RUN set -eux; \
    out=/opt/moe-serve; mkdir -p "$out/bin" "$out/lib"; \
    install -m 0755 build/server/moe-serve "$out/bin/"; \
    if [ -x build/client/moe-client ]; then install -m 0755 build/client/moe-client "$out/bin/"; fi; \
    for exe in "$out"/bin/*; do \
      ldd "$exe" | awk '/=> \// {print $3}'; \
    done | sort -u | while read -r lib; do \
      base=$(basename "$lib"); \
      case "$base" in \
        libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libgcc_s.so*|libstdc++.so*) ;; \
        libcuda.so*|libcudart.so*|libcublas.so*|libcublasLt.so*|libnvidia-*) ;; \
        *) cp -L "$lib" "$out/lib/$base" ;; \
      esac; \
    done; \
    build/tools/moe-make-model --preset=demo --out="$out/demo_model" \
      --tokenizer=tests/fixtures/tokenizers/qwen2_split/tokenizer.json \
      --chat_template=tests/fixtures/chat_templates/qwen2_moe_chatml.jinja; \
    ls -lR "$out"

# ---- runtime ----------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="moe-serve" \
      org.opencontainers.image.description="gRPC inference server for Mixture-of-Experts LLMs"

COPY --from=build /opt/moe-serve /opt/moe-serve
# Find the copied libraries without LD_LIBRARY_PATH; a fixed, unprivileged user (the
# Kubernetes manifests run as 10001 with a read-only root filesystem).
RUN echo /opt/moe-serve/lib > /etc/ld.so.conf.d/moe-serve.conf \
    && ldconfig \
    && groupadd --system --gid 10001 moe \
    && useradd --system --uid 10001 --gid moe --home-dir /nonexistent --no-create-home \
         --shell /usr/sbin/nologin moe \
    && if ldd /opt/moe-serve/bin/moe-serve | grep -v 'libcuda\.so' | grep 'not found'; then \
         exit 1; \
       fi

ENV PATH=/opt/moe-serve/bin:${PATH} \
    MOE_HOST=0.0.0.0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /opt/moe-serve
EXPOSE 50051 9400
# moe-serve takes SIGTERM itself (sigwait): health NOT_SERVING, running requests drain for
# --drain_timeout (MOE_DRAIN_TIMEOUT), then it exits. No init process is needed.
ENTRYPOINT ["/opt/moe-serve/bin/moe-serve"]
