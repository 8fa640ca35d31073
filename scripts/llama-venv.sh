#!/usr/bin/env bash
# Installs llama-cpp-python's OpenAI-compatible server into .venv-llama with a llama.cpp built for
# *this* CPU's instruction set, never for "native":
#   - GGML_NATIVE=OFF and each x86 extension switched on only when /proc/cpuinfo lists it, so the
#     build runs here and on any CPU with the same flags (AVX2-only AMD, AVX-512 Intel, ...);
#   - AMX always OFF: llama.cpp's AMX matmul (ggml_backend_amx_mul_mat) crashes with a general
#     protection fault on Sapphire Rapids-class Xeons (llama.cpp issue #20824), and a native build
#     there turns it on.
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

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true)
has() { [[ " $flags " == *" $1 "* ]]; }
args=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
on=()
case "$(uname -m)" in
  x86_64)
    # cmake option : cpuinfo flag(s) it needs
    for pair in AVX:avx AVX2:avx2 FMA:fma F16C:f16c BMI2:bmi2 AVX_VNNI:avx_vnni \
                AVX512:avx512f,avx512bw,avx512vl,avx512dq,avx512cd AVX512_VBMI:avx512vbmi \
                AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16; do
      opt=${pair%%:*} ok=1
      IFS=, read -ra need <<< "${pair#*:}"
      for f in "${need[@]}"; do has "$f" || ok=0; done
      # The AVX-512 sub-extensions only count on top of AVX-512 F/BW/VL/DQ/CD.
      [[ $opt == AVX512_* && ! " ${on[*]-} " == *" AVX512 "* ]] && ok=0
      if [ $ok = 1 ]; then on+=("$opt"); args+=("-DGGML_$opt=ON"); else args+=("-DGGML_$opt=OFF"); fi
    done ;;
esac
key="llama-cpp-python-$VERSION-$(uname -m)-$(IFS=+; echo "${on[*]-generic}")"
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
