# Sourced by scripts/llama-server.sh (here and in docker/llama-cpu.Dockerfile): the ggml CMake
# flags for *this* CPU's instruction set, never for "native":
#   - GGML_NATIVE=OFF and each x86 extension switched on only when /proc/cpuinfo lists it, so the
#     build runs here and on any CPU with the same flags (AVX2-only AMD, AVX-512 Intel, ...);
#   - AMX always OFF: llama.cpp's AMX matmul (ggml_backend_amx_mul_mat) crashes with a general
#     protection fault on Sapphire Rapids-class Xeons (llama.cpp issue #20824), and a native build
#     there turns it on.
# Sets LLAMA_CMAKE_FLAGS (array of -D options) and LLAMA_CPU_KEY ("x86_64-AVX+AVX2+...").
# LLAMA_CPUINFO_FLAGS overrides the flag list (tests use it to check the mapping).
_llama_flags=${LLAMA_CPUINFO_FLAGS-$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true)}
_llama_has() { [[ " $_llama_flags " == *" $1 "* ]]; }
LLAMA_CMAKE_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
_llama_on=()
case "$(uname -m)" in
  x86_64)
    # cmake option : cpuinfo flag(s) it needs
    for _pair in AVX:avx AVX2:avx2 FMA:fma F16C:f16c BMI2:bmi2 AVX_VNNI:avx_vnni \
                 AVX512:avx512f,avx512bw,avx512vl,avx512dq,avx512cd AVX512_VBMI:avx512vbmi \
                 AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16; do
      _opt=${_pair%%:*} _ok=1
      IFS=, read -ra _need <<< "${_pair#*:}"
      for _f in "${_need[@]}"; do _llama_has "$_f" || _ok=0; done
      # The AVX-512 sub-extensions only count on top of AVX-512 F/BW/VL/DQ/CD.
      [[ $_opt == AVX512_* && ! " ${_llama_on[*]-} " == *" AVX512 "* ]] && _ok=0
      if [ $_ok = 1 ]; then
        _llama_on+=("$_opt"); LLAMA_CMAKE_FLAGS+=("-DGGML_$_opt=ON")
      else
        LLAMA_CMAKE_FLAGS+=("-DGGML_$_opt=OFF")
      fi
    done ;;
esac
LLAMA_CPU_KEY="$(uname -m)-$(IFS=+; echo "${_llama_on[*]-generic}")"
unset _llama_flags _llama_on _pair _opt _ok _need _f
