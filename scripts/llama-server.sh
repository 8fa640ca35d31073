#!/usr/bin/env bash
# Builds llama.cpp's C++ `llama-server` (parallel slots, continuous batching, /health, /metrics,
# /tokenize, /slots): the managed LLM engine of the embedded default (GAINRAG_LLM__BACKEND=llamacpp).
# The sources are the llama.cpp vendored in the llama-cpp-python sdist pinned in
# constraints-llama.txt; the CPU flags come from scripts/llama-flags.sh (per-/proc/cpuinfo,
# GGML_NATIVE=OFF, AMX off). Static
# (BUILD_SHARED_LIBS=OFF: one binary), no web UI, no curl/openssl (it never downloads models).
# The build is cached per key (version + CPU flags) in ~/.cache/gainrag/llama-server/<key>/ and
# installed into var/llama-server/ (binary + KEY) with the key as the stamp: a no-op when it
# matches, a rebuild (or a cache hit) when the machine's flags differ from the ones it was built for.
# First build: ~10 CPU-minutes, ~5 min on 2 idle cores (docs/hardware.md); later runs: a copy.
#   scripts/llama-server.sh            build if needed, install into var/llama-server/
#   scripts/llama-server.sh --key      print the build key and exit
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VERSION=$(sed -n 's/^llama_cpp_python==//p' constraints-llama.txt)
CACHE=${GAINRAG_LLAMA_SERVER_CACHE:-$HOME/.cache/gainrag/llama-server}
DEST=${GAINRAG_LLAMA_SERVER_DIR:-var/llama-server}

# shellcheck source=llama-flags.sh
. scripts/llama-flags.sh
key="llama-server-$VERSION-$LLAMA_CPU_KEY"
if [ "${1:-}" = --key ]; then echo "$key"; exit 0; fi

if [ -x "$DEST/llama-server" ] && [ -f "$DEST/KEY" ] && [ "$(cat "$DEST/KEY")" = "$key" ]; then
  exit 0
fi

dir="$CACHE/$key"
if [ ! -x "$dir/llama-server" ]; then
  sdist_dir="$HOME/.cache/gainrag/sdist"
  sdist="$sdist_dir/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    mkdir -p "$sdist_dir"
    # Only this package as an sdist: with --no-binary :all: pip would also compile the build
    # tools it installs to read the sdist's metadata (ninja, even CMake) from source.
    "$PYTHON" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$sdist_dir" \
      "llama-cpp-python==$VERSION"
  fi
  echo "llama-server: building llama.cpp's llama-server ($key); ~10 CPU-minutes, cached in $dir" >&2
  work=$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  tar -xzf "$sdist" -C "$work"
  src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
  start=$(date +%s)
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    "${LLAMA_CMAKE_FLAGS[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >"$work/cmake.log" \
    || { tail -40 "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j"$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log" >&2; exit 1; }
  mkdir -p "$dir.tmp"
  cp "$work/build/bin/llama-server" "$dir.tmp/"
  echo "$key" > "$dir.tmp/KEY"
  echo "built in $(( $(date +%s) - start )) s on $(nproc) cores, $(date -u +%FT%TZ)" > "$dir.tmp/BUILD"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  echo "llama-server: $(cat "$dir/BUILD")" >&2
fi
mkdir -p "$DEST"
cp "$dir/llama-server" "$DEST/llama-server.tmp" && mv "$DEST/llama-server.tmp" "$DEST/llama-server"
cp "$dir/BUILD" "$DEST/BUILD" 2>/dev/null || true
echo "$key" > "$DEST/KEY"
echo "llama-server: installed $key in $DEST" >&2
