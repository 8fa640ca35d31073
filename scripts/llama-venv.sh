#!/usr/bin/env bash
# Installs llama-cpp-python's OpenAI-compatible server into .venv-llama with a llama.cpp built for
# *this* CPU's instruction set, never for "native", AMX off (the flags: scripts/llama-flags.sh,
# shared with the C++ llama-server build of scripts/llama-server.sh).
# The wheel is built once per (version, flag set) into a cache keyed by both, so a wheel built on
# one kind of machine is never installed on another, and pip's own wheel cache (which may hold a
# native, crashing build of the same version) is bypassed with --no-cache-dir.
#   scripts/llama-venv.sh            build if needed, install, write the stamp
#   scripts/llama-venv.sh --key      print the build key (version + flags) and exit
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LLAMA_VENV:-.venv-llama}
VERSION=$(sed -n 's/^llama_cpp_python==//p' constraints-llama.txt)
CACHE=${GAINRAG_WHEEL_CACHE:-$HOME/.cache/gainrag/wheels}

# shellcheck source=llama-flags.sh
. scripts/llama-flags.sh
args=("${LLAMA_CMAKE_FLAGS[@]}")
key="llama-cpp-python-$VERSION-$LLAMA_CPU_KEY"
if [ "${1:-}" = --key ]; then echo "$key"; exit 0; fi

stamp="$VENV/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ constraints-llama.txt -ot "$stamp" ]; then
  exit 0
fi

dir="$CACHE/$key"
if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "llama-venv: building llama.cpp ($key); ~10 min on 2 cores, cached in $dir" >&2
  mkdir -p "$dir.tmp"
  CMAKE_ARGS="${args[*]}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PYTHON" -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
    -w "$dir.tmp" "llama-cpp-python==$VERSION"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# The local wheel first (no index: never a cached native build), then its pinned dependencies.
"$VENV/bin/pip" install -q --force-reinstall --no-deps --no-index --find-links "$dir" \
  "llama-cpp-python==$VERSION"
"$VENV/bin/pip" install -q -c constraints-llama.txt --find-links "$dir" "llama-cpp-python[server]==$VERSION"
echo "$key" > "$stamp"
echo "llama-venv: installed $key" >&2
