# The embedded default in one CPU container, as `make run` serves it: the gateway with in-process
# retrieval and selector and the managed llama.cpp engine (llama-server, started and watched by
# the gateway) running the default reader, Qwen2.5-Coder-1.5B. Built on this project's two CPU
# images, so it adds only layers of its own (no third copy of the Python dependencies, no second
# llama.cpp compile):
#   WORKER_IMAGE  gainrag-worker:cpu (docker/worker.Dockerfile): the venv, gainrag, data, selectors
#   LLAMA_IMAGE   gainrag-llama:cpu (docker/llama-cpu.Dockerfile): llama-server and the verified GGUF
# Build from the repo root, after those two:  docker build -f docker/gateway.Dockerfile -t gainrag:cpu .
# (`make docker-images` builds all three in order.)
# The index is not in the image: the `embedded` profile's index job builds it into the
# `gainrag-index` volume, as in the `cpu` profile. Alone:
#   docker run -v gainrag-index:/app/var/indexes gainrag-worker:cpu index build --out /app/var/indexes/default
#   docker run -p 127.0.0.1:8000:8000 -v gainrag-index:/app/var/indexes:ro gainrag:cpu
ARG WORKER_IMAGE=gainrag-worker:cpu
ARG LLAMA_IMAGE=gainrag-llama:cpu

FROM ${LLAMA_IMAGE} AS llama

FROM ${WORKER_IMAGE}
USER root
# libgomp1: llama.cpp's CPU backend uses OpenMP (torch brings its own copy, the server does not).
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o gainrag -g gainrag /home/gainrag/.cache /home/gainrag/.cache/gainrag \
        /home/gainrag/.cache/gainrag/models
COPY --from=llama /opt/llama-server /opt/llama-server
# Where gainrag.weights.gguf_path looks for a bundled LLM: the sha256 is checked again below.
COPY --from=llama --chown=gainrag /models/ /home/gainrag/.cache/gainrag/models/gguf/
ENV GAINRAG_LLM__MODEL=qwen2.5-coder-1.5b \
    GAINRAG_LLM__ENGINE_BIN=/opt/llama-server/llama-server \
    GAINRAG_RETRIEVAL__INDEX_DIR=/app/var/indexes/default \
    GAINRAG_HOST=0.0.0.0 GAINRAG_PORT=8000 \
    OMP_WAIT_POLICY=PASSIVE
USER gainrag
# The GGUF verified against the pinned sha256 and its tokenizer read once (what `gainrag prepare`
# does before the index), so that a container starts with nothing to convert.
RUN python -c 'from gainrag.config import Settings; from gainrag.weights import gguf_path, gguf_tokenizer; \
s = Settings().llm; print(gguf_path(s.model, s.models_dir), gguf_tokenizer(s.model, s.models_dir))'

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD curl -fsS http://127.0.0.1:8000/ready || exit 1
ENTRYPOINT ["gainrag"]
CMD ["serve"]
